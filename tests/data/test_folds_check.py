"""Fold invariants and the data check."""
import numpy as np
import pandas as pd
import pytest
from PIL import Image

from dermfusion.data.check import check_manifest
from dermfusion.data.folds import assign_folds, group_keys
from dermfusion.tasks import ISIC2018


def _synthetic(n=400, seed=0):
    rng = np.random.default_rng(seed)
    cls = rng.choice(7, size=n, p=[0.1, 0.6, 0.08, 0.07, 0.08, 0.03, 0.04])
    df = pd.DataFrame({"lesion_id": [f"L{i}" for i in range(n)],
                       "patient_id": [f"P{i // 3}" if i % 5 else "" for i in range(n)],
                       "fold": -1})
    for j, c in enumerate(ISIC2018.classes):
        df[f"label_{c}"] = (cls == j).astype(float)
    return df


def test_no_patient_in_two_folds_and_stratified():
    df = assign_folds(_synthetic(), ISIC2018, k=5, seed=3)
    keys = group_keys(df)
    assert (pd.Series(df["fold"].to_numpy()).groupby(keys).nunique() == 1).all()
    assert set(df["fold"]) == set(range(5))
    y = df[ISIC2018.label_columns()].to_numpy().argmax(1)
    for c in range(7):
        per_fold = np.bincount(df["fold"][y == c], minlength=5)
        assert per_fold.max() - per_fold.min() <= max(3, 0.35 * per_fold.mean())  # rare classes spread


def test_folds_deterministic():
    a = assign_folds(_synthetic(), ISIC2018, k=5, seed=1)["fold"].tolist()
    b = assign_folds(_synthetic(), ISIC2018, k=5, seed=1)["fold"].tolist()
    c = assign_folds(_synthetic(), ISIC2018, k=5, seed=2)["fold"].tolist()
    assert a == b and a != c


def test_unlabelled_rows_keep_no_fold():
    df = _synthetic(50)
    df.loc[:4, ISIC2018.label_columns()] = np.nan
    out = assign_folds(df, ISIC2018, k=2)
    assert (out.loc[:4, "fold"] == -1).all() and (out.loc[5:, "fold"] >= 0).all()


def _manifest_with_images(tmp_path, n=6):
    rows = []
    for i in range(n):
        p = tmp_path / f"img{i}.jpg"
        Image.new("RGB", (16, 16), (i * 20, 10, 10)).save(p)
        rows.append({"lesion_id": f"L{i}", "image_dermoscopic": str(p), "image_clinical": "", "age": 50.0,
                     "sex": "male", "skin_tone": "", "site": "trunk", "fold": i % 2, "patient_id": ""})
    df = pd.DataFrame(rows)
    for j, c in enumerate(ISIC2018.classes):
        df[f"label_{c}"] = [1.0 if (i % 7) == j else 0.0 for i in range(n)]
    return df


def test_check_clean(tmp_path):
    rep = check_manifest(_manifest_with_images(tmp_path))
    assert not rep.errors and rep.images_checked == 6


def test_check_finds_every_problem(tmp_path):
    df = _manifest_with_images(tmp_path)
    (tmp_path / "img1.jpg").write_text("not an image")
    df.loc[2, "image_dermoscopic"] = str(tmp_path / "gone.jpg")
    df.loc[3, "image_dermoscopic"] = df.loc[4, "image_dermoscopic"]          # one image, two lesions
    df.loc[5, "lesion_id"] = "L0"                                             # duplicate id
    df.loc[0, "age"] = 150                                                    # out of range
    df["patient_id"] = ["P1", "P1", "", "", "", ""]                           # P1 in folds 0 and 1
    rep = check_manifest(df)
    checks = {f.check for f in rep.errors}
    assert {"duplicate lesion ids", "missing images", "unreadable images", "image used twice",
            "fold leakage", "age out of range"} <= checks
    unreadable = next(f for f in rep.errors if f.check == "unreadable images")
    assert "img1.jpg" in unreadable.message
