#!/usr/bin/env bash
# The issue-18 run, as a new user runs it from the README: import HAM10000 train/test, train the pretrained
# recipe (configs/ham10000_pretrained.yaml, two EfficientNet-Lite0 members) on every training lesion
# (--folds full), predict the 1,512 ISIC 2018 test images, each stage timed; a cold decode cache is part of it.
#   bash benchmarks/ham10000_pretrained.sh [DATA=../shared/data/ham10000] [OUT=runs/final]
# Writes OUT/ (manifests, OUT/ham_pre bundles, OUT/isic2018_test_predictions.csv) and OUT/times.txt.
# Nothing else may run meanwhile: a second torch process on 2 cores slows both several times over.
set -euo pipefail
DATA=${1:-../shared/data/ham10000}; OUT=${2:-runs/final}
rm -rf "$OUT" ~/.cache/dermfusion/decode
mkdir -p "$OUT"
cd "$OUT"
t0=$(date +%s)
dermfusion import isic "$DATA/train.csv" --dataset ham10000 --out ham_train.parquet --k 5
dermfusion import isic "$DATA/test.csv" --dataset isic2018_test --out ham_test.parquet
t1=$(date +%s)
dermfusion train ham10000_pretrained --manifest ham_train.parquet --out ham_pre --folds full --profile
t2=$(date +%s)
dermfusion predict ham_pre --manifest ham_test.parquet --out isic2018_test_predictions.csv
t3=$(date +%s)
{ echo "import: $((t1 - t0)) s"
  echo "train (--folds full, both members): $((t2 - t1)) s"
  echo "predict 1512 test images (config TTA): $((t3 - t2)) s"
  echo "total: $((t3 - t0)) s  ($(date -u +%FT%TZ), $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)," \
       "$(grep -o -w -E 'amx_bf16|avx512_bf16|avx512_vnni|avx2' /proc/cpuinfo | sort -u | tr '\n' ' '))"; } | tee times.txt
