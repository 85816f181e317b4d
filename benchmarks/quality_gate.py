"""The "cannot assess" gate, measured: false rejections on real dermoscopic images, and what it does with
blank, uniform-colour, degraded and non-skin images.

    python benchmarks/quality_gate.py \\
        --csv ../shared/data/ham10000/test.csv \\
        --train-csv ../shared/data/ham10000/train.csv \\
        --predictions runs/final/isic2018_test_predictions_tta8.csv \\
        --oof runs/expC1/oof_calibrated.csv \\
        [--bundle runs/expC1/fold_0/bundle] [--config service.yaml] [--json out.json]

- ``--csv``: the real images that must pass (columns ``image_id, image``; paths relative to the CSV's folder);
  each image check's false-rejection rate (FRR) is measured on the files themselves.
- ``--train-csv`` (optional): the images the default cut-offs were chosen on; prints each measure's low / high
  quantiles there, the evidence for the defaults.
- ``--oof``: calibrated out-of-fold probabilities of a training run (``oof_calibrated.csv``) → the model check's
  cut, exactly as ``dermfusion train`` stores it (``evaluation.quality_gate.confidence_reference``);
  ``--predictions``: calibrated probabilities of a model for the ``--csv`` images (column ``image`` or
  ``image_id`` + one column per class) → the model check's FRR at each stored OOF level, and the combined FRR.
- ``--bundle`` with a familiarity reference (``embedding_reference.npz``; ``dermfusion bundle reference``): the
  familiarity check's scores and FRR on the ``--csv`` images, and its verdict on every negative.
- negatives: synthetic blank / uniform-colour / noise images, real test images degraded (blurred, under- and
  overexposed), and every 2-D scikit-image sample that loads offline — all reported, none dropped. With
  ``--bundle`` the negatives also go through that model (``load_run``) for the model check.

Image cut-offs come from the service's ``quality`` settings (defaults, or ``--config``).
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image, ImageFilter

from dermfusion.evaluation.quality_gate import (MEASURES, REFERENCE_LEVELS, confidence_reference,
                                                confidence_threshold, image_findings, image_measures)
from dermfusion.runtime.device import cpu_model
from dermfusion.service.config import load_service_config

SKIMAGE_SAMPLES = ("astronaut", "brick", "camera", "cat", "chelsea", "clock", "coffee", "coins", "colorwheel",
                   "grass", "gravel", "horse", "hubble_deep_field", "immunohistochemistry", "logo", "microaneurysms",
                   "moon", "page", "retina", "rocket", "skin", "text")


def read_images(csv: Path) -> pd.DataFrame:
    df = pd.read_csv(csv, dtype=str)
    col = "image" if "image" in df.columns else "image_dermoscopic"
    df["path"] = [str((csv.parent / p).resolve()) if not Path(p).is_absolute() else p for p in df[col]]
    df["key"] = df["image_id"] if "image_id" in df.columns else df["path"].map(lambda p: Path(p).stem)
    return df


def measure_all(paths) -> pd.DataFrame:
    rows = []
    for p in paths:
        with Image.open(p) as im:
            rows.append(image_measures(im))
    return pd.DataFrame(rows)


def findings_of(measures: pd.DataFrame, cuts: dict) -> list[list[str]]:
    return [[c for c, _ in image_findings(dict(r), **cuts)] for r in measures.to_dict("records")]


def probs_frame(path: Path, classes=None) -> tuple[pd.DataFrame, list[str]]:
    df = pd.read_csv(path, dtype={"image": str, "image_id": str, "lesion_id": str})
    meta = {"image", "image_id", "lesion_id", "fold", "split", "dataset"}
    classes = classes or [c for c in df.columns if c not in meta]
    key = next(c for c in ("image", "image_id", "lesion_id") if c in df.columns)
    df["key"] = df[key].astype(str)
    return df, classes


def negatives(real: list[Path]) -> list[tuple[str, Image.Image]]:
    out = [("blank white", Image.new("RGB", (600, 450), (255, 255, 255))),
           ("blank black", Image.new("RGB", (600, 450), (0, 0, 0))),
           ("uniform grey", Image.new("RGB", (600, 450), (128, 128, 128))),
           ("uniform skin colour", Image.new("RGB", (600, 450), (205, 150, 125))),
           ("uniform red", Image.new("RGB", (600, 450), (200, 30, 30))),
           ("uniform blue", Image.new("RGB", (600, 450), (40, 60, 200)))]
    rng = np.random.default_rng(0)
    out.append(("colour noise", Image.fromarray((rng.random((450, 600, 3)) * 255).astype(np.uint8))))
    out.append(("grey noise", Image.fromarray(np.repeat((rng.random((450, 600, 1)) * 255).astype(np.uint8), 3, 2))))
    for p in real[:3]:
        img = Image.open(p).convert("RGB")
        out.append((f"{p.stem} blurred (Gaussian σ=4 px)", img.filter(ImageFilter.GaussianBlur(4))))
        arr = np.asarray(img, dtype=np.float32)
        out.append((f"{p.stem} underexposed (×0.12)", Image.fromarray(np.clip(arr * 0.12, 0, 255).astype(np.uint8))))
        out.append((f"{p.stem} overexposed (×3)", Image.fromarray(np.clip(arr * 3.0, 0, 255).astype(np.uint8))))
    try:
        from skimage import data
    except ImportError:
        print("scikit-image not installed: no scikit-image samples", file=sys.stderr)
        return out
    for name in SKIMAGE_SAMPLES:
        try:
            arr = np.asarray(getattr(data, name)())
        except Exception as e:  # noqa: BLE001 — a sample that needs a download (offline) is reported, not hidden
            out.append((f"skimage.{name} (not loadable: {type(e).__name__})", None))
            continue
        if arr.dtype == bool:
            arr = arr.astype(np.uint8) * 255
        if arr.dtype != np.uint8:
            arr = (255 * (arr - arr.min()) / max(float(arr.max() - arr.min()), 1e-9)).astype(np.uint8)
        if arr.ndim == 2:
            arr = np.repeat(arr[..., None], 3, 2)
        out.append((f"skimage.{name}", Image.fromarray(arr[..., :3])))
    return out


_PREDICTORS: dict = {}


def _predictor(bundle: Path):
    """The bundle's predictor, loaded once per run."""
    from dermfusion.inference import load_run

    if bundle not in _PREDICTORS:
        _PREDICTORS[bundle] = load_run(bundle, device="cpu")
    return _PREDICTORS[bundle]


