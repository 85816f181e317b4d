"""PAD-UFES-20 importer through the CLI: columns, labels, missing values, patient-grouped folds, clear errors."""
import numpy as np
import pandas as pd
import pytest
from PIL import Image
from typer.testing import CliRunner

from dermfusion.cli.app import app
from dermfusion.data.importers import import_pad_ufes
from dermfusion.data.importers.common import ImportError_
from dermfusion.data.manifest import load_manifest

COLUMNS = ["patient_id", "lesion_id", "smoke", "drink", "background_father", "background_mother", "age",
           "pesticide", "gender", "skin_cancer_history", "cancer_history", "has_piped_water", "has_sewage_system",
           "fitspatrick", "region", "diameter_1", "diameter_2", "diagnostic", "itch", "grew", "hurt", "changed",
           "bleed", "elevation", "img_id", "biopsed"]

# (patient, lesion, image, diagnostic, biopsed, age, gender, fitspatrick, region, itch)
CASES = [
    ("PAT_1", 10, 100, "BCC", "True", "55", "FEMALE", "2.0", "NOSE", "True"),
    ("PAT_1", 10, 101, "BCC", "True", "55", "FEMALE", "2.0", "NOSE", "True"),     # lesion 10: two photos
    ("PAT_1", 11, 102, "ACK", "False", "55", "FEMALE", "2.0", "FOREARM", "UNK"),
    ("PAT_2", 20, 200, "NEV", "False", "", "MALE", "", "BACK", "False"),          # unknown age / skin tone
    ("PAT_2", 21, 201, "SEK", "False", "UNK", "UNK", "UNK", "UNK", "UNK"),         # everything unknown
    ("PAT_2", 22, 202, "MEL", "True", "62", "MALE", "3.0", "CHEST", "False"),
    ("PAT_3", 30, 300, "SCC", "True", "80", "FEMALE", "1.0", "LIP", "True"),
    ("PAT_3", 30, 301, "SCC", "True", "80", "FEMALE", "1.0", "LIP", "True"),      # lesion 30: two photos
    ("PAT_3", 31, 302, "ACK", "False", "80", "FEMALE", "1.0", "HAND", "False"),
    ("PAT_4", 40, 400, "NEV", "False", "30", "MALE", "6.0", "THIGH", "False"),
    ("PAT_4", 41, 401, "MEL", "True", "30", "MALE", "4.0", "ELBOW_OF_MARS", "True"),
    ("PAT_4", 42, 402, "SEK", "", "30", "MALE", "4.0", "FACE", "False"),           # biopsed unknown
]


def _img_id(patient: str, lesion: int, image: int) -> str:
    return f"{patient}_{lesion}_{image}.png"


def _write_dataset(tmp_path, cases=CASES):
    images = tmp_path / "images"
    images.mkdir(exist_ok=True)
    rows, rng = [], np.random.default_rng(0)
    for pat, les, img, dx, biopsed, age, gender, fitz, region, itch in cases:
        name = _img_id(pat, les, img)
        Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)).save(images / name)
        row = dict.fromkeys(COLUMNS, "")
        row.update(patient_id=pat, lesion_id=les, smoke="False", drink="UNK", background_father="POMERANIA",
                   background_mother="UNK", age=age, pesticide="True", gender=gender, skin_cancer_history="False",
                   cancer_history="True", has_piped_water="True", has_sewage_system="False", fitspatrick=fitz,
                   region=region, diameter_1="6.0" if les % 2 else "", diameter_2="4.5" if les % 2 else "UNK",
                   diagnostic=dx, itch=itch, grew="UNK", hurt="False", changed="True", bleed="False",
                   elevation="True", img_id=name, biopsed=biopsed)
        rows.append(row)
    csv = tmp_path / "metadata.csv"
    pd.DataFrame(rows, columns=COLUMNS).to_csv(csv, index=False)
    return csv, images


def _invoke(args):
    res = CliRunner().invoke(app, args)
    return res, res.output + (str(res.exception) if res.exception and not isinstance(res.exception, SystemExit)
                              else "")


