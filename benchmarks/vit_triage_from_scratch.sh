#!/usr/bin/env bash
# Issue 30, item 5: the ViT triage family (`vit_triage`, configs/isic2019_vit_triage.yaml) on real images, FROM
# SCRATCH: no ViT weights install offline here (timm's hub is a download), so the ViT-S/16 starts from random
# weights. HAM10000 / ISIC 2018 labels (task isic2018), fold 0 of the HAM10000 manifest (1,197 validation lesions),
# sized for 2 CPU cores: 112 px (7 × 7 patches), 6 epochs, no EMA (its 1,000-step horizon exceeds the run), no early
# stopping, learning rates for training from scratch, 2 test-time views. A figure of what a user gets without
# weights, not of what the family does with them. Nothing else on the machine.
#   bash benchmarks/vit_triage_from_scratch.sh HAM_TRAIN.parquet [OUT=runs/ham_vit_scratch]
set -euo pipefail
MANIFEST=$(realpath "$1"); OUT=${2:-runs/ham_vit_scratch}
t0=$(date +%s)
dermfusion train isic2019_vit_triage --manifest "$MANIFEST" --out "$OUT" --folds 0 \
  --set task=isic2018 --set model.encoder.pretrained=false --set model.encoder.input_size=112 \
  --set train.epochs=6 --set train.ema=0.0 --set train.early_stopping_patience=0 --set train.precision=fast \
  --set train.tta=2 --set data.num_workers=0 --set data.cache_dir=~/.cache/dermfusion/decode \
  --set optim.lr=0.0005 --set optim.head_lr=0.0005 --set optim.layer_decay=1.0 --set optim.warmup_epochs=1
echo "vit_triage from scratch: $(( $(date +%s) - t0 )) s ($(date -u +%FT%TZ), $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs))" \
  | tee -a "$OUT/times.txt"
