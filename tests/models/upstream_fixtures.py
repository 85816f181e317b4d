"""The upstream architectures as this project describes them (tools/upstream_arch.py), for the tests: full size for
key sets (meta device), reduced widths with real tensors for forward checks."""
from __future__ import annotations

import sys
from pathlib import Path

TOOLS = Path(__file__).resolve().parents[2] / "tools"
if str(TOOLS) not in sys.path:
    sys.path.insert(0, str(TOOLS))

import upstream_arch as U  # noqa: E402

# the reduced-width variants' dimensions, as create_backbone / create_clip options (the names match U.catalogue)
SMALL_B = dict(img_size=32, patch_size=8, depth=2, embed_dim=32, num_heads=2)
SMALL_L = dict(img_size=32, patch_size=8, depth=3, embed_dim=48, num_heads=3)


def small_dermlip_config(embed: int, v: dict, name: str) -> dict:
    """A dermlip_configs/*.json description with the reduced widths of U.catalogue(small=True)."""
    return {"name": name, "hub_id": "test", "embed_dim": embed,
            "vision": {"arch": "vit_base_patch16_224", "image_size": v["img_size"], "patch_size": v["patch_size"],
                       "width": v["embed_dim"], "depth": v["depth"], "heads": v["num_heads"], "head_bias": True},
            "text": {"hf_model_name": "neuml/pubmedbert-base-embeddings", "context_length": 16, "pooler": "mean_pooler",
                     "proj": "mlp"}}


def small_open_clip_config(embed: int, v_width: int, v_heads: int) -> dict:
    """open_clip's config for the reduced OpenAI-CLIP variants (QuickGELU, as the OpenAI-initialised weights)."""
    return {"embed_dim": embed, "quick_gelu": True,
            "vision_cfg": {"image_size": 32, "layers": 2, "width": v_width, "patch_size": 8,
                           "head_width": v_width // v_heads},
            "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2}}
