"""Importers: pairing, explicit missing values, labels, the edge cases of real CSVs."""
import numpy as np
import pandas as pd
import pytest

from dermfusion.data.importers import import_derm7pt, import_isic, import_milk10k
from dermfusion.data.importers.common import ImportError_
from dermfusion.data.manifest import concept_columns, load_manifest, save_manifest
from dermfusion.tasks import ISIC2019, MILK10K

MONET = ["MONET_ulceration_crust", "MONET_hair", "MONET_vasculature_vessels", "MONET_erythema",
         "MONET_pigmented", "MONET_gel_water_drop_fluid_dermoscopy_liquid", "MONET_skin_markings_pen_ink_purple_pen"]


def _milk_rows():
    base = {"attribution": "x", "copyright_license": "CC-BY-NC", "image_manipulation": "none", "extra_col": "junk"}
    rows = []
    # lesion A: both images, full metadata
    for t, iid in (("clinical: close-up", "ISIC_1"), ("dermoscopic", "ISIC_2")):
        rows.append({"lesion_id": "IL_A", "image_type": t, "isic_id": iid, "age_approx": "55.0", "sex": "female",
                     "skin_tone_class": "2", "site": "trunk", **{m: 0.1 for m in MONET}, **base})
    # lesion B: dermoscopic only, missing age, unknown site
    rows.append({"lesion_id": "IL_B", "image_type": "dermoscopic", "isic_id": "ISIC_3", "age_approx": "",
                 "sex": "male", "skin_tone_class": "", "site": "elbow_of_mars", **{m: 0.9 for m in MONET}, **base})
    return pd.DataFrame(rows)


def test_milk10k_pairs_views_and_marks_missing(tmp_path):
    meta = tmp_path / "meta.csv"
    _milk_rows().to_csv(meta, index=False)
    gt = tmp_path / "gt.csv"
    g = pd.DataFrame(0.0, index=["IL_A", "IL_B"], columns=MILK10K.classes)
    g.loc["IL_A", "MEL"] = 1.0
    g.loc["IL_B", "NV"] = 1.0
    g.rename_axis("lesion_id").reset_index().to_csv(gt, index=False)
    df = import_milk10k(meta, gt, images_dir=tmp_path / "imgs")
    assert list(df["lesion_id"]) == ["IL_A", "IL_B"]
    assert len(concept_columns(df)) == 14
    a, b = df.iloc[0], df.iloc[1]
    assert a["image_clinical"].endswith("IL_A/ISIC_1.jpg") and a["image_dermoscopic"].endswith("IL_A/ISIC_2.jpg")
    assert b["image_clinical"] == ""                                   # lesion with one image
    assert np.isnan(b["concept_clinical_hair"]) and b["concept_dermoscopic_hair"] == pytest.approx(0.9)
    assert np.isnan(b["age"]) and b["site"] == "" and b["skin_tone"] == ""  # explicit missing values
    assert a["age"] == 55 and a["sex"] == "female" and a["skin_tone"] == "2"
    assert a["label_MEL"] == 1 and b["label_NV"] == 1
    assert "extra_col" not in df.columns                              # extra columns ignored


def test_milk10k_without_images_keeps_ids(tmp_path):
    meta = tmp_path / "meta.csv"
    _milk_rows().to_csv(meta, index=False)
    df = import_milk10k(meta)
    assert (df["image_clinical"] == "").all() and df.loc[0, "isic_id_clinical"] == "ISIC_1"
    assert not any(c.startswith("label_") for c in df.columns)


def test_milk10k_rejects_duplicate_view(tmp_path):
    rows = _milk_rows()
    rows = pd.concat([rows, rows.iloc[[0]]])
    rows.to_csv(tmp_path / "m.csv", index=False)
    with pytest.raises(ImportError_, match="IL_A"):
        import_milk10k(tmp_path / "m.csv")


def test_milk10k_missing_groundtruth_row(tmp_path):
    _milk_rows().to_csv(tmp_path / "m.csv", index=False)
    g = pd.DataFrame(0.0, index=["IL_A"], columns=MILK10K.classes)
    g["MEL"] = 1.0
    g.rename_axis("lesion_id").reset_index().to_csv(tmp_path / "g.csv", index=False)
    with pytest.raises(ImportError_, match="no ground truth"):
        import_milk10k(tmp_path / "m.csv", tmp_path / "g.csv")


def test_isic_ham_style(tmp_path, fixture_dir):
    df = import_isic(fixture_dir / "train.csv", fixture_dir / "images")
    assert len(df) == 48 and df.attrs["task"] == "isic2018"
    assert df["lesion_id"].str.startswith("HAM_").all()
    assert df[[f"label_{c}" for c in ("MEL", "NV")]].notna().all(axis=None)
    assert df["image_dermoscopic"].map(lambda p: p.endswith(".jpg")).all()
    assert set(df["site"]) <= {"head_neck_face", "trunk", "upper_extremity", "lower_extremity", "hand", "foot",
                               "acral", "genital", ""}


def test_isic_unlabelled_uses_image_id(tmp_path):
    pd.DataFrame({"image_id": ["ISIC_9", "ISIC_8"], "image": ["images/ISIC_9.jpg", "images/ISIC_8.jpg"]}).to_csv(
        tmp_path / "test.csv", index=False)
    df = import_isic(tmp_path / "test.csv")
    assert list(df["lesion_id"]) == ["ISIC_9", "ISIC_8"] and not any(c.startswith("label_") for c in df.columns)


