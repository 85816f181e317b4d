"""remixformer: peak memory of the dermoscopy branch at 1024² (16 windows of 256²) against a plain ViT on the whole
1024² image, and the training speed of the whole network.

    python benchmarks/remixformer_memory.py [--width 384 --depth 12 --heads 6] [--image 1024 --window 256]
        [--attention fused,explicit] [--speed "vit_tiny:448:512:128:4,vit_small:448:1024:256:2"]

Memory: one forward + backward at batch 1 (random pixels, loss = sum of the pooled feature), each measurement in a
fresh process. CPU: peak resident memory during the step above the resident memory before it (model, optimiser-free,
input built) — ``ru_maxrss`` against ``/proc/self/statm``. CUDA (when present): ``max_memory_allocated`` above the
allocation before the step. Both encoders are the same timm ViT (patch 16, ``--width`` / ``--depth`` / ``--heads``):
the window encoder at ``--window``², the plain one at ``--image``² (4,096 patches at 1024²). ``fused``: timm's
default attention (PyTorch SDPA: on this CPU a flash-attention kernel whose memory grows linearly with the tokens);
``explicit``: the attention matrix materialised (what the quadratic memory argument of RemixFormer++ is about; also
what the explainer's attention rollout runs).

Speed: ``name:photo:dermoscopic:window:batch`` — the whole remixformer (both image branches + metadata, 11 classes,
both encoders timm ``vit_<name>_patch16_224`` randomly initialised: the global view at 224² from a photo of
``photo``², the dermoscopic image of ``dermoscopic``² in windows of ``window``²), fp32, one training step (forward,
cross-entropy on the logits and the aux heads, backward, AdamW) at ``batch`` lesions: median of 3 steps after one
warm-up step, in lesions/s (each lesion = 2 images).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from datetime import datetime, timezone

import torch

from dermfusion.data.features import FeatureSpec
from dermfusion.models import create_backbone, create_model
from dermfusion.models.remix_branches import DermoscopyBranch
from dermfusion.runtime.device import cpu_name

ARCH = "timm:vit_base_patch16_224"  # the architecture; width, depth and heads come from the arguments


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _explicit(module: torch.nn.Module) -> None:
    for m in module.modules():
        if hasattr(m, "fused_attn"):
            m.fused_attn = False


def child(kind: str, attention: str, a) -> dict:
    torch.manual_seed(0)
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    vit = dict(embed_dim=a.width, depth=a.depth, num_heads=a.heads, patch_size=16)
    if kind == "windowed":
        enc = create_backbone(ARCH, img_size=a.window, **vit)
        branch = DermoscopyBranch(enc, image_size=a.image, dim=a.width, num_textures=16, texture_scales=(1, 2, 4),
                                  region_depth=2, num_heads=a.heads)
        modules = torch.nn.ModuleList([enc, branch]).to(dev)

        def step(x):
            return branch(enc, x)["global"].sum()
    else:
        enc = create_backbone(ARCH, img_size=a.image, **vit)
        modules = torch.nn.ModuleList([enc]).to(dev)

        def step(x):
            return enc.forward_tokens(x)[1].sum()
    if attention == "explicit":
        _explicit(modules)
    modules.train()
    x = torch.randn(1, 3, a.image, a.image, device=dev)
    if dev.type == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    else:
        base = _rss_mb()
    t = time.perf_counter()
    step(x).backward()
    if dev.type == "cuda":
        torch.cuda.synchronize()
        peak = (torch.cuda.max_memory_allocated() - base) / 2**20
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - base
    return {"kind": kind, "attention": attention, "peak_mb": round(peak, 1), "seconds": round(time.perf_counter() - t, 2),
            "params_m": round(sum(p.numel() for p in modules.parameters()) / 1e6, 2), "device": dev.type}


def speed(spec: str) -> dict:
    name, photo, derm, window, batch = spec.split(":")
    photo, derm, window, batch = int(photo), int(derm), int(window), int(batch)
    torch.manual_seed(0)
    fs = FeatureSpec(modalities=["clinical", "dermoscopic"],
                     concepts=[f"concept_{m}_{i}" for m in ("clinical", "dermoscopic") for i in range(7)])
    arch = f"timm:vit_{name}_patch16_224"
    model = create_model("remixformer", num_classes=11, feature_spec=fs,
                         encoder={"clinical": {"name": arch}, "dermoscopic": {"name": arch, "img_size": window}},
                         clinical_size=photo, dermoscopic_size=derm, num_regions=3, region_fraction=0.375,
                         texture_scales=[1, 2], fusion_dim=192, num_heads=3)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    g = torch.Generator().manual_seed(0)
    batch_d = {"images": {"clinical": torch.randn(batch, 3, photo, photo, generator=g),
                          "dermoscopic": torch.randn(batch, 3, derm, derm, generator=g)},
               "image_present": torch.ones(batch, 2, dtype=torch.bool),
               "concepts": torch.rand(batch, 14, generator=g), "concepts_present": torch.ones(batch, 14, dtype=torch.bool),
               "numeric": torch.rand(batch, 1, generator=g), "numeric_present": torch.ones(batch, 1, dtype=torch.bool),
               "categorical": torch.randint(0, 3, (batch, 3), generator=g)}
    y = torch.randint(0, 11, (batch,), generator=g)
    times = []
    for i in range(4):
        t = time.perf_counter()
        out = model(batch_d)
        loss = torch.nn.functional.cross_entropy(out["logits"], y) + sum(
            torch.nn.functional.cross_entropy(v, y) for v in out["aux"].values())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if i:
            times.append(time.perf_counter() - t)
    s = statistics.median(times)
    return {"spec": spec, "params_m": round(sum(p.numel() for p in model.parameters()) / 1e6, 1),
            "step_s": round(s, 2), "lesions_per_s": round(batch / s, 2)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--width", type=int, default=384)
    ap.add_argument("--depth", type=int, default=12)
    ap.add_argument("--heads", type=int, default=6)
    ap.add_argument("--image", type=int, default=1024)
    ap.add_argument("--window", type=int, default=256)
    ap.add_argument("--attention", default="fused,explicit")
    ap.add_argument("--speed", default="tiny:448:512:128:4,small:448:1024:256:2")
    ap.add_argument("--child", choices=["windowed", "plain"])
    ap.add_argument("--speed-child")
    a = ap.parse_args()
    if a.child:
        print(json.dumps(child(a.child, a.attention, a)))
        return 0
    if a.speed_child:
        print(json.dumps(speed(a.speed_child)))
        return 0
    print(f"{datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC, {cpu_name()}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, CUDA: {torch.cuda.is_available()}")
    print(f"ViT width {a.width}, depth {a.depth}, heads {a.heads}, patch 16; image {a.image}², window {a.window}², batch 1")
    base = [sys.executable, __file__, "--width", str(a.width), "--depth", str(a.depth), "--heads", str(a.heads),
            "--image", str(a.image), "--window", str(a.window)]
    rows = []
    for attention in a.attention.split(","):
        for kind in ("windowed", "plain"):
            out = subprocess.run(base + ["--child", kind, "--attention", attention], capture_output=True, text=True)
            if out.returncode:
                print(out.stderr[-2000:], file=sys.stderr)
                rows.append({"kind": kind, "attention": attention, "peak_mb": float("nan"), "seconds": float("nan")})
                continue
            rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    print("\n| attention | model | params (M) | peak memory fwd+bwd (MB) | fwd+bwd (s) |\n|---|---|---:|---:|---:|")
    for r in rows:
        label = f"dermoscopy branch, {(a.image // a.window) ** 2} windows of {a.window}²" if r["kind"] == "windowed" \
            else f"plain ViT on {a.image}² ({(a.image // 16) ** 2} patches)"
        print(f"| {r['attention']} | {label} | {r.get('params_m', '')} | {r['peak_mb']:,.0f} | {r['seconds']} |")
    if a.speed:
        print("\n| encoders | photo | dermoscopic (window) | batch | params (M) | step (s) | lesions/s |\n"
              "|---|---:|---:|---:|---:|---:|---:|")
        for spec in a.speed.split(","):
            out = subprocess.run([sys.executable, __file__, "--speed-child", spec], capture_output=True, text=True)
            if out.returncode:
                print(out.stderr[-2000:], file=sys.stderr)
                continue
            r = json.loads(out.stdout.strip().splitlines()[-1])
            name, photo, derm, window, batch = spec.split(":")
            print(f"| ViT-{name.capitalize()}/16 ×2 | {photo}² | {derm}² ({window}²) | {batch} | {r['params_m']} | "
                  f"{r['step_s']} | {r['lesions_per_s']} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
