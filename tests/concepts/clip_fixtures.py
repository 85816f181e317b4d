"""A tiny randomly initialised open_clip CLIP (QuickGELU, OpenAI key layout) for the concept tests."""
from __future__ import annotations

import json
from pathlib import Path

import torch

TINY_CLIP = {"embed_dim": 16, "quick_gelu": True,
             "vision_cfg": {"image_size": 32, "layers": 2, "width": 32, "patch_size": 8, "head_width": 16},
             "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2}}


def tiny_clip_model(seed: int = 0):
    from dermfusion.models.clip_family import build_clip

    torch.manual_seed(seed)
    model = build_clip(TINY_CLIP).eval()
    with torch.no_grad():  # open_clip zero-inits some projections' scale; make every tensor matter
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return model


def save_open_clip_dir(model, root: Path) -> Path:
    from safetensors.torch import save_file

    root.mkdir(parents=True, exist_ok=True)
    cfg = {"model_cfg": TINY_CLIP, "preprocess_cfg": {"size": 32, "mean": [0.48145466, 0.4578275, 0.40821073],
                                                      "std": [0.26862954, 0.26130258, 0.27577711],
                                                      "interpolation": "bicubic", "resize_mode": "shortest"}}
    (root / "open_clip_config.json").write_text(json.dumps(cfg))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(root / "open_clip_model.safetensors"))
    return root
