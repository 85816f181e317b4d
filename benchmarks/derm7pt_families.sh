#!/usr/bin/env bash
# Issue 30, item 5: the tri-modal fusion network (clinical branch absent) and RemixFormer++'s dermoscopy + metadata
# branches on real Derm7pt images, at the budget of the metadata ablation (benchmarks/derm7pt_metadata_ablation.sh:
# ImageNet EfficientNet-Lite1, 20 epochs, sex / site / elevation tokens), trained on the official training split and
# scored on the validation split (--folds 0). One run at a time, nothing else on the machine.
#   bash benchmarks/derm7pt_families.sh D7_TRAINVAL.parquet [OUT=runs/d7_families]
# Then: python benchmarks/derm7pt_validation.py --manifest D7_TRAINVAL.parquet OUT/trimodal OUT/remixformer
#       dermfusion evaluate --predictions OUT/ARM/oof_balanced.csv --manifest D7_TRAINVAL.parquet \
#         --out OUT/ARM/report --subset-column difficulty
set -euo pipefail
MANIFEST=$(realpath "$1"); OUT=${2:-runs/d7_families}
mkdir -p "$OUT"
for arm in trimodal remixformer; do
  t0=$(date +%s)
  dermfusion train "derm7pt_$arm" --manifest "$MANIFEST" --out "$OUT/$arm" --folds 0
  echo "$arm: $(( $(date +%s) - t0 )) s ($(date -u +%FT%TZ), $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs))" \
    | tee -a "$OUT/times.txt"
done
