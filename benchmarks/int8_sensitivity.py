"""Why int8 fails the argmax-agreement check on a *random* timm ViT-B/16 pair, and which layers are to blame.

    python benchmarks/int8_sensitivity.py [vit_b16|vit_s16|openclip_b16] [N_LESIONS=64]

Builds the tri-modal benchmark model of `cpu_backends.py` (random weights: no hub here), predicts N real
HAM10000 lesions in fp32, prints how close its own decisions are (top-1 minus top-2 probability), then
quantises the encoders' linears to int8 (dynamic, per-channel weights) with some layers left in fp32 and
prints max / mean probability difference and argmax agreement for each choice. One torch thread.
"""
from __future__ import annotations

import copy
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
warnings.simplefilter("ignore")  # torch.ao.quantization's deprecation notice

from cpu_backends import MODELS, ROOT, build, ham_frame  # noqa: E402
from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic  # noqa: E402

from dermfusion.bench import lesion_frame, real_batches  # noqa: E402
from dermfusion.inference.backends import compare_probs, probs_over
from dermfusion.models.fast_attention import fast_attention_  # noqa: E402
from dermfusion.models.factory import preprocess_of  # noqa: E402


def quantised(model, skip: list[str]):
    m = copy.deepcopy(model)
    fast_attention_(m)
    for k in list(m.encoders.keys()):
        enc = m.encoders[k]
        names = {name for name, mod in enc.named_modules()
                 if isinstance(mod, torch.nn.Linear) and not any(s in name for s in skip)}
        m.encoders[k] = quantize_dynamic(enc, {n: per_channel_dynamic_qconfig for n in names}, dtype=torch.qint8,
                                         inplace=False)
    return m


def main() -> None:
    key = sys.argv[1] if len(sys.argv) > 1 else "vit_b16"
    n = int(sys.argv[2]) if len(sys.argv) > 2 else 64
    torch.set_num_threads(1)
    torch.set_grad_enabled(False)
    model = build(MODELS[key][1])
    pre = preprocess_of(model, model.feature_spec)
    meta, paths = ham_frame(ROOT.parent / "shared" / "data" / "ham10000", n)
    batches = real_batches(model, lesion_frame(paths, model.feature_spec.modalities, meta), pre, 32, task="isic2018")
    t0 = time.time()
    ref = probs_over(model, batches)
    top = np.sort(ref, 1)
    gap = top[:, -1] - top[:, -2]
    print(f"{key}: fp32 pass {time.time() - t0:.0f} s; mean top-1 probability {top[:, -1].mean():.3f} "
          f"(uniform {1 / ref.shape[1]:.3f}); top-1 − top-2 gap: 1st/5th/50th percentile "
          f"{np.quantile(gap, [0.01, 0.05, 0.5]).round(5).tolist()}", flush=True)
    for skip in ([], ["fc2"], ["blocks.0.", "blocks.11."], ["proj"], ["qkv"]):
        res = compare_probs(ref, probs_over(quantised(model, skip), batches))
        print(f"int8 except {skip or 'nothing'}: max Δp {res['max_prob_diff']:.4f}, mean Δp {res['mean_prob_diff']:.5f}, "
              f"argmax agreement {100 * res['argmax_agreement']:.1f} % of {res['n']}", flush=True)


if __name__ == "__main__":
    main()
