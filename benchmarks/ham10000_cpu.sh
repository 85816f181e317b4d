#!/usr/bin/env bash
# The issue-3 CPU benchmark: a 5-fold from-scratch run of configs/ham10000_cpu.yaml on the real HAM10000
# images, then the fold ensemble's predictions for the 1,512 ISIC 2018 test images, timed end to end.
#   bash benchmarks/ham10000_cpu.sh [DATA=../shared/data/ham10000] [OUT=runs/ham_cpu] [extra --set …]
# Writes OUT/, OUT.test_predictions.csv and OUT.times.txt. A cold decode cache is part of the timing.
set -euo pipefail
DATA=${1:-../shared/data/ham10000}; OUT=${2:-runs/ham_cpu}; shift $(( $# > 2 ? 2 : $# ))
mkdir -p "$(dirname "$OUT")"
[ -f "$(dirname "$OUT")/ham_train.parquet" ] || dermfusion import isic "$DATA/train.csv" --dataset ham10000 --out "$(dirname "$OUT")/ham_train.parquet" --k 5
[ -f "$(dirname "$OUT")/ham_test.parquet" ] || dermfusion import isic "$DATA/test.csv" --dataset isic2018_test --out "$(dirname "$OUT")/ham_test.parquet"
t0=$(date +%s)
dermfusion train ham10000_cpu --manifest "$(dirname "$OUT")/ham_train.parquet" --out "$OUT" "$@"
t1=$(date +%s)
dermfusion predict "$OUT" --manifest "$(dirname "$OUT")/ham_test.parquet" --out "$OUT.test_predictions.csv" --tta 8
t2=$(date +%s)
{ echo "train (5 folds, OOF with 8x TTA, calibration): $((t1 - t0)) s"
  echo "predict 1512 test images (5 bundles, 8x TTA): $((t2 - t1)) s"
  echo "total: $((t2 - t0)) s  ($(date -u +%FT%TZ), $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs))"; } | tee "$OUT.times.txt"
