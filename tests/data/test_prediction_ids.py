"""Predictions keyed as the dataset keys its cases: Derm7pt by meta.csv's image path (the committed file's format),
ISIC by the image id; evaluate maps either back onto the manifest's lesions."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from dermfusion.data.importers import import_derm7pt
from dermfusion.data.predictions import (PredictionsError, prediction_ids, read_predictions_csv, to_manifest_ids,
                                         write_predictions)
from dermfusion.tasks import DERM7PT, ISIC2018

COMMITTED = Path(__file__).resolve().parents[2] / "benchmarks" / "results" / "derm7pt_test_predictions.csv"


@pytest.fixture
def d7(tmp_path):
    pd.DataFrame({
        "case_num": [1, 2, 3, 4, 5], "image": [f"images/Nel0{i}.jpg" for i in range(35, 40)],
        "split": ["train", "valid", "valid", "train", "valid"],
        "diagnosis": ["clark nevus", "melanoma", "basal cell carcinoma", "seborrheic keratosis", "lentigo"],
    }).to_csv(tmp_path / "meta.csv", index=False)
    return import_derm7pt(tmp_path / "meta.csv")


def _probs(df, task):
    """Probabilities whose argmax is the true class for every lesion but the last."""
    y = df[task.label_columns()].to_numpy(float)
    p = 0.1 + 0.5 * y
    p[-1] = p[-1][::-1]
    return p / p.sum(1, keepdims=True)


def test_derm7pt_predictions_name_the_image_as_meta_csv_does(d7, tmp_path):
    path = write_predictions(tmp_path / "p.csv", d7["lesion_id"], _probs(d7, DERM7PT), DERM7PT, manifest=d7)
    raw = pd.read_csv(path)
    assert list(raw.columns) == ["image", *DERM7PT.classes]
    assert raw["image"].tolist() == [f"images/Nel0{i}.jpg" for i in range(35, 40)]
    # the committed test predictions are keyed the same way: `image`, meta.csv's relative image path
    committed = pd.read_csv(COMMITTED, nrows=20)
    assert committed.columns[0] == "image" and committed["image"].str.fullmatch(r"images/[^/]+\.jpg").all()
    assert set(DERM7PT.classes) <= set(committed.columns)
    # without the manifest rows the file keeps the lesion ids, under their own header
    plain = pd.read_csv(write_predictions(tmp_path / "q.csv", d7["lesion_id"], _probs(d7, DERM7PT), DERM7PT))
    assert plain.columns[0] == "lesion_id" and plain["lesion_id"].tolist() == d7["lesion_id"].tolist()


def test_prediction_ids_fall_back_and_refuse_what_cannot_key_a_file(d7):
    assert prediction_ids(d7, ISIC2018) == ("image", d7["lesion_id"].tolist())  # ISIC: the lesion (image) id
    no_source = d7.drop(columns=["source_image"])
    assert prediction_ids(no_source, DERM7PT) == ("lesion_id", d7["lesion_id"].tolist())
    partial = d7.assign(source_image=["", *d7["source_image"][1:]])
    assert prediction_ids(partial, DERM7PT)[0] == "lesion_id"  # all rows or none: never a mixed column
    with pytest.raises(PredictionsError, match="repeats"):
        prediction_ids(d7.assign(source_image="images/same.jpg"), DERM7PT)
    with pytest.raises(PredictionsError, match="in order"):
        write_predictions("unused.csv", d7["lesion_id"][::-1], np.zeros((5, 5)), DERM7PT, manifest=d7)


def test_image_keyed_file_reads_back_onto_the_manifest(d7, tmp_path):
    path = write_predictions(tmp_path / "p.csv", d7["lesion_id"], _probs(d7, DERM7PT), DERM7PT, manifest=d7)
    back = to_manifest_ids(read_predictions_csv(path), d7, DERM7PT)
    assert back["lesion_id"].tolist() == d7["lesion_id"].tolist()
    mixed = read_predictions_csv(path).assign(lesion_id=["D7P_0001", *read_predictions_csv(path)["lesion_id"][1:]])
    assert to_manifest_ids(mixed, d7, DERM7PT)["lesion_id"].tolist() == d7["lesion_id"].tolist()


def test_evaluate_scores_an_image_keyed_file_as_the_lesion_keyed_one(d7, tmp_path):
    from dermfusion.evaluation.report import evaluate_predictions

    probs = _probs(d7, DERM7PT)
    by_image = write_predictions(tmp_path / "img.csv", d7["lesion_id"], probs, DERM7PT, manifest=d7)
    by_lesion = write_predictions(tmp_path / "les.csv", d7["lesion_id"], probs, DERM7PT)
    a = evaluate_predictions(read_predictions_csv(by_image), d7, DERM7PT, tmp_path / "a", n_bootstrap=0)
    b = evaluate_predictions(read_predictions_csv(by_lesion), d7, DERM7PT, tmp_path / "b", n_bootstrap=0)
    assert a["n"] == b["n"] == 5 and a["metrics"] == b["metrics"] and a["confusion_matrix"] == b["confusion_matrix"]
    assert json.loads((tmp_path / "a" / "metrics.json").read_text())["metrics"]["accuracy"] == pytest.approx(0.8)
