#!/usr/bin/env bash
# The recommended HAM10000 / ISIC 2018 recipe as a new user runs it from the README: import HAM10000 train/test and
# Derm7pt train+valid, add Derm7pt for training only, train the cross-fitted ensemble (3 of 5 folds)
# (configs/ham10000_recommended.yaml), predict the 1,512 ISIC 2018 test images — the official-format file and the
# clinical file — each stage timed; a cold decode cache is part of it.
#   bash benchmarks/ham10000_recommended.sh [DATA=../shared/data] [OUT=runs/recommended]
# Writes OUT/ (manifests, OUT/ham_rec, OUT/isic2018_test_predictions.csv, OUT/isic2018_test_clinical_recipe_alone.csv) and
# OUT/times.txt. Nothing else may run meanwhile: a second torch process on 2 cores slows both several times over.
set -euo pipefail
DATA=$(realpath "${1:-../shared/data}"); OUT=${2:-runs/recommended}
rm -rf "$OUT" ~/.cache/dermfusion/decode
mkdir -p "$OUT"
cd "$OUT"
t0=$(date +%s)
dermfusion import isic "$DATA/ham10000/train.csv" --dataset ham10000 --out ham_train.parquet --k 5
dermfusion import isic "$DATA/ham10000/test.csv" --dataset isic2018_test --out ham_test.parquet
dermfusion import derm7pt "$DATA/derm7pt/meta.csv" --split train,valid --out d7_trainval.parquet
dermfusion data combine ham_train.parquet --add d7_trainval.parquet --label-map derm7pt_to_isic2018 --out ham_d7.parquet
t1=$(date +%s)
dermfusion train ham10000_recommended --manifest ham_d7.parquet --out ham_rec --profile
t2=$(date +%s)
dermfusion predict ham_rec --manifest ham_test.parquet --out isic2018_test_predictions.csv \
  --clinical isic2018_test_clinical_recipe_alone.csv
t3=$(date +%s)
{ echo "import + combine: $((t1 - t0)) s"
  echo "train (3 folds, out-of-fold predictions, calibration, decisions): $((t2 - t1)) s"
  echo "predict 1512 test images (the bundle's 8-view TTA, 3 fold models): $((t3 - t2)) s"
  echo "total: $((t3 - t0)) s  ($(date -u +%FT%TZ), $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)," \
       "$(grep -o -w -E 'amx_bf16|avx512_bf16|avx512_vnni|avx2' /proc/cpuinfo | sort -u | tr '\n' ' '))"; } | tee times.txt
