"""Each foundation encoder's preprocessing is its upstream evaluation code's, pinned to the commit read, and travels
with the model: into the backbone's data config, the bundle's ``Preprocess`` (with its source) and the ONNX metadata.

The references below are the upstream pipelines written out with torchvision on PIL images (what upstream runs);
dermfusion resizes uint8 tensors (antialiased), which differs from PIL's resampling by a few grey levels at most."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms as T
from upstream_fixtures import SMALL_B, SMALL_L, U, small_dermlip_config, small_open_clip_config

from dermfusion.data.transforms import Preprocess, eval_transform
from dermfusion.models import dermlip
from dermfusion.models.backbones import create_backbone
from dermfusion.models.clip_family import create_clip

pytestmark = pytest.mark.usefixtures("one_torch_thread")
IMAGENET_MEAN = (0.485, 0.456, 0.406)


@pytest.fixture(scope="module")
def photo(fixture_dir):
    """A bundled sample photo, upscaled to a camera-like 600×450 so the resizes below really resample."""
    return Image.open(sorted((fixture_dir / "images").glob("*.jpg"))[0]).convert("RGB").resize((600, 450))


def ours(pre: Preprocess, img: Image.Image) -> torch.Tensor:
    return eval_transform(pre)(torch.from_numpy(np.array(img)).permute(2, 0, 1).contiguous())


def close_to(a: torch.Tensor, b: torch.Tensor, std: tuple) -> None:
    """Within 2.5 grey levels on average (in normalised units: / std) and never a shifted crop."""
    assert a.shape == b.shape
    levels = ((a - b).abs() * torch.tensor(std)[:, None, None] * 255)
    assert levels.mean() < 2.5 and np.corrcoef(a.flatten(), b.flatten())[0, 1] > 0.99


@pytest.mark.parametrize("arch,dims", [("vit_base_patch16_224", SMALL_B), ("vit_large_patch16_224", SMALL_L)])
def test_panderm_uses_its_published_evaluation_transform(photo, arch, dims):
    bb = create_backbone({"name": f"panderm:{arch}", **dims})
    dc = dict(bb.data_config, input_size=(3, 224, 224))  # the real input size (the small test ViT takes 32 px)
    pre = Preprocess.from_data_config(dc)
    assert (pre.size, pre.crop_pct, pre.interpolation) == (224, 0.875, "bilinear")
    assert pre.mean == IMAGENET_MEAN and pre.std == (0.228, 0.224, 0.225)  # the std as upstream typed it
    assert pre.source.startswith("SiyuanYan1/PanDerm@97e09d066c61b7d7cb3044a7318f66d8f308a017:"
                                 "classification/models/builder.py")
    upstream = T.Compose([T.Resize(256), T.CenterCrop(224), T.ToTensor(),   # builder.get_eval_transforms
                          T.Normalize(mean=(0.485, 0.456, 0.406), std=(0.228, 0.224, 0.225))])
    close_to(ours(pre, photo), upstream(photo), pre.std)


def test_monet_uses_its_readme_transform(photo, tmp_path):
    ref = U.catalogue(small=True)["monet_vit_l14"]["build"]()
    torch.save(U.random_state_dict(ref), tmp_path / "weight_clip.pt")
    clip = create_clip(f"monet:{tmp_path / 'weight_clip.pt'}", arch=small_open_clip_config(16, 32, 2))
    pre = Preprocess.from_data_config(dict(clip.data_config, input_size=(3, 224, 224)))
    assert (pre.size, pre.crop_pct, pre.interpolation) == (224, 1.0, "bicubic")
    assert pre.mean == IMAGENET_MEAN and pre.std == (0.229, 0.224, 0.225)
    assert "suinleelab/MONET@3ae0a64" in pre.source
    upstream = T.Compose([T.Resize(224, interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(224),  # README
                          lambda im: im.convert("RGB"), T.ToTensor(),
                          T.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))])
    close_to(ours(pre, photo), upstream(photo), pre.std)
    from dermfusion.concepts import ConceptScorer  # the concept scorer preprocesses the same way

    scorer = ConceptScorer(type(clip)(clip.model, clip.tokenizer, dict(clip.data_config, input_size=(3, 224, 224)),
                                      clip.name))
    close_to(scorer.preprocess(photo), upstream(photo), pre.std)


@pytest.mark.parametrize("model,embed,dims", [("PanDerm-base-w-PubMed-256", 16, SMALL_B), ("DermFM-Zero", 20, SMALL_L)])
def test_dermlip_panderm_uses_open_clips_default_unless_the_download_says_otherwise(tmp_path, model, embed, dims):
    ref = U.catalogue(small=True)["dermlip_panderm_base" if "base" in model else "dermfm_zero"]["build"]()
    d = tmp_path / "dl"
    d.mkdir()
    torch.save(U.random_state_dict(ref), d / "open_clip_pytorch_model.bin")
    spec = {"name": f"dermlip:{model}", "arch": small_dermlip_config(embed, dims, model)}
    pre = Preprocess.from_data_config(create_backbone(spec, pretrained_path=d).data_config)
    # the fork trains and evaluates with open_clip's PreprocessCfg defaults
    assert pre.mean == dermlip.OPENAI_MEAN and pre.std == dermlip.OPENAI_STD and pre.interpolation == "bicubic"
    assert pre.crop_pct == 1.0 and pre.source == dermlip.DEFAULT_SOURCE
    (d / "open_clip_config.json").write_text(json.dumps({"model_cfg": {}, "preprocess_cfg": {
        "mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25], "interpolation": "bilinear", "resize_mode": "shortest"}}))
    pre = Preprocess.from_data_config(create_backbone(spec, pretrained_path=d).data_config)
    assert (pre.mean, pre.std, pre.interpolation) == ((0.5,) * 3, (0.25,) * 3, "bilinear")
    assert "open_clip_config.json published with the weights" in pre.source


def test_dermlip_vit_b16_uses_its_open_clip_config(tmp_path):
    ref = U.catalogue(small=True)["dermlip_vit_b16"]["build"]()
    d = tmp_path / "dermlip_vit_b16"
    d.mkdir()
    torch.save(U.random_state_dict(ref), d / "open_clip_pytorch_model.bin")
    (d / "open_clip_config.json").write_text(json.dumps({"model_cfg": small_open_clip_config(24, 48, 3),
                                                          "preprocess_cfg": {"mean": [0.1, 0.2, 0.3],
                                                                             "std": [0.3, 0.2, 0.1]}}))
    dc = create_backbone(f"open_clip:{d}").data_config
    pre = Preprocess.from_data_config(dc)
    assert (pre.mean, pre.std, pre.interpolation, pre.crop_pct) == ((0.1, 0.2, 0.3), (0.3, 0.2, 0.1), "bicubic", 1.0)
    assert str(d / "open_clip_config.json") in pre.source


def test_the_preprocessing_and_its_source_travel_into_the_bundle_and_the_onnx_graph(tmp_path):
    from dermfusion.data.features import FeatureSpec
    from dermfusion.export.onnx import export_onnx, read_metadata
    from dermfusion.models import create_model
    from dermfusion.models.factory import preprocess_of

    spec = FeatureSpec(modalities=["dermoscopic"])
    model = create_model("single_image", num_classes=3, feature_spec=spec,
                         encoder={"name": "panderm:vit_base_patch16_224", **dict(SMALL_B, depth=1)})
    pre = preprocess_of(model, spec)["dermoscopic"]
    saved = pre.to_dict()  # what a bundle's config.yaml holds
    assert saved["crop_pct"] == 0.875 and saved["source"].startswith("SiyuanYan1/PanDerm@97e09d0")
    assert Preprocess(**saved).to_dict() == saved
    old = {k: v for k, v in saved.items() if k != "source"}  # a bundle written before the field existed
    assert Preprocess(**old).source == ""
    export_onnx(model.eval(), tmp_path / "m.onnx", check=False, exporter="torchscript")
    meta = read_metadata(tmp_path / "m.onnx")["dermfusion.preprocess"]["dermoscopic"]
    assert meta["crop_pct"] == 0.875 and meta["std"] == [0.228, 0.224, 0.225] and meta["interpolation"] == "bilinear"
    assert meta["source"] == saved["source"]
