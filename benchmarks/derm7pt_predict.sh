#!/usr/bin/env bash
# The Derm7pt test predictions of a trained run, timed, written in the committed format and compared with a previous
# file (BENCHMARKS.md, Derm7pt "The committed test predictions"):
#   bash benchmarks/derm7pt_predict.sh runs/d7_rec d7_test.parquet OUT_DIR [previous_submission.csv]
set -euo pipefail
run=$1; manifest=$2; out=$3; previous=${4:-}
mkdir -p "$out"
start=$(date +%s)
dermfusion predict "$run" --manifest "$manifest" --out "$out/d7_test_predictions.csv" --clinical "$out/d7_test_clinical.csv"
echo "predict: $(( $(date +%s) - start )) s"
python "$(dirname "$0")/derm7pt_submission.py" "$out/d7_test_predictions.csv" --manifest "$manifest" \
  --out "$out/derm7pt_test_predictions.csv"
if [ -n "$previous" ]; then
  python "$(dirname "$0")/compare_predictions.py" "$previous" "$out/derm7pt_test_predictions.csv"
fi
