"""Derm7pt's extra fields: difficulty (an evaluation subset), elevation (a metadata field a network reads) and
management (the clinicians' decision: kept for analysis, refused as an input); the metadata-fusion config."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import yaml

from dermfusion.config import load_config, resolve_config_path
from dermfusion.data.features import ELEVATIONS, FeatureError, FeatureSpec, SEXES, SITES
from dermfusion.data.importers import import_derm7pt
from dermfusion.tasks import DERM7PT

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _meta(tmp_path, images=None):
    rows = pd.DataFrame({
        "case_num": [1, 2, 3, 4], "image": images or ["images/a.jpg", "images/b.jpg", "images/c.jpg", "images/d.jpg"],
        "split": ["train", "valid", "train", "test"],
        "diagnosis": ["clark nevus", "melanoma (in situ)", "basal cell carcinoma", "seborrheic keratosis"],
        "level_of_diagnostic_difficulty": ["low", "High ", "medium", ""],
        "elevation": ["flat", "nodular", "Palpable", "bumpy"],
        "location": ["back", "head neck", "acral", "lower limbs"], "sex": ["female", "male", "", "male"],
        "management": ["clinical follow up", "excision", "excision", "no further examination"]})
    rows.to_csv(tmp_path / "meta.csv", index=False)
    return tmp_path / "meta.csv"


def test_importer_keeps_difficulty_elevation_and_management_apart(tmp_path):
    df = import_derm7pt(_meta(tmp_path))
    assert list(df["difficulty"]) == ["low", "high", "medium", ""]
    assert list(df["elevation"]) == ["flat", "nodular", "palpable", ""]  # an unknown value is missing, not a level
    assert list(df["management_label_leak"]) == ["clinical follow up", "excision", "excision",
                                                 "no further examination"]
    assert "management" not in df.columns  # never under a name a model could be pointed at by mistake


def test_metadata_fields_choose_the_tokens_and_refuse_label_leaks(tmp_path):
    df = import_derm7pt(_meta(tmp_path))
    default = FeatureSpec.from_manifest(df, ["dermoscopic"])
    assert default.numeric == ["age"] and list(default.categorical) == ["sex", "skin_tone", "site"]
    spec = FeatureSpec.from_manifest(df, ["dermoscopic"], metadata_fields=["sex", "site", "elevation"])
    assert spec.numeric == [] and list(spec.categorical) == ["sex", "site", "elevation"]
    assert spec.categorical["elevation"] == list(ELEVATIONS)
    codes = spec.encode_categorical(df)
    assert codes[:, 2].tolist() == [1, 3, 2, 0]  # flat, nodular, palpable, unknown (0 = masked)
    assert codes[:, 0].tolist() == [SEXES.index("female") + 1, SEXES.index("male") + 1, 0, SEXES.index("male") + 1]
    assert codes[0, 1] == SITES.index("trunk") + 1
    assert FeatureSpec.from_dict(spec.to_dict()) == spec  # stored in the bundle, read back the same
    for leak in ("management", "management_label_leak", "dx_confirmation", "label_MEL"):
        with pytest.raises(FeatureError, match="label leak"):
            FeatureSpec.from_manifest(df, ["dermoscopic"], metadata_fields=["sex", leak])
    with pytest.raises(FeatureError, match="elevation"):  # the message lists what a network can read
        FeatureSpec.from_manifest(df, ["dermoscopic"], metadata_fields=["elevaton"])
    # switched off, the fields are ignored
    assert FeatureSpec.from_manifest(df, ["dermoscopic"], use_metadata=False,
                                     metadata_fields=["elevation"]).categorical == {}


def test_metadata_config_differs_from_the_image_only_one_only_in_its_metadata():
    """The ablation image vs image + metadata: `derm7pt_metadata` is `derm7pt_from_ham` with the metadata on."""
    base = yaml.safe_load(resolve_config_path("derm7pt_from_ham").read_text())
    meta = yaml.safe_load(resolve_config_path("derm7pt_metadata").read_text())
    assert base["model"].pop("use_metadata") is False and base["data"].pop("use_metadata") is False
    assert meta["model"].pop("use_metadata") is True and meta["data"].pop("use_metadata") is True
    assert meta["data"].pop("metadata_fields") == ["sex", "site", "elevation"]
    assert meta["model"].pop("metadata_dropout") == 0.0
    assert {k: v for k, v in base.items() if k != "name"} == {k: v for k, v in meta.items() if k != "name"}


def test_metadata_config_builds_a_network_that_reads_elevation(tmp_path, fixture_dir):
    import torch

    from dermfusion.data.dataset import collate, LesionDataset
    from dermfusion.models.factory import build_model, feature_spec_for, preprocess_of

    src = pd.read_csv(fixture_dir / "train.csv").head(4)
    df = import_derm7pt(_meta(tmp_path, [str(fixture_dir / p) for p in src["image"]]))
    cfg = load_config("derm7pt_metadata", ["model.encoder.name=timm:resnet18", "model.encoder.pretrained_path=null",
                                           "model.encoder.input_size=32", "model.freeze_blocks=0", "data.cache_dir=null"])
    spec = feature_spec_for(cfg, DERM7PT, df)
    assert list(spec.categorical) == ["sex", "site", "elevation"] and spec.numeric == []
    torch.manual_seed(0)
    model = build_model(cfg, DERM7PT, spec).eval()
    pre = preprocess_of(model, spec)
    rows = pd.concat([df.iloc[[0]]] * 3, ignore_index=True)  # one lesion, three elevations
    rows["lesion_id"] = ["a", "b", "c"]
    rows["elevation"] = ["flat", "nodular", ""]
    ds = LesionDataset(rows, DERM7PT, spec, pre, with_targets=False)
    batch = collate([ds[i] for i in range(3)])
    assert batch["categorical"][:, 2].tolist() == [1, 3, 0]
    with torch.no_grad():
        logits = model(batch)["logits"]
    assert not torch.equal(logits[0], logits[1])  # the elevation token reaches the diagnosis
    assert np.isfinite(logits.numpy()).all()  # an unknown elevation is masked, never a NaN


@pytest.mark.parametrize("name, overrides", [
    ("derm7pt_trimodal", ["model.encoder.name=timm:resnet18", "model.encoder.pretrained_path=null",
                          "model.encoder.input_size=32"]),
    ("derm7pt_remixformer", ["model.encoder.dermoscopic.name=timm:resnet18", "model.encoder.dermoscopic.input_size=64",
                             "model.pretrained_path=null", "model.dermoscopic_size=128"]),
])
def test_the_other_families_read_derm7pt_dermoscopy_and_metadata_without_a_clinical_branch(tmp_path, fixture_dir,
                                                                                           name, overrides):
    """The zoo's Derm7pt configs for the tri-modal network and RemixFormer++: dermoscopy only (no clinical photos
    here) plus sex / site / elevation tokens; the elevation reaches the diagnosis."""
    import torch

    from dermfusion.data.dataset import collate, LesionDataset
    from dermfusion.models.factory import build_model, feature_spec_for, preprocess_of

    src = pd.read_csv(fixture_dir / "train.csv").head(4)
    df = import_derm7pt(_meta(tmp_path, [str(fixture_dir / p) for p in src["image"]]))
    cfg = load_config(name, overrides + ["model.freeze_blocks=0", "data.cache_dir=null"])
    spec = feature_spec_for(cfg, DERM7PT, df)
    assert spec.modalities == ["dermoscopic"]
    assert list(spec.categorical) == ["sex", "site", "elevation"] and spec.numeric == []
    torch.manual_seed(0)
    model = build_model(cfg, DERM7PT, spec).eval()
    pre = preprocess_of(model, spec)
    rows = pd.concat([df.iloc[[0]]] * 2, ignore_index=True)
    rows["lesion_id"], rows["elevation"] = ["a", "b"], ["flat", "nodular"]
    ds = LesionDataset(rows, DERM7PT, spec, pre, with_targets=False)
    with torch.no_grad():
        logits = model(collate([ds[i] for i in range(2)]))["logits"]
    assert logits.shape == (2, len(DERM7PT.classes)) and np.isfinite(logits.numpy()).all()
    assert not torch.equal(logits[0], logits[1])