def test_isic_repeated_lesion_ids_grouped(tmp_path):
    pd.DataFrame({"image_id": ["I1", "I2", "I3"], "lesion_id": ["L1", "L1", "L2"], "dx": ["nv", "nv", "mel"],
                  "age": [40, 40, -3], "sex": ["male", "male", "unknown"], "localization": ["back", "back", "unknown"]}
                 ).to_csv(tmp_path / "t.csv", index=False)
    df = import_isic(tmp_path / "t.csv")
    assert list(df["lesion_id"]) == ["I1", "I2", "I3"] and list(df["lesion_group"]) == ["L1", "L1", "L2"]
    assert np.isnan(df.loc[2, "age"]) and df.loc[2, "sex"] == "" and df.loc[0, "site"] == "trunk"


def test_isic2019_one_hot_groundtruth(tmp_path):
    g = pd.DataFrame(0.0, index=range(2), columns=[*ISIC2019.classes, "UNK"])
    g.loc[0, "SCC"] = 1
    g.loc[1, "AK"] = 1
    g.insert(0, "image", ["ISIC_1", "ISIC_2"])
    g.to_csv(tmp_path / "gt.csv", index=False)
    df = import_isic(tmp_path / "gt.csv", task="isic2019")
    assert df.loc[0, "label_SCC"] == 1 and df.loc[1, "label_AK"] == 1


def test_isic_unknown_class_is_clear(tmp_path):
    pd.DataFrame({"image_id": ["I1"], "dx": ["xyz"]}).to_csv(tmp_path / "t.csv", index=False)
    with pytest.raises(ImportError_, match="xyz"):
        import_isic(tmp_path / "t.csv")


def test_derm7pt_groups_and_criteria(tmp_path):
    rows = pd.DataFrame({
        "case_num": [1, 2, 3, 4], "image": ["images/a.jpg", "images/b.jpg", "images/c.jpg", "images/d.jpg"],
        "split": ["train", "valid", "test", "train"],
        "diagnosis": ["clark nevus", "melanoma (in situ)", "", "lentigo"],
        "pigment_network": ["typical", "atypical", "", "absent"], "streaks": ["absent"] * 4,
        "location": ["back", "head neck", "acral", "lower limbs"], "sex": ["female", "male", "", "male"]})
    rows.to_csv(tmp_path / "meta.csv", index=False)
    df = import_derm7pt(tmp_path / "meta.csv")
    assert df.loc[0, "label_NEV"] == 1 and df.loc[1, "label_MEL"] == 1 and df.loc[3, "label_MISC"] == 1
    assert np.isnan(df.loc[2, "label_MEL"])  # the test split is unlabelled
    assert df.loc[1, "aux_pigment_network"] == "atypical" and df.loc[0, "diagnosis_fine"] == "clark nevus"
    assert list(df["split"]) == ["train", "valid", "test", "train"]
    assert list(df["site"]) == ["trunk", "head_neck_face", "acral", "lower_extremity"]
    assert list(df["fold"]) == [1, 0, -1, 1]  # the official split as folds: 0 = valid, 1 = train, test none
    assert list(df["source_image"]) == ["images/a.jpg", "images/b.jpg", "images/c.jpg", "images/d.jpg"]
    only = import_derm7pt(tmp_path / "meta.csv", splits=["test"])
    assert list(only["lesion_id"]) == ["D7P_0003"]
    with pytest.raises(ImportError_, match="unknown Derm7pt split"):
        import_derm7pt(tmp_path / "meta.csv", splits=["holdout"])


def test_derm7pt_criteria_grouped_as_published(tmp_path):
    """Published values map onto the paper's grouped labels; the 7-point score adds 2 per major, 1 per minor."""
    from dermfusion.criteria import SEVEN_POINT, seven_point_score

    rows = pd.DataFrame({
        "case_num": [1, 2], "image": ["a.jpg", "b.jpg"], "split": ["train", "train"],
        "diagnosis": ["melanoma", "blue nevus"],
        "pigment_network": ["atypical", "typical"], "streaks": ["irregular", "regular"],
        "pigmentation": ["localized irregular", "diffuse regular"],
        "regression_structures": ["combinations", "absent"], "dots_and_globules": ["irregular", "absent"],
        "blue_whitish_veil": ["present", "absent"], "vascular_structures": ["linear irregular", "within regression"]})
    rows.to_csv(tmp_path / "meta.csv", index=False)
    df = import_derm7pt(tmp_path / "meta.csv")
    got = [{c.name: df.loc[i, f"aux_{c.name}"] for c in SEVEN_POINT} for i in range(2)]
    assert got[0] == {"pigment_network": "atypical", "streaks": "irregular", "pigmentation": "irregular",
                      "regression_structures": "present", "dots_and_globules": "irregular",
                      "blue_whitish_veil": "present", "vascular_structures": "irregular"}
    assert got[1]["pigmentation"] == "regular" and got[1]["vascular_structures"] == "regular"
    assert df.loc[0, "aux_pigmentation_raw"] == "localized irregular"
    assert seven_point_score(got[0]) == 2 + 1 + 1 + 1 + 1 + 2 + 2 and seven_point_score(got[1]) == 0


def test_manifest_round_trip_relative_paths(tmp_path, fixture_dir):
    df = import_isic(fixture_dir / "train.csv", fixture_dir / "images")
    df.loc[:, "image_dermoscopic"] = [f"images/{p.split('/')[-1]}" for p in df["image_dermoscopic"]]
    for ext in ("csv", "parquet"):
        path = save_manifest(df, tmp_path / f"m.{ext}")
        back = load_manifest(path)
        assert back["image_dermoscopic"].iloc[0] == str(tmp_path / df["image_dermoscopic"].iloc[0])
        assert back["lesion_id"].tolist() == df["lesion_id"].tolist()
