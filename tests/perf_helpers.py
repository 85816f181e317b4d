"""Tiny models and bundles for the export / backend / bench / backbone tests (no network, seconds on CPU)."""
from __future__ import annotations

import json
from pathlib import Path

import torch

from dermfusion.data.features import FeatureSpec

CONCEPTS = ["concept_clinical_hair", "concept_dermoscopic_hair", "concept_dermoscopic_vessels"]
TINY_ENCODER = {"name": "timm:vit_tiny_patch16_224", "img_size": 32, "patch_size": 8, "depth": 2, "embed_dim": 32,
                "num_heads": 2}


def tiny_spec() -> FeatureSpec:
    """Two image modalities + 3 concepts + age + sex/skin tone/site."""
    return FeatureSpec(modalities=["clinical", "dermoscopic"], concepts=list(CONCEPTS))


def tiny_trimodal(seed: int = 0, num_classes: int = 4, spec: FeatureSpec | None = None):
    from dermfusion.models import create_model

    torch.manual_seed(seed)
    return create_model("trimodal_fusion", num_classes=num_classes, feature_spec=spec or tiny_spec(),
                        encoder=TINY_ENCODER, fusion_dim=32, num_heads=2).eval()


def tiny_batch(model, batch_size: int = 3, seed: int = 0) -> dict:
    """A random batch whose first row has no clinical image (masked)."""
    from dermfusion.export.onnx import synthetic_batch

    batch = synthetic_batch(model, batch_size, seed=seed, missing_image=True)
    assert not batch["image_present"][0, 0]
    return batch


def write_tiny_bundle(out: Path, seed: int = 0) -> Path:
    """An untrained tri-modal network bundle written exactly as FoldTrainer writes one."""
    from safetensors.torch import save_file

    from dermfusion.config import ExperimentConfig
    from dermfusion.bundle import write_bundle
    from dermfusion.tasks import get_task
    from dermfusion.models.factory import build_model, preprocess_of

    cfg = ExperimentConfig.model_validate({
        "name": "tiny_trimodal", "task": "milk10k",
        "model": {"kind": "network", "name": "trimodal_fusion", "encoder": TINY_ENCODER, "fusion_dim": 32,
                  "num_heads": 2}})
    task = get_task(cfg.task)
    spec = tiny_spec()
    torch.manual_seed(seed)
    model = build_model(cfg, task, spec).eval()
    pre = preprocess_of(model, spec)
    config = {"kind": "network", "task": task.name, "name": "tiny_trimodal_fold0",
              "model": {"name": cfg.model.name, **cfg.model_kwargs()}, "feature_spec": spec.to_dict(),
              "preprocess": {m: p.to_dict() for m, p in pre.items()}, "experiment": cfg.model_dump(), "fold": 0}
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    return write_bundle(out, config=config, metrics={},
                        write_model=lambda d: save_file(state, str(d / "model.safetensors"))).path


def tiny_open_clip_dir(path: Path):
    """A tiny randomly initialised open_clip CLIP saved as a local ``open_clip:<dir>`` (config + safetensors) at
    ``path``; returns the model (for the backbone and export tests)."""
    import open_clip
    from safetensors.torch import save_file

    cfg = {"embed_dim": 16,
           "vision_cfg": {"image_size": 32, "layers": 2, "width": 32, "patch_size": 8, "head_width": 16},
           "text_cfg": {"context_length": 8, "vocab_size": 64, "width": 16, "heads": 2, "layers": 1}}
    model = open_clip.CLIP(**cfg)
    path.mkdir()
    (path / "open_clip_config.json").write_text(json.dumps({"model_cfg": cfg, "preprocess_cfg": {}}))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path / "open_clip_model.safetensors"))
    return model