def model_probs(bundle: Path, images: list) -> np.ndarray:
    """The bundle's calibrated probabilities (no test-time augmentation, as the service) for image files or
    in-memory images (a one-image-per-row manifest)."""
    with tempfile.TemporaryDirectory(prefix="qgate-") as d:
        return np.asarray(_predictor(bundle).predict_proba(_rows(images, d)), dtype=np.float64)


def _rows(images: list, d: str) -> pd.DataFrame:
    rows = []
    for i, img in enumerate(images):
        if isinstance(img, Image.Image):
            path = Path(d) / f"{i}.png"
            img.convert("RGB").save(path)
            img = path
        rows.append({"lesion_id": f"img{i}", "dataset": "bench", "patient_id": "", "split": "", "fold": -1,
                     "image_clinical": "", "image_dermoscopic": str(img), "age": float("nan"), "sex": "",
                     "skin_tone": "", "site": ""})
    return pd.DataFrame(rows)


def model_unfamiliarity(bundle: Path, images: list) -> tuple[np.ndarray, float, dict] | None:
    """(unfamiliarity scores, the default cut, the reference) of the first network of ``bundle`` — None when it
    has no familiarity reference (``dermfusion bundle reference``)."""
    from dermfusion.evaluation.embedding_reference import read_reference, score_threshold, unfamiliarity
    from dermfusion.inference.familiarity import layer_statistics

    net = _predictor(bundle).mixture()[0][1]
    ref = read_reference(net.bundle.path)
    if ref is None:
        return None
    with tempfile.TemporaryDirectory(prefix="qgate-") as d:
        stats, _, _ = layer_statistics(net, _rows(images, d), ref["modality"] or "dermoscopic")
    return unfamiliarity(ref, stats), score_threshold(ref), ref


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--csv", type=Path, required=True, help="real images that must pass (image_id, image)")
    ap.add_argument("--train-csv", type=Path, help="images the cut-offs were chosen on (quantiles printed)")
    ap.add_argument("--predictions", type=Path, help="calibrated probabilities for the --csv images")
    ap.add_argument("--oof", type=Path, help="a run's oof_calibrated.csv (the model check's reference)")
    ap.add_argument("--bundle", type=Path, help="also predict the --csv images and the negatives with this model "
                    "(e.g. the bundle whose out-of-fold predictions --oof holds)")
    ap.add_argument("--config", type=Path, help="service.yaml (quality settings); default: the defaults")
    ap.add_argument("--json", type=Path, help="write the figures here")
    args = ap.parse_args(argv)
    q = load_service_config(args.config, env={}).quality
    cuts = q.image_cuts()
    t0 = time.time()
    print(f"# quality gate benchmark · {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC · CPU {cpu_model()}")
    print("# command: python " + " ".join([sys.argv[0], *(argv if argv is not None else sys.argv[1:])]))
    print("# image cut-offs: " + ", ".join(f"{k}={v:g}" for k, v in cuts.items()))
    report: dict = {"cuts": cuts, "cpu": cpu_model(), "date": datetime.now(timezone.utc).isoformat()}

    if args.train_csv:
        tr = measure_all(read_images(args.train_csv)["path"])
        print(f"\n## measures on {args.train_csv} ({len(tr)} images): quantiles 0 / 0.1 / 0.5 / 1 / 50 / 99 / 99.9 / 100 %")
        levels = [0, 0.001, 0.005, 0.01, 0.5, 0.99, 0.999, 1]
        for m in MEASURES:
            print(f"  {m:<16} " + " ".join(f"{v:8.3f}" for v in np.quantile(tr[m], levels)))
        tr_f = findings_of(tr, cuts)
        print(f"  refused by the image checks: {sum(bool(f) for f in tr_f)} / {len(tr)} "
              f"({100 * np.mean([bool(f) for f in tr_f]):.2f} %)")
        report["train"] = {"n": len(tr), "image_frr": float(np.mean([bool(f) for f in tr_f]))}

    te_df = read_images(args.csv)
    te = measure_all(te_df["path"])
    te_f = findings_of(te, cuts)
    n = len(te)
    print(f"\n## false rejections on {args.csv} ({n} real dermoscopic images)")
    per = {}
    for code in ("blank", "underexposed", "overexposed", "blurred", "not_skin"):
        k = sum(code in f for f in te_f)
        per[code] = k
        print(f"  {code:<14} {k:5d}  {100 * k / n:6.2f} %")
    img_rej = np.array([bool(f) for f in te_f])
    print(f"  {'image checks':<14} {img_rej.sum():5d}  {100 * img_rej.mean():6.2f} %  (any image check)")
    for key, f in [(k, f) for k, f in zip(te_df["key"], te_f) if f][:20]:
        print(f"    refused: {key} ({', '.join(f)})")
    report["test"] = {"n": n, "per_check": per, "image_frr": float(img_rej.mean())}

    thr, model_rej = None, None
    if args.oof:
        oof, classes = probs_frame(args.oof)
        ref = confidence_reference(oof[classes].to_numpy())
        thr = (q.min_top_probability if q.min_top_probability is not None else
               confidence_threshold(ref, q.oof_rejection_rate, q.min_reference_lesions))
        print(f"\n## model check: OOF reference {args.oof} ({ref['n']} lesions, chance {ref['chance']:.3f})")
        report["oof_reference"] = ref
        report["model_check_cut"] = thr
        sources = []
        if args.predictions:
            pr, _ = probs_frame(args.predictions, classes)
            sources.append((str(args.predictions), pr.set_index("key").reindex(te_df["key"])[classes].max(axis=1).to_numpy()))
        if args.bundle:
            t = time.time()
            sources.append((f"{args.bundle} (predicted here, no TTA)", model_probs(args.bundle, list(te_df["path"])).max(1)))
            print(f"  predicted {n} test images with {args.bundle} in {time.time() - t:.0f} s")
        report["model_check"] = {}
        for source, top in sources:
            missing = int(np.isnan(top).sum())
            print(f"  test predictions {source}: {n - missing} of {n} images"
                  + (f" ({missing} missing: counted as passing the model check)" if missing else ""))
            print("  OOF share refused → cut on top probability → test FRR (model check alone / with image checks)")
            rows = []
            for lvl, cut in zip(ref["levels"], ref["quantiles"]):
                m_rej = np.nan_to_num(top, nan=1.0) < cut
                rows.append({"oof_rate": lvl, "cut": cut, "model_frr": float(m_rej.mean()),
                             "combined_frr": float((m_rej | img_rej).mean())})
                mark = "  ← configured" if thr is not None and abs(cut - thr) < 1e-12 else ""
                print(f"  {100 * lvl:5.1f} %  {cut:.3f}  {100 * m_rej.mean():6.2f} %  {100 * (m_rej | img_rej).mean():6.2f} %{mark}")
            entry = report["model_check"][source] = {"levels": rows}
            if thr is not None:
                m_rej = np.nan_to_num(top, nan=1.0) < thr
                comb = m_rej | img_rej
                print(f"  configured cut {thr:.3f} (quality.oof_rejection_rate={q.oof_rejection_rate:g}): model check "
                      f"{m_rej.sum()} ({100 * m_rej.mean():.2f} %), image checks {img_rej.sum()}, "
                      f"combined {comb.sum()} / {n} = {100 * comb.mean():.2f} % refused → {100 * (1 - comb.mean()):.2f} % pass")
                entry.update(model_frr=float(m_rej.mean()), combined_frr=float(comb.mean()))
                model_rej = m_rej

    fam_cut = None
    if args.bundle:
        t = time.time()
        fam = model_unfamiliarity(args.bundle, list(te_df["path"]))
        if fam is None:
            print(f"\n## familiarity check: {args.bundle} has no embedding_reference.npz (dermfusion bundle reference)")
        else:
            scores, fam_cut, ref = fam
            f_rej = scores > fam_cut
            before = img_rej | (model_rej if model_rej is not None else False)
            print(f"\n## familiarity check ({time.time() - t:.0f} s): reference {ref['n']} lesions ({ref['source']}), "
                  f"layers {', '.join(ref['layer_names'])}")
            print("  cross-fitted reference scores, quantiles " + ", ".join(
                f"{100 * lv:g} %: {qv:.2f}" for lv, qv in zip(ref["levels"], ref["quantiles"])))
            print("  test image scores, quantiles " + ", ".join(
                f"{100 * lv:g} %: {qv:.2f}" for lv, qv in zip(ref["levels"], np.quantile(scores, ref["levels"]))))
            print(f"  cut {fam_cut:.2f} (largest reference score × quality.familiarity_margin 1): refuses "
                  f"{f_rej.sum()} / {n} test images ({100 * f_rej.mean():.2f} %); all checks together "
                  f"{(f_rej | before).sum()} = {100 * (f_rej | before).mean():.2f} % refused → "
                  f"{100 * (1 - (f_rej | before).mean()):.2f} % pass")
            for key in te_df["key"][f_rej][:10]:
                print(f"    refused: {key}")
            report["familiarity"] = {"cut": fam_cut, "n_reference": ref["n"], "source": ref["source"],
                                     "test_frr": float(f_rej.mean()), "all_checks_frr": float((f_rej | before).mean()),
                                     "test_quantiles": np.quantile(scores, ref["levels"]).tolist(),
                                     "reference_quantiles": list(map(float, ref["quantiles"]))}

    negs = negatives(list(te_df["path"].map(Path)))
    ok_imgs = [img for _, img in negs if img is not None]
    probs = model_probs(args.bundle, ok_imgs) if args.bundle and ok_imgs else None
    fam_neg = model_unfamiliarity(args.bundle, ok_imgs) if args.bundle and ok_imgs and fam_cut is not None else None
    print("\n## negatives (each must be refused)" + (f"; model: {args.bundle}" if args.bundle else ""))
    print(f"  {'image':<44} {'spread':>6} {'dark':>5} {'bright':>6} {'sharp':>7} {'skin':>5}"
          + ("  top-p" if probs is not None else "") + ("  unfam" if fam_neg is not None else "") + "  → refused by")
    neg_rows, j = [], 0
    for name, img in negs:
        if img is None:
            print(f"  {name:<44} —")
            neg_rows.append({"image": name, "loaded": False})
            continue
        m = image_measures(img)
        codes = [c for c, _ in image_findings(m, **cuts)]
        top = None
        if probs is not None:
            top = float(probs[j].max())
            if thr is not None and top < thr:
                codes.append("model_unsure")
        unfam = None
        if fam_neg is not None:
            unfam = float(fam_neg[0][j])
            if unfam > fam_cut:
                codes.append("unfamiliar")
        j += 1
        print(f"  {name:<44} {m['colour_spread']:6.1f} {m['dark_fraction']:5.2f} {m['bright_fraction']:6.2f} "
              f"{m['sharpness']:7.1f} {m['skin_fraction']:5.2f}" + (f"  {top:.3f}" if top is not None else "")
              + (f"  {unfam:5.2f}" if unfam is not None else "")
              + f"  {', '.join(codes) if codes else 'PASSED (not refused)'}")
        neg_rows.append({"image": name, "loaded": True, **m, "top_probability": top, "unfamiliarity": unfam,
                         "refused_by": codes})
    loaded = [r for r in neg_rows if r["loaded"]]
    refused = sum(bool(r["refused_by"]) for r in loaded)
    print(f"  refused {refused} of {len(loaded)} negatives ({len(neg_rows) - len(loaded)} samples not loadable)")
    report["negatives"] = neg_rows
    print(f"\n# {time.time() - t0:.1f} s")
    if args.json:
        args.json.write_text(json.dumps(report, indent=1, default=float))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
