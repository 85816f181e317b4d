"""Metrics per subset: Derm7pt's difficulty levels (unasked), any column (`--subset-column`), the datasets of a
combined manifest (unasked, with their label provenance)."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from dermfusion.cli import app
from dermfusion.data.manifest import save_manifest
from dermfusion.data.predictions import write_predictions
from dermfusion.evaluation.report import evaluate_predictions
from dermfusion.evaluation.subsets import SubsetError, subset_metrics
from dermfusion.tasks import DERM7PT


def _frame(n_per_level: int = 20, seed: int = 0):
    """A Derm7pt-shaped labelled frame: right on every low-difficulty lesion, wrong on every second high one and on
    every fourth medium one, and a melanoma on every fifth lesion."""
    rng = np.random.default_rng(seed)
    levels = ["high", "low", "medium"] * n_per_level  # deliberately not in the reading order
    n = len(levels)
    cls = np.array([DERM7PT.index("MEL") if i % 5 == 0 else rng.integers(0, 5) for i in range(n)])
    y = np.eye(5)[cls]
    pred = cls.copy()
    for i, lev in enumerate(levels):
        if lev == "high" and i % 2 == 0:
            pred[i] = (cls[i] + 1) % 5
        if lev == "medium" and i % 4 == 2:
            pred[i] = (cls[i] + 2) % 5
    p = 0.05 + 0.75 * np.eye(5)[pred]
    df = pd.DataFrame({"lesion_id": [f"L{i:03d}" for i in range(n)], "dataset": "derm7pt", "difficulty": levels,
                       "site": rng.choice(["trunk", "acral", ""], n), "fold": 0})
    for j, c in enumerate(DERM7PT.classes):
        df[f"label_{c}"] = y[:, j]
    return df, y, p / p.sum(1, keepdims=True)


def test_subset_metrics_per_level():
    df, y, p = _frame()
    sub = subset_metrics(DERM7PT, y, p, df, "difficulty", n_bootstrap=50)
    assert [g["level"] for g in sub["groups"]] == ["low", "medium", "high"]  # the reading order, not the data's
    low, medium, high = sub["groups"]
    assert low["n"] == medium["n"] == high["n"] == 20
    assert low["balanced_accuracy"] == 1.0 and low["melanoma_recall"] == 1.0
    t, q = y.argmax(1), p.argmax(1)
    hi = (df["difficulty"] == "high").to_numpy()
    mel = DERM7PT.index("MEL")
    assert high["melanoma_n"] == int((t[hi] == mel).sum())
    assert high["melanoma_recall"] == pytest.approx(((q == mel) & (t == mel) & hi).sum() / ((t == mel) & hi).sum())
    assert high["balanced_accuracy"] < medium["balanced_accuracy"] < 1.0
    for c in DERM7PT.classes:  # per-class recall: correct / n, with the count
        pc = high["per_class"][c]
        assert pc["n"] == int((t[hi] == DERM7PT.index(c)).sum())
        assert pc["recall"] is None or pc["recall"] == pc["correct"] / pc["n"]
    lo, up = high["balanced_accuracy_ci"]
    assert lo <= high["balanced_accuracy"] <= up and lo < up
    assert sub_is_json_clean(sub)


def sub_is_json_clean(sub) -> bool:
    from dermfusion.evaluation.report_html import jsonable

    json.dumps(jsonable(sub), allow_nan=False)
    return True


def test_subset_column_errors():
    df, y, p = _frame(10)
    with pytest.raises(SubsetError, match="no column 'nope'"):
        subset_metrics(DERM7PT, y, p, df, "nope")
    with pytest.raises(SubsetError, match="categorical"):
        subset_metrics(DERM7PT, y, p, df, "lesion_id")  # 30 distinct values are not levels; 15 are
    assert len(subset_metrics(DERM7PT, y[:15], p[:15], df.head(15), "lesion_id", n_bootstrap=0)["groups"]) == 15


def test_evaluate_reports_difficulty_unasked_and_any_column_on_request(tmp_path):
    df, y, p = _frame()
    res = evaluate_predictions(pd.DataFrame({"lesion_id": df["lesion_id"], **dict(zip(DERM7PT.classes, p.T))}), df,
                               DERM7PT, tmp_path / "a", n_bootstrap=20)
    assert list(res["subsets"]) == ["difficulty"]  # one dataset: no per-dataset split
    html = (tmp_path / "a" / "report.html").read_text()
    assert "Results by difficulty" in html and "Derm7pt marks its atypical lesions" in html
    # through the CLI, with a generic column
    man = save_manifest(df, tmp_path / "m.parquet")
    pred = write_predictions(tmp_path / "p.csv", df["lesion_id"], p, DERM7PT)
    res = CliRunner().invoke(app, ["evaluate", "--predictions", str(pred), "--manifest", str(man), "--out",
                                   str(tmp_path / "b"), "--bootstrap", "10", "--subset-column", "site"])
    assert res.exit_code == 0, res.output
    metrics = json.loads((tmp_path / "b" / "metrics.json").read_text())
    assert list(metrics["subsets"]) == ["difficulty", "site"]
    assert [g["level"] for g in metrics["subsets"]["site"]["groups"]] == ["acral", "trunk", "unknown"]
    assert "by difficulty" in res.output and "Results by site" in (tmp_path / "b" / "report.html").read_text()
    res = CliRunner().invoke(app, ["evaluate", "--predictions", str(pred), "--manifest", str(man), "--out",
                                   str(tmp_path / "c"), "--subset-column", "elevaton"])
    assert res.exit_code != 0 and "no column elevaton" in res.output


def test_a_combined_manifest_is_reported_per_dataset_with_its_provenance(tmp_path):
    df, y, p = _frame()
    df["dataset"] = ["derm7pt", "ham10000"] * (len(df) // 2)
    df["dx_confirmation"] = np.where(np.arange(len(df)) % 4 < 2, "histo", "follow_up")
    res = evaluate_predictions(pd.DataFrame({"lesion_id": df["lesion_id"], **dict(zip(DERM7PT.classes, p.T))}), df,
                               DERM7PT, tmp_path / "a", n_bootstrap=0, provenance_min_class=1)
    assert list(res["subsets"]) == ["difficulty", "dataset"]
    assert [g["n"] for g in res["subsets"]["dataset"]["groups"]] == [30, 30]
    by_ds = res["provenance"]["by_dataset"]
    assert set(by_ds) == {"derm7pt", "ham10000"} and all(v["available"] for v in by_ds.values())
    assert sum(g["n"] for g in by_ds["ham10000"]["groups"]) == 30
    assert "Recall by label provenance — dataset ham10000" in (tmp_path / "a" / "report.html").read_text()
