"""CPU inference backends for the tri-modal fusion network, from one run on this machine.

    python benchmarks/cpu_backends.py [--ham ../shared/data/ham10000] [--n 256] [--models vit_s16,vit_b16,openclip_b16]
                                      [--backends fp32,bf16,autocast,int8,onnx,onnx-int8,compile]

Three tri-modal models (two image encoders — clinical + dermoscopic — plus 14 concept tokens and
age/sex/skin tone/site metadata, the MILK10k DermLIP config's fusion: 384-d, 8 heads, 4 pool queries):
timm ViT-S/16, timm ViT-B/16 and open_clip ViT-B/16 (DermLIP's architecture), all randomly
initialised (no hub here). Each runs fp32 eager and every faster backend at batch 1 and 32;
the accuracy check compares each backend's probabilities with fp32 eager *of the same weights* on
real HAM10000 images (the same image fills both views; HAM has no clinical photos).

``--fit-heads N`` (default 512) first trains everything but the encoders — token projections, the three
fusion stages, the heads — on N other HAM10000 lesions from cached fp32 encoder outputs (see fit_heads).
With random heads a deep random ViT's top two classes are near-ties (timm ViT-B/16: median top-1 − top-2
probability 0.003), so any rounding flips ~10 % of argmaxes; with fitted heads the decisions come from
training, as in a deployed bundle. ``--fit-heads 0`` benchmarks the random heads.
On a CPU without bf16 units the bf16 / autocast backends are skipped (emulated bf16 runs ~1 GFLOP/s) and
``compile`` runs in fp32.

Prints markdown tables for BENCHMARKS.md and writes benchmarks/results/cpu_backends_<date>.{json,md}.
An open_clip diagnosis section reproduces the bf16-autocast slow-down and shows the fix.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import time
from pathlib import Path

import pandas as pd
import torch

from dermfusion.bench import bench_model, best_backend, lesion_frame, markdown, matmul_rates, real_batches, save_json
from dermfusion.bench.runner import speedup_ceiling
from dermfusion.data.features import FeatureSpec, canonical_sex, canonical_site
from dermfusion.models import create_model
from dermfusion.models.factory import preprocess_of

ROOT = Path(__file__).resolve().parents[1]
MONET = ("ulceration_crust", "hair", "vessels", "erythema", "pigmented", "gel", "pen_ink")
FUSION = dict(fusion_dim=384, num_heads=8, num_pool_queries=4)   # configs/milk10k_trimodal_dermlip.yaml
MODELS = {
    "vit_s16": ("tri-modal, timm ViT-S/16 ×2", {"name": "timm:vit_small_patch16_224"}),
    "vit_b16": ("tri-modal, timm ViT-B/16 ×2", {"name": "timm:vit_base_patch16_224"}),
    "openclip_b16": ("tri-modal, open_clip ViT-B/16 ×2 (DermLIP architecture)", {"name": "open_clip:ViT-B-16"}),
    "smoke": ("tri-modal, 2-block ViT-Ti (smoke test)", {"name": "timm:vit_tiny_patch16_224", "depth": 2}),
}


def build(encoder: dict, seed: int = 0):
    spec = FeatureSpec(modalities=["clinical", "dermoscopic"],
                       concepts=[f"concept_{m}_{c}" for m in ("clinical", "dermoscopic") for c in MONET])
    torch.manual_seed(seed)
    import logging

    logging.getLogger().setLevel(logging.ERROR)  # open_clip warns that no pretrained weights were loaded
    return create_model("trimodal_fusion", num_classes=11, feature_spec=spec, encoder=encoder, **FUSION).eval()


def ham_frame(ham: Path, n: int) -> tuple[pd.DataFrame, list[Path]]:
    df = pd.read_csv(ham / "train.csv").head(n)
    paths = [ham / p for p in df["image"]]
    meta = pd.DataFrame({"age": df["age"], "sex": [canonical_sex(s) for s in df["sex"]],
                         "site": [canonical_site(s) for s in df["localization"]]})
    return meta, paths


def fit_heads(model, ham: Path, exclude_lesions: set[str], n: int, pre: dict, epochs: int = 20, seed: int = 0,
              log=print) -> dict:
    """Train everything but the two image encoders (token projections, concept/metadata tokens, the three
    fusion stages, the heads) on ``n`` HAM10000 lesions — one image each, none of ``exclude_lesions`` —
    from cached fp32 encoder outputs. The encoders keep their random weights: no trained ViT is reachable
    here, but the model's decisions now come from training, as a deployed bundle's do, instead of from
    random heads whose top classes are near-ties. Returns training facts for the record."""
    from dermfusion.tasks import ISIC2018

    t0 = time.perf_counter()
    df = pd.read_csv(ham / "train.csv")
    df = df[~df["lesion_id"].isin(exclude_lesions)].drop_duplicates("lesion_id")
    df = df.sample(n=min(n, len(df)), random_state=seed).reset_index(drop=True)
    df = df.head(len(df) // 32 * 32)
    meta = pd.DataFrame({"age": df["age"], "sex": [canonical_sex(s) for s in df["sex"]],
                         "site": [canonical_site(s) for s in df["localization"]]})
    batches = real_batches(model, lesion_frame([ham / p for p in df["image"]], model.feature_spec.modalities, meta),
                           pre, 32, task="isic2018")
    y = torch.tensor([ISIC2018.classes.index(d.upper()) for d in df["dx"]]).split(32)
    cached = []
    with torch.no_grad():  # not inference_mode: these tensors feed a backward pass below
        for i, b in enumerate(batches):
            cached.append(model.encode_images(b, model.image_presence(b)))
            log(f"fit-heads: encoded {(i + 1) * 32}/{len(df)} lesions")
    t_encode = time.perf_counter() - t0
    frozen = {name: p.requires_grad for name, p in model.named_parameters()}
    for p in model.encoders.parameters():
        p.requires_grad_(False)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-3, weight_decay=0.01)
    g = torch.Generator().manual_seed(seed)
    model.train()
    losses = []
    try:
        for epoch in range(epochs):
            total = 0.0
            for k in torch.randperm(len(batches), generator=g).tolist():
                model.encode_images = lambda batch, present, enc=cached[k]: enc  # cached encoder outputs
                out = model(batches[k])
                loss = torch.nn.functional.cross_entropy(out["logits"], y[k])
                loss = loss + 0.3 * sum(torch.nn.functional.cross_entropy(a, y[k]) for a in out["aux"].values())
                opt.zero_grad()
                loss.backward()
                opt.step()
                total += float(loss.detach())
            losses.append(total / len(batches))
            log(f"fit-heads: epoch {epoch + 1}/{epochs} loss {losses[-1]:.3f}")
    finally:
        del model.encode_images
        model.eval()
        for name, p in model.named_parameters():
            p.requires_grad_(frozen[name])
    return {"lesions": len(df), "epochs": epochs, "first_loss": losses[0], "last_loss": losses[-1],
            "encode_s": round(t_encode, 1), "wall_s": round(time.perf_counter() - t0, 1)}


def diagnose_open_clip(batch: int = 2) -> dict:
    """open_clip ViT-B/16 encoder alone: where bf16 autocast loses its time, and the fix."""
    import copy

    import open_clip
    from torch.profiler import profile

    from dermfusion.models.fast_attention import fast_attention_

    visual = open_clip.create_model("ViT-B-16").visual.eval()  # parameters require grad, as after loading
    fixed = copy.deepcopy(visual)
    fast_attention_(fixed)
    x = torch.randn(batch, 3, 224, 224)

    def run(model, ctx_name, autocast=False, repeats=2):
        ctx = torch.inference_mode if ctx_name == "inference_mode" else torch.no_grad
        xx = x.to(next(model.parameters()).dtype)  # the whole-bf16 model takes bf16 pixels
        with ctx(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            model(xx)
            t0 = time.perf_counter()
            for _ in range(repeats):
                model(xx)
        return (time.perf_counter() - t0) / repeats * 1000

    out = {"batch": batch}
    out["fp32_ms"] = run(visual, "no_grad")
    out["autocast_no_grad_ms"] = run(visual, "no_grad", True)
    out["autocast_inference_mode_ms"] = run(visual, "inference_mode", True, repeats=1)
    frozen = copy.deepcopy(visual).requires_grad_(False)  # EMA copies / frozen blocks look like this
    out["autocast_no_grad_frozen_params_ms"] = run(frozen, "no_grad", True, repeats=1)
    del frozen
    out["autocast_inference_mode_fixed_ms"] = run(fixed, "inference_mode", True)
    out["whole_bf16_fixed_ms"] = run(copy.deepcopy(fixed).to(torch.bfloat16), "no_grad")
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16), profile(record_shapes=True) as prof:
        visual(x)
    top = sorted(prof.key_averages(group_by_input_shape=True), key=lambda e: -e.self_cpu_time_total)[:5]
    out["slow_path_top_ops"] = [{"op": e.key, "shapes": str(e.input_shapes)[:90], "self_ms": e.self_cpu_time_total / 1000,
                                 "calls": e.count} for e in top]
    return out


def summary_rows(results: dict) -> list[str]:
    lines = ["| model | fp32 eager b=32 (ms) | fastest passing backend b=32 | ms | speed-up | speed-up ceiling | "
             "its floor (ms) | × floor | × machine floor | max Δp | argmax agree | b=1 fastest (ms, speed-up) |",
             "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for key, res in results.items():
        if key.startswith("_"):
            continue
        fp = res["backends"]["fp32"]["batches"].get("32")
        best = best_backend(res, 32)
        b1 = best_backend(res, 1)
        if not fp or not best:
            continue
        st = res["backends"][best]["batches"]["32"]
        acc = res["backends"][best].get("accuracy") or {}
        rates = res["matmul_gflops"]
        machine_floor = res["flops"]["total"] * 32 / (max(v for v in rates.values() if v) * 1e9) * 1000
        s1 = res["backends"][b1]["batches"]["1"]
        ceiling = (res.get("ceiling") or speedup_ceiling(res)).get("32", {}).get("max_speedup", float("nan"))
        lines.append(f"| {res['name']} | {fp['p50_ms']:.0f} | {best} | {st['p50_ms']:.0f} | {st['speedup']:.2f}× | "
                     f"{ceiling:.2f}× | {st['floor_ms']:.0f} | {st['x_floor']:.2f} | {st['p50_ms'] / machine_floor:.2f} | "
                     f"{acc.get('max_prob_diff', float('nan')):.4f} | {100 * acc.get('argmax_agreement', float('nan')):.1f} % "
                     f"| {b1} {s1['p50_ms']:.0f} ms, {s1['speedup']:.2f}× |")
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ham", type=Path, default=ROOT.parent / "shared" / "data" / "ham10000")
    ap.add_argument("--n", type=int, default=256, help="HAM images for the accuracy check (multiple of 32)")
    ap.add_argument("--models", default="vit_s16,vit_b16,openclip_b16")
    ap.add_argument("--backends", default="fp32,bf16,autocast,int8,onnx,onnx-int8,compile")
    ap.add_argument("--slow-check", type=int, default=64,
                    help="lesions for the accuracy check of autocast / onnx (slower, not candidates); 0 = all")
    ap.add_argument("--fit-heads", type=int, default=512,
                    help="train fusion + heads on this many other HAM lesions first (0 = random heads)")
    ap.add_argument("--fit-epochs", type=int, default=15)
    ap.add_argument("--no-diagnose", action="store_true")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    t_start = time.perf_counter()
    meta, paths = ham_frame(args.ham, args.n)
    eval_lesions = set(pd.read_csv(args.ham / "train.csv").head(args.n)["lesion_id"])  # never used for fitting
    backends = [b.strip() for b in args.backends.split(",")]
    print(f"measuring matmul rates ({torch.get_num_threads()} threads)…", flush=True)
    rates = matmul_rates()
    print("  " + ", ".join(f"{k} {v:.0f} GFLOP/s" for k, v in rates.items() if v), flush=True)
    results: dict = {"_rates": rates}
    from dermfusion.runtime.device import native_bf16

    if not args.no_diagnose and not native_bf16(torch.device("cpu")):
        print("open_clip bf16 diagnosis skipped: this CPU has no bf16 units", flush=True)
    elif not args.no_diagnose:
        print("open_clip diagnosis…", flush=True)
        results["_open_clip_diagnosis"] = diagnose_open_clip()
        print(json.dumps(results["_open_clip_diagnosis"], indent=1, default=float), flush=True)
    for key in [m.strip() for m in args.models.split(",")]:
        title, encoder = MODELS[key]
        model = build(encoder)
        pre = preprocess_of(model, model.feature_spec)
        fitted = None
        if args.fit_heads:
            print(f"\n== {title}: fitting fusion + heads on {args.fit_heads} HAM lesions", flush=True)
            fitted = fit_heads(model, args.ham, eval_lesions, args.fit_heads, pre, epochs=args.fit_epochs,
                               log=lambda msg: print(f"  [{time.perf_counter() - t_start:5.0f}s] {msg}", flush=True)
                               if "epoch" in msg or msg.endswith(f" {args.fit_heads // 32 * 32} lesions") else None)
            print(f"  {fitted}", flush=True)
            title = f"{title}, fusion + heads fitted on {fitted['lesions']} HAM lesions"
        frame = lesion_frame(paths, model.feature_spec.modalities, meta)
        batches = real_batches(model, frame, pre, 32, task="isic2018")
        names = list(backends)
        limit = {b: max(1, args.slow_check // 32) for b in ("autocast", "onnx")} if args.slow_check else None
        print(f"\n== {title}: {len(batches) * 32} lesions, backends {names}", flush=True)
        t0 = time.perf_counter()
        res = bench_model(model, backends=names, batch_sizes=[1, 32], eval_batches=batches, repeats={1: 10, 32: 3},
                          budget_s=15, rates=rates, image_paths=paths[:16], preprocess=pre, name=title,
                          eval_limit=limit, backend_options={"onnx": {"exporter": "torchscript"}},
                          log=lambda msg: print(f"  [{time.perf_counter() - t_start:5.0f}s] {msg}", flush=True))
        res["wall_s"] = time.perf_counter() - t0
        res["fitted_heads"] = fitted
        results[key] = res
        print(markdown(res), flush=True)
        del model
    stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%d_%H%M")
    summary = "\n".join(summary_rows(results))
    print("\n### Summary (batch 32; fastest backend that keeps argmax agreement ≥ 99 %)\n")
    print(summary)
    total = time.perf_counter() - t_start
    print(f"\nwhole run: {total:.0f} s")
    results["_wall_s"] = total
    save_json(results, args.out / f"cpu_backends_{stamp}.json")
    md = [f"# CPU backends — {stamp} UTC", "", "## Summary", "", summary, ""]
    md += [markdown(r) for k, r in results.items() if not k.startswith("_")]
    if "_open_clip_diagnosis" in results:
        md += ["## open_clip bf16 autocast diagnosis", "", "```", json.dumps(results["_open_clip_diagnosis"], indent=1,
                                                                               default=float), "```"]
    (args.out / f"cpu_backends_{stamp}.md").write_text("\n".join(md) + "\n")
    print(f"wrote {args.out / f'cpu_backends_{stamp}.json'} and .md")


if __name__ == "__main__":
    main()
