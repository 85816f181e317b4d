"""``pretrained_path: bundle:<dir>`` starts an encoder from a trained dermfusion bundle's encoder (strictly)."""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from dermfusion.models.backbones import create_backbone
from dermfusion.models.checkpoint import WeightsNotFoundError

pytestmark = pytest.mark.usefixtures("one_torch_thread")
TINY = {"name": "timm:vit_tiny_patch16_224", "img_size": 64, "patch_size": 16, "depth": 2, "embed_dim": 48,
        "num_heads": 2}


def test_encoder_starts_from_a_bundle(network_run, tmp_path):
    bundle = network_run / "fold_0" / "bundle"
    enc = create_backbone(dict(TINY), pretrained_path=f"bundle:{bundle}")
    saved = load_file(str(bundle / "model.safetensors"))
    mine = enc.model.state_dict()
    assert mine and all(torch.equal(v, saved[f"encoders.dermoscopic.model.{k}"]) for k, v in mine.items())
    with pytest.raises(ValueError, match="no encoder 'clinical'"):
        create_backbone(dict(TINY), pretrained_path=f"bundle:{bundle}#clinical")
    with pytest.raises(WeightsNotFoundError, match="dermfusion bundle"):
        create_backbone(dict(TINY), pretrained_path=f"bundle:{tmp_path}")
