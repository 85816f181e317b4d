"""Does a run serve the numbers its calibration was fitted on? The training's out-of-fold pass (files through the decode
cache) against `dermfusion predict` (the clinical engine: the path of `gate` and `/v1/analyze`) on the same lesions
with the same fold model.

    python benchmarks/train_serve_agreement.py RUN --manifest M.parquet --fold 0 [--backend fp32] [--out DIR]

Writes the fold's lesions as a manifest, predicts them through `dermfusion predict RUN` (the run's calibration; the
bundle's TTA; `--backend` as given — use the backend the out-of-fold pass ran on, fp32 for an eager pass) and
compares the posteriors with `RUN/oof_calibrated.csv` and the balanced-rule scores with `RUN/oof_balanced.csv`:
largest and mean absolute difference, lesions whose balanced-rule diagnosis differs, balanced accuracy of each.
Only a run with that one fold trained is meaningful (`predict RUN` averages every fold model it finds).
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

from dermfusion.data.manifest import load_manifest
from dermfusion.evaluation.metrics import balanced_accuracy


def by_lesion(frame: pd.DataFrame, manifest: pd.DataFrame, classes: list[str]) -> pd.DataFrame:
    """``frame`` (a predict file keyed by lesion_id or by the dataset's image name) indexed by lesion_id."""
    key = frame.columns[0]
    if key != "lesion_id":
        names = {}
        for col in ("source_image", "image_dermoscopic", "image_clinical"):
            if col in manifest.columns:
                for lid, v in zip(manifest["lesion_id"], manifest[col].astype(str)):
                    names.setdefault(v, lid)
                    names.setdefault(Path(v).name, lid)
                    names.setdefault("/".join(Path(v).parts[-2:]), lid)
        frame = frame.assign(lesion_id=[names.get(str(v), names.get(Path(str(v)).name)) for v in frame[key]])
    return frame.set_index("lesion_id")[classes]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run", type=Path)
    ap.add_argument("--manifest", required=True, type=Path)
    ap.add_argument("--fold", type=int, default=0)
    ap.add_argument("--backend", default="fp32")
    ap.add_argument("--out", type=Path, default=None)
    a = ap.parse_args()
    out = a.out or a.run / f"train_serve_fold{a.fold}"
    out.mkdir(parents=True, exist_ok=True)
    manifest = load_manifest(a.manifest)
    fold = manifest[manifest["fold"] == a.fold]
    fold.to_parquet(out / "fold.parquet", index=False)
    oof_post = pd.read_csv(a.run / "oof_calibrated.csv")
    classes = [c for c in oof_post.columns if c not in ("lesion_id", "fold")]
    oof_post = oof_post[oof_post["fold"] == a.fold].set_index("lesion_id")[classes]
    oof_bal = pd.read_csv(a.run / "oof_balanced.csv")
    oof_bal = oof_bal[oof_bal["fold"] == a.fold].set_index("lesion_id")[classes]

    t0 = time.time()
    subprocess.run(["dermfusion", "predict", str(a.run), "--manifest", str(out / "fold.parquet"),
                    "--out", str(out / "balanced.csv"), "--clinical", str(out / "clinical.csv"),
                    "--backend", a.backend], check=True)
    seconds = time.time() - t0
    served_bal = by_lesion(pd.read_csv(out / "balanced.csv"), fold, classes).loc[oof_bal.index]
    served_post = by_lesion(pd.read_csv(out / "clinical.csv"), fold, classes).loc[oof_post.index]

    label_cols = [f"label_{c}" for c in classes]
    y = fold.set_index("lesion_id").loc[oof_bal.index, label_cols].to_numpy().argmax(1)
    d_post = np.abs(served_post.to_numpy() - oof_post.to_numpy())
    flips = oof_bal.to_numpy().argmax(1) != served_bal.to_numpy().argmax(1)
    report = {"run": str(a.run), "fold": a.fold, "lesions": int(len(oof_post)), "backend": a.backend,
              "posterior_abs_diff_max": float(d_post.max()), "posterior_abs_diff_mean": float(d_post.mean()),
              "balanced_rule_diagnosis_differs": int(flips.sum()),
              "balanced_accuracy_out_of_fold": float(balanced_accuracy(y, oof_bal.to_numpy())),
              "balanced_accuracy_served": float(balanced_accuracy(y, served_bal.to_numpy())),
              "predict_seconds": round(seconds, 1)}
    (out / "agreement.json").write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
