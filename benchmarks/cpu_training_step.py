"""Training-step throughput of a ResNet-18 on the CPU: fp32 vs bf16 autocast, NCHW vs channels_last.

    python benchmarks/cpu_training_step.py [--size 112] [--batch 64] [--repeats 3]

Why: bf16 is only fast where the CPU has bf16 units (AMX / AVX-512 BF16). On an AVX2-only CPU it is
emulated, and autocast makes training many times slower — which is why `train.precision: fast` picks
bf16 only where it is native. Random inputs (speed does not depend on the pixels).
"""
from __future__ import annotations

import argparse
import time

import timm
import torch
import torch.nn.functional as F

from dermfusion.runtime.device import cpu_flags, native_bf16


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, default=112)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, native bf16: "
          f"{native_bf16(torch.device('cpu'))} ({', '.join(sorted(f for f in cpu_flags() if 'avx512' in f or 'amx' in f)) or 'no AVX-512 / AMX'})")
    model = timm.create_model("resnet18", num_classes=7)
    x = torch.randn(args.batch, 3, args.size, args.size)
    y = torch.randint(0, 7, (args.batch,))
    opt = torch.optim.AdamW(model.parameters())
    for amp in (False, True):
        for channels_last in (False, True):
            fmt = torch.channels_last if channels_last else torch.contiguous_format
            m, xx = model.to(memory_format=fmt), x.contiguous(memory_format=fmt)

            def step():
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
                    loss = F.cross_entropy(m(xx).float(), y)
                loss.backward()
                opt.step()
                opt.zero_grad()

            step()
            t0 = time.perf_counter()
            for _ in range(args.repeats):
                step()
            dt = (time.perf_counter() - t0) / args.repeats
            print(f"{'bf16 autocast' if amp else 'fp32':13s} {'channels_last' if channels_last else 'NCHW':13s} "
                  f"{dt * 1000:7.0f} ms/step  {args.batch / dt:6.1f} lesions/s", flush=True)


if __name__ == "__main__":
    main()