def test_pad_ufes_import_via_cli(tmp_path):
    csv, images = _write_dataset(tmp_path)
    out = tmp_path / "pad.parquet"
    res, text = _invoke(["import", "pad-ufes-20", str(csv), "--images", str(images), "--out", str(out)])
    assert res.exit_code == 0, text
    df = load_manifest(out)
    assert len(df) == len(CASES) and df["lesion_id"].is_unique
    assert df.loc[0, "lesion_id"] == "PAT_1_10_100" and df.loc[0, "image_id"] == "PAT_1_10_100"
    assert (df["dataset"] == "pad_ufes_20").all() and (df["image_dermoscopic"] == "").all()
    assert df.loc[0, "image_clinical"] == str((images / "PAT_1_10_100.png").resolve())
    assert list(df["patient_id"]) == [c[0] for c in CASES]
    assert list(df["lesion_group"]) == [str(c[1]) for c in CASES]

    labels = [f"label_{c}" for c in ("ACK", "BCC", "MEL", "NEV", "SCC", "SEK")]
    assert [c for c in df.columns if c.startswith("label_")] == labels
    assert (df[labels].sum(axis=1) == 1).all()
    assert [labels[int(i)].removeprefix("label_") for i in df[labels].to_numpy().argmax(1)] == [c[3] for c in CASES]
    assert list(df["diagnosis_fine"]) == [c[3] for c in CASES]

    # metadata and explicit missing values
    assert df.loc[0, "age"] == 55 and df.loc[0, "sex"] == "female" and df.loc[3, "sex"] == "male"
    assert np.isnan(df.loc[3, "age"]) and np.isnan(df.loc[4, "age"]) and df.loc[4, "sex"] == ""
    assert list(df["skin_tone"]) == ["1", "1", "1", "", "", "2", "0", "0", "0", "5", "3", "3"]  # Fitzpatrick - 1
    assert list(df["site"]) == ["head_neck_face", "head_neck_face", "upper_extremity", "trunk", "", "trunk",
                                "head_neck_face", "head_neck_face", "hand", "lower_extremity", "", "head_neck_face"]
    assert df.loc[0, "pad_region"] == "NOSE" and df.loc[4, "pad_region"] == "" and df.loc[10, "pad_region"] == \
        "ELBOW_OF_MARS"
    assert list(df["dx_confirmation"]) == ["histo" if c[4] == "True" else "consensus" if c[4] == "False" else ""
                                           for c in CASES]

    # the other clinical fields, prefixed pad_
    assert df.loc[0, "pad_itch"] == 1.0 and df.loc[3, "pad_itch"] == 0.0 and np.isnan(df.loc[2, "pad_itch"])
    assert np.isnan(df["pad_drink"]).all() and np.isnan(df["pad_grew"]).all() and (df["pad_smoke"] == 0).all()
    assert df.loc[2, "pad_diameter_1"] == 6.0 and np.isnan(df.loc[0, "pad_diameter_2"])
    assert (df["pad_background_father"] == "POMERANIA").all() and (df["pad_background_mother"] == "").all()
    for name in ("smoke", "pesticide", "skin_cancer_history", "cancer_history", "has_piped_water",
                 "has_sewage_system", "hurt", "changed", "bleed", "elevation"):
        assert f"pad_{name}" in df.columns

    # images present, ids unique: data check has no errors
    res, text = _invoke(["data", "check", str(out)])
    assert res.exit_code == 0, text


def test_pad_ufes_folds_group_patients(tmp_path):
    csv, images = _write_dataset(tmp_path)
    out = tmp_path / "pad.parquet"
    res, text = _invoke(["import", "pad-ufes-20", str(csv), "--images", str(images), "--out", str(out)])
    assert res.exit_code == 0, text
    for seed in (0, 1, 2):
        res, text = _invoke(["folds", str(out), "--k", "2", "--seed", str(seed)])
        assert res.exit_code == 0, text
        df = load_manifest(out)
        assert (df["fold"] >= 0).all() and df["fold"].nunique() == 2
        assert (df.groupby("patient_id")["fold"].nunique() == 1).all()  # no patient in two folds
    # --k at import time does the same
    res, text = _invoke(["import", "pad-ufes-20", str(csv), "--images", str(images), "--out", str(out), "--k", "2"])
    assert res.exit_code == 0, text
    assert (load_manifest(out).groupby("patient_id")["fold"].nunique() == 1).all()


def test_pad_ufes_unknown_diagnosis_is_one_clear_error(tmp_path):
    cases = list(CASES)
    cases[5] = ("PAT_2", 22, 202, "DF", "True", "62", "MALE", "3.0", "CHEST", "False")
    csv, images = _write_dataset(tmp_path, cases)
    with pytest.raises(ImportError_, match=r"unknown diagnostic 'DF' for PAT_2_22_202.png"):
        import_pad_ufes(csv, images)
    res, text = _invoke(["import", "pad-ufes-20", str(csv), "--out", str(tmp_path / "x.parquet")])
    assert res.exit_code != 0 and "DF" in text and "Traceback" not in res.output
    assert not (tmp_path / "x.parquet").exists()


def test_pad_ufes_missing_column_is_clear(tmp_path):
    csv, _ = _write_dataset(tmp_path)
    pd.read_csv(csv, dtype=str).drop(columns=["diagnostic"]).to_csv(csv, index=False)
    with pytest.raises(ImportError_, match="lacks column.*diagnostic"):
        import_pad_ufes(csv)
    res, text = _invoke(["import", "pad-ufes-20", str(csv), "--out", str(tmp_path / "x.parquet")])
    assert res.exit_code != 0 and "diagnostic" in text


def test_pad_ufes_default_images_next_to_csv_and_optional_columns(tmp_path):
    # only the required columns: everything else is missing, images resolved against the CSV's folder
    pd.DataFrame({"patient_id": ["PAT_9"], "lesion_id": ["90"], "img_id": ["PAT_9_90_900.png"],
                  "diagnostic": ["nev"]}).to_csv(tmp_path / "metadata.csv", index=False)
    df = import_pad_ufes(tmp_path / "metadata.csv")
    assert df.loc[0, "image_clinical"] == str(tmp_path.resolve() / "PAT_9_90_900.png")
    assert df.loc[0, "label_NEV"] == 1 and df.loc[0, "dx_confirmation"] == "" and df.loc[0, "skin_tone"] == ""
    assert np.isnan(df.loc[0, "pad_itch"]) and df.loc[0, "site"] == ""
