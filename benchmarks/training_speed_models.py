"""Images/s of one training step, per model config: the network, loss (with the model's own loss terms), optimiser
(AdamW on the layer-wise parameter groups), gradient clipping and precision exactly as `dermfusion train` builds them
from the config, on random images (speed does not depend on the pixels) and random initialisation.

    python benchmarks/training_speed_models.py isic2019_vit_triage "isic2019_vit_triage model.diversity_weight=0" \
        isic2019_resnet18 --size 224 --batch 16 --precision fast

Each positional argument is a config name or YAML path, optionally followed by dotted overrides (as `--set`).
The encoder is built without pretrained weights at ``--size`` px; ``--precision`` is `train.precision` (fast: bf16
autocast where the hardware has bf16 units — AMX / AVX-512 BF16 CPUs, CUDA —, fp32 elsewhere). Every model is
built first and takes one untimed step; then ``--rounds`` rounds time ``--steps`` steps of each model in turn
(round-robin, so a burst of other work on the machine hits all of them alike), and each model's best round is
reported (the least disturbed one). The load average before and after is printed.

Nothing else may run on the machine meanwhile (take the bench lock): two torch processes on 2 cores slow each
other many times over.
"""
from __future__ import annotations

import argparse
import datetime
import shlex
import statistics
import time

import torch

from dermfusion.config import load_config
from dermfusion.data.features import FeatureSpec
from dermfusion.models.factory import build_model
from dermfusion.runtime.device import autocast, autocast_dtype, cpu_name, resolve_device, seed_everything
from dermfusion.tasks import get_task
from dermfusion.training.losses import build_loss
from dermfusion.training.optim import build_param_groups


def make_step(spec: str, size: int, batch: int, precision: str, device: str):
    """(one training step as a function, a description of the model) for a config with overrides."""
    name, *overrides = shlex.split(spec)
    cfg = load_config(name, [*overrides, "model.encoder.pretrained=false", f"model.encoder.input_size={size}",
                             f"train.precision={precision}", f"train.batch_size={batch}"])
    task, dev = get_task(cfg.task), resolve_device(device)
    modality = cfg.model_kwargs().get("modality") or task.modalities[0]
    feats = FeatureSpec(modalities=[modality])
    seed_everything(0)
    model = build_model(cfg, task, feats).to(dev).train()
    channels_last = cfg.train.channels_last
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    loss_cfg = cfg.loss.model_dump()
    loss_fn = build_loss({**loss_cfg, "alpha": None if str(loss_cfg["alpha"]).lower() in {"none", "null"}
                          else loss_cfg["alpha"]}, class_counts=[1.0 + i for i in range(task.num_classes)]).to(dev)
    opt = torch.optim.AdamW(build_param_groups(model, lr=cfg.optim.lr, head_lr=cfg.optim.head_lr,
                                               layer_decay=cfg.optim.layer_decay, weight_decay=cfg.optim.weight_decay),
                            lr=cfg.optim.lr, fused=dev.type == "cuda")
    amp = autocast_dtype(dev, precision)
    x = torch.randn(batch, 3, size, size, device=dev)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    data = {"images": {modality: x}, "image_present": torch.ones(batch, 1, dtype=torch.bool, device=dev),
            "target": torch.nn.functional.one_hot(torch.arange(batch, device=dev) % task.num_classes,
                                                  task.num_classes).float()}
    terms: set[str] = set()

    def step():
        with autocast(dev, amp):
            out = model(data)
            loss, parts = loss_fn(out, data["target"])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        terms.update(parts)

    def sync():
        if dev.type == "cuda":
            torch.cuda.synchronize()

    def timed(steps: int) -> float:
        t0 = time.perf_counter()
        for _ in range(steps):
            step()
        sync()
        return (time.perf_counter() - t0) / steps

    timed(1)  # warm-up: kernels chosen, optimiser state allocated
    return timed, {"config": spec, "model": cfg.model.name, "encoder": cfg.model_kwargs()["encoder"]["name"],
                   "params_m": sum(p.numel() for p in model.parameters()) / 1e6, "dtype": str(amp or torch.float32),
                   "terms": ", ".join(sorted(terms - {"total", "main"})) or "-"}


def loadavg() -> str:
    try:
        return " ".join(open("/proc/loadavg").read().split()[:3])
    except OSError:
        return "?"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("configs", nargs="+", help='config name or path, optionally with overrides: "NAME key=value …"')
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--precision", default="fast", help="train.precision: auto | fast | fp32 | bf16")
    ap.add_argument("--steps", type=int, default=3, help="steps per timing")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    where = torch.cuda.get_device_name() if args.device.startswith("cuda") else cpu_name()
    print(f"# {where} · torch {torch.__version__} · {torch.get_num_threads()} threads · "
          f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC")
    print(f"# {args.size} px, batch {args.batch}, precision {args.precision}, random init, best of {args.rounds} "
          f"round-robin rounds of {args.steps} steps · load average before: {loadavg()}")
    models = [make_step(spec, args.size, args.batch, args.precision, args.device) for spec in args.configs]
    times: list[list[float]] = [[] for _ in models]
    for _ in range(args.rounds):
        for timed, t in zip((m[0] for m in models), times):
            t.append(timed(args.steps))
    print(f"# load average after: {loadavg()}\n")
    print("| config | model | encoder | params (M) | dtype | ms/step best (median) | images/s | extra loss terms |")
    print("|---|---|---|---:|---|---:|---:|---|")
    for (_, r), t in zip(models, times):
        best = min(t)
        print(f"| {r['config']} | {r['model']} | {r['encoder']} | {r['params_m']:.1f} | {r['dtype']} | "
              f"{best * 1000:.0f} ({statistics.median(t) * 1000:.0f}) | {args.batch / best:.1f} | {r['terms']} |")


if __name__ == "__main__":
    main()
