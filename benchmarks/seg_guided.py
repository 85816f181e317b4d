"""The segmentation-guided dual encoder (``seg_guided_dual``, configs/ham10000_seg_guided.yaml) on a CPU.

    python benchmarks/seg_guided.py speed --csv ../shared/data/ham10000/train.csv --size 192 --steps 6 \
        --variant "model.detach_mask=true"
    python benchmarks/seg_guided.py dice --csv ../shared/data/ham10000/train.csv --train-n 1600 --eval-n 200 \\
        --steps 48 --size 160

``speed``: images/s of steady-state training steps through `dermfusion train` on real images (fold 0, one epoch
capped at ``--steps``, the first step — start-up — left out; read from the fold's log) for the seg-guided config
(``--variant``: more runs with overrides; ``--reference-config``: another config at the same size and batch), and
the cost of the in-model Otsu target masks for one batch of real augmented images.

``dice``: trains the seg-guided config for ``--steps`` steps on ``--train-n`` HAM10000 lesions (real ImageNet
weights), then compares the segmenter's mask (sigmoid > 0.5, upsampled to the image) with the classical Otsu mask
of the full image on ``--eval-n`` held-out images: Dice and IoU (``data.lesion_mask``). There are no expert masks
here: this is *agreement with the fallback the segmenter was trained on*, not segmentation accuracy. The same
measure for the untrained segmenter (ImageNet encoder, random decoder) and for an all-lesion mask gives the scale.

Nothing else may run on the machine meanwhile (two torch processes on 2 cores slow each other many times over).
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from PIL import Image

from dermfusion.data.dataset import LesionDataset, collate
from dermfusion.data.folds import assign_folds
from dermfusion.data.importers import import_isic
from dermfusion.data.lesion_mask import dice, iou, otsu_lesion_mask
from dermfusion.data.manifest import load_manifest, save_manifest
from dermfusion.runtime.device import cpu_name
from dermfusion.tasks import ISIC2018


def manifest(csv: Path, train_n: int, eval_n: int, out: Path, seed: int = 0) -> tuple[Path, pd.DataFrame]:
    """A manifest of ``train_n`` training lesions (folds 1–4) and ``eval_n`` held-out ones (fold 0)."""
    df = assign_folds(import_isic(csv, None, ISIC2018, dataset="ham10000"), ISIC2018, k=5, seed=seed)
    held = df[df["fold"] == 0].sample(eval_n, random_state=seed)
    train = df[df["fold"] != 0].sample(train_n, random_state=seed)
    sub = pd.concat([train, held]).reset_index(drop=True)
    return save_manifest(sub, out), held


def train(config: str, manifest_path: Path, out: Path, size: int, steps: int, batch: int, extra=()) -> dict:
    sets = ["train.epochs=1", f"train.max_steps_per_epoch={steps}", f"train.batch_size={batch}",
            f"train.epoch_sizes=[{size}]", "train.tta=0", "train.validate_every=0", "data.cache_dir=null",
            "data.num_workers=0", *extra]
    cmd = [sys.executable, "-c", "from dermfusion.cli import main; main()", "train", config, "--manifest",
           str(manifest_path), "--out", str(out), "--folds", "0"] + [a for s in sets for a in ("--set", s)]
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, capture_output=True, text=True)
    (log,) = sorted(out.rglob("fold_0/log.jsonl"))  # an ensemble recipe writes member_<i>/fold_0
    rec = json.loads(log.read_text().splitlines()[0])
    steady = rec["compute_s"] + rec["data_wait_s"]
    res = {"config": config, "size": size, "batch": batch, "steps": rec["steps"],
           "images_per_s": round((rec["steps"] - 1) * batch / steady, 2),
           "data_wait_frac": round(rec["data_wait_frac"], 3),
           "loss": rec["loss"], "command_s": round(time.perf_counter() - t0, 1)}
    print(json.dumps(res), file=sys.stderr, flush=True)
    return res


def otsu_cost(model, x: torch.Tensor) -> float:
    """ms to compute the Otsu target masks of one batch of (augmented, normalised) images inside the model."""
    from dermfusion.models.segmenter import fallback_masks

    mean, std = model.whole_mean.flatten().tolist(), model.whole_std.flatten().tolist()
    fallback_masks(x[:2], mean, std, model.mask_work_size)
    t0 = time.perf_counter()
    fallback_masks(x, mean, std, model.mask_work_size)
    return (time.perf_counter() - t0) * 1000


@torch.no_grad()
def agreement(model, held, spec, preprocess, batch: int = 32) -> dict:
    """Dice / IoU of the segmenter's mask against the Otsu mask of the full image, per held-out image."""
    model.eval()
    ds = LesionDataset(held, ISIC2018, spec, preprocess)
    d, j, d_all, area = [], [], [], []
    for start in range(0, len(ds), batch):
        b = collate([ds[i] for i in range(start, min(start + batch, len(ds)))])
        x = b["images"][model.modality]
        probs = torch.sigmoid(model.segment(x, torch.ones(len(x), dtype=torch.bool)))
        probs = F.interpolate(probs, size=x.shape[-2:], mode="bilinear", align_corners=False)
        for r in range(len(x)):
            img = ds.load_image(model.modality, start + r).permute(1, 2, 0).numpy()
            ref = otsu_lesion_mask(img)
            pred = probs[r, 0].numpy() > 0.5
            if pred.shape != ref.shape:  # eval transform resized the image; compare at the model's size
                ref = np.asarray(Image.fromarray(ref).resize(pred.shape[::-1]))
            d.append(dice(pred, ref))
            j.append(iou(pred, ref))
            d_all.append(dice(np.ones_like(ref), ref))
            area.append(float(ref.mean()))
    q = lambda v: [round(float(x), 3) for x in np.percentile(v, [10, 50, 90])]  # noqa: E731
    return {"n": len(d), "dice_mean": round(float(np.mean(d)), 3), "dice_p10_p50_p90": q(d),
            "iou_mean": round(float(np.mean(j)), 3), "all_lesion_mask_dice_mean": round(float(np.mean(d_all)), 3),
            "otsu_area_share_mean": round(float(np.mean(area)), 3)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("what", choices=["speed", "dice"])
    ap.add_argument("--csv", type=Path, required=True)
    ap.add_argument("--config", default="ham10000_seg_guided")
    ap.add_argument("--reference-config", help="speed: also time this config (e.g. ham10000_pretrained)")
    ap.add_argument("--size", type=int, default=192)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--train-n", type=int, default=1600)
    ap.add_argument("--eval-n", type=int, default=200)
    ap.add_argument("--set", action="append", default=[], dest="sets", help="extra config override")
    ap.add_argument("--variant", action="append", default=[],
                    help="speed: one more run of --config with these space-separated overrides (repeatable)")
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    from dermfusion.config import load_config
    from dermfusion.inference import load_predictor
    from dermfusion.models.factory import build_model, feature_spec_for, preprocess_of

    report = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "cpu": cpu_name(),
              "threads": torch.get_num_threads(), "what": args.what}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        n_train = args.train_n if args.what == "dice" else max(args.batch_size * (args.steps + 1), 64)
        path, held = manifest(args.csv, n_train, args.eval_n if args.what == "dice" else 16, tmp / "m.parquet")
        df = load_manifest(path)
        if args.what == "speed":
            runs = [train(args.config, path, tmp / "seg", args.size, args.steps, args.batch_size, args.sets)]
            for i, variant in enumerate(args.variant):
                runs.append({**train(args.config, path, tmp / f"var{i}", args.size, args.steps, args.batch_size,
                                     [*args.sets, *variant.split()]), "variant": variant})
            if args.reference_config:
                runs.append(train(args.reference_config, path, tmp / "ref", args.size, args.steps, args.batch_size,
                                  ["members=[]"]))  # one model, not the recipe's two-member ensemble
            report["runs"] = runs
            cfg = load_config(args.config)
            spec = feature_spec_for(cfg, ISIC2018, df)
            model = build_model(cfg, ISIC2018, spec)
            ds = LesionDataset(df.head(args.batch_size), ISIC2018, spec, preprocess_of(model, spec), train=True)
            x = collate([ds[i] for i in range(len(ds))])["images"][model.modality]
            x = F.interpolate(x, size=(args.size, args.size), mode="bilinear", align_corners=False)
            report["otsu_targets_ms_per_batch"] = round(otsu_cost(model, x), 1)
        else:
            cfg = load_config(args.config, args.sets)
            spec = feature_spec_for(cfg, ISIC2018, df)
            torch.manual_seed(0)
            untrained = build_model(cfg, ISIC2018, spec)
            report["untrained"] = agreement(untrained, held, spec, preprocess_of(untrained, spec))
            t0 = time.perf_counter()
            report["training"] = train(args.config, path, tmp / "run", args.size, args.steps, args.batch_size,
                                       args.sets)
            report["training"]["wall_s"] = round(time.perf_counter() - t0, 1)
            pred = load_predictor(tmp / "run" / "fold_0" / "bundle")
            report["trained"] = agreement(pred.model, held, pred.spec, pred.preprocess)
    print(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
