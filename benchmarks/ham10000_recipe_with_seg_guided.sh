#!/usr/bin/env bash
# The recommended ISIC 2018 recipe with the segmentation-guided dual encoder beside it (issues 29 and 30): train the
# segmentation-guided network on the same three HAM10000 folds at the CPU budget (4 epochs, 160 → 192 px), blend it
# with the recipe's run (`dermfusion ensemble`: weights on out-of-fold log loss, then a run's whole calibration — the
# posteriors, the balanced rule, the operating point, the conformal differential — fitted on the blend's out-of-fold
# output), predict the 1,512 ISIC 2018 test images, and print the out-of-fold clinical figures of the blend and of
# the recipe alone. Nothing is fitted on a test image.
#   bash benchmarks/ham10000_recipe_with_seg_guided.sh [RUNS=runs] [MANIFESTS=runs/data]
# Needs RUNS/ham_rec (bash benchmarks/ham10000_recommended.sh, or the README's recipe) and the manifests it used
# (ham_train.parquet, ham_d7_train.parquet, ham_test.parquet). Writes RUNS/ham_seg, RUNS/ham_rec_seg, RUNS/out/ and
# RUNS/out/rec_seg_times.txt. Nothing else may run meanwhile (two torch processes on 2 cores slow both).
set -euo pipefail
RUNS=${1:-runs}; M=${2:-runs/data}
mkdir -p "$RUNS/out"
t0=$(date +%s)
dermfusion train ham10000_seg_guided --manifest "$M/ham_train.parquet" --out "$RUNS/ham_seg" --folds 0,1,2 \
  --set train.epochs=4 --set "train.epoch_sizes=[160,160,160,192]"
t1=$(date +%s)
dermfusion ensemble "$RUNS/ham_rec" "$RUNS/ham_seg" --manifest "$M/ham_d7_train.parquet" --out "$RUNS/ham_rec_seg"
# the operating point for 95 % of melanomas *and* 95 % of all malignant lesions (BCC, AKIEC too): the recipe's
# melanoma-only target lets the blend refer BCCs and AKIECs only through P(MEL) (malignant sensitivity 0.715 out of fold)
dermfusion operating-point "$RUNS/ham_rec_seg" --manifest "$M/ham_d7_train.parquet" \
  --melanoma-sensitivity 0.95 --malignant-sensitivity 0.95
t2=$(date +%s)
dermfusion predict "$RUNS/ham_rec_seg" --manifest "$M/ham_test.parquet" \
  --out "$RUNS/out/isic2018_test_predictions_rec_seg.csv" --clinical "$RUNS/out/isic2018_test_clinical.csv"
t3=$(date +%s)
python benchmarks/clinical_decisions.py --run "$RUNS/ham_rec_seg" --manifest "$M/ham_d7_train.parquet" \
  --test-clinical "$RUNS/out/isic2018_test_clinical.csv" --markdown "$RUNS/out/rec_seg_clinical.md"
python benchmarks/melanoma_vs_rest_ablation.py --manifest "$M/ham_d7_train.parquet" "$RUNS/ham_rec" "$RUNS/ham_rec_seg" \
  --markdown "$RUNS/out/rec_vs_rec_seg.md"
{ echo "train ham10000_seg_guided, folds 0-2 (4 epochs): $((t1 - t0)) s"
  echo "ensemble (weights, calibration, decisions) + operating point: $((t2 - t1)) s"
  echo "predict 1512 test images (6 networks, 8 views): $((t3 - t2)) s"
  echo "($(date -u +%FT%TZ), $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)," \
       "$(grep -o -w -E 'amx_bf16|avx512_bf16|avx512_vnni|avx2' /proc/cpuinfo | sort -u | tr '\n' ' '))"; } \
  | tee "$RUNS/out/rec_seg_times.txt"
