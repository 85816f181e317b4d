"""dermfusion's official scores against ISIC's own scoring package (`isic-challenge-scoring`, PyPI).

What the package (5.x) scores: classification by ``ClassificationScore`` with a target metric of
balanced multi-class accuracy (ISIC 2018 Task 3, ISIC 2019), AUC or average precision (ISIC 2020), and
segmentation (Task 1). It has no MILK10k target metric and its CSV reader requires an ``image`` column,
but every classification score carries a per-category Dice computed exactly by the MILK10k rule
(truth > 0.5, prediction > 0.5, 1.0 when TP + FP + FN = 0): the MILK10k score is checked against that
and against a reference written here from the definition, independent of dermfusion's code.
"""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

pytest.importorskip("isic_challenge_scoring")
from isic_challenge_scoring import ClassificationMetric, ClassificationScore  # noqa: E402
from isic_challenge_scoring import metrics as official_metrics  # noqa: E402
from isic_challenge_scoring.confusion import create_binary_confusion_matrix  # noqa: E402

from dermfusion.evaluation import metrics as M  # noqa: E402
from dermfusion.evaluation.report import align  # noqa: E402
from dermfusion.data.predictions import read_predictions, write_predictions  # noqa: E402
from dermfusion.tasks import ISIC2018, ISIC2019, MILK10K  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::DeprecationWarning")

N = 240


# ---------------------------------------------------------------------------- inputs
def _truth(C: int, seed: int, n: int = N) -> np.ndarray:
    """One-hot truth in which every class occurs (the official scorer's per-class AUC needs that)."""
    rng = np.random.default_rng(seed)
    t = rng.permutation(np.r_[np.arange(C), rng.integers(0, C, n - C)])
    return np.eye(C)[t]


def _predictions(kind: str, y: np.ndarray, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    n, C = y.shape
    t = y.argmax(1)
    if kind == "random":
        return rng.random((n, C))
    if kind == "ties":
        # probabilities on a grid of quarters (many rows with a non-unique maximum), plus rows where the
        # true class ties with another class at the maximum: plain argmax may call those right
        p = np.round(rng.random((n, C)) * 4) / 4
        rows = np.arange(0, n, 3)
        other = (t[rows] + 1 + rng.integers(0, C - 1, len(rows))) % C
        p[rows] = 0.1
        p[rows, t[rows]] = p[rows, other] = 0.4
        return p
    if kind == "all_zero":
        return np.zeros((n, C))
    if kind == "uniform":
        return np.full((n, C), 1.0 / C)
    raise ValueError(kind)


def _frames(task, y, p):
    index = pd.Index([f"ISIC_{i:07d}" for i in range(len(y))], name="image")
    truth = pd.DataFrame(y, index=index, columns=list(task.classes))
    pred = pd.DataFrame(p, index=index, columns=list(task.classes))
    weights = pd.DataFrame({"score_weight": 1.0, "validation_weight": 1.0}, index=index)
    return truth, pred, weights


def _plain_argmax_balanced_accuracy(y, p) -> float:
    """The rule dermfusion used before: ties broken towards the first class."""
    t, pr = y.argmax(1), p.argmax(1)
    return float(np.mean([(pr[t == c] == c).mean() for c in np.unique(t)]))


# ---------------------------------------------------------------------------- ISIC 2018 / 2019
KINDS = ["random", "ties", "all_zero", "uniform"]


@pytest.mark.parametrize("task", [ISIC2018, ISIC2019], ids=lambda t: t.name)
@pytest.mark.parametrize("kind", KINDS)
def test_balanced_accuracy_equals_the_official_scorer(task, kind):
    y = _truth(task.num_classes, seed=len(kind))
    p = _predictions(kind, y, seed=7)
    truth, pred, weights = _frames(task, y, p)
    official = ClassificationScore(truth, pred, weights, ClassificationMetric.BALANCED_ACCURACY).overall
    assert M.balanced_accuracy(y, p) == pytest.approx(official, rel=1e-12, abs=1e-15)
    assert M.official_score(task, y, p) == pytest.approx(official, rel=1e-12, abs=1e-15)
    assert M.balanced_accuracy(y.argmax(1), p) == pytest.approx(official, rel=1e-12, abs=1e-15)  # index labels
    if kind == "random":  # no ties: the same as plain argmax
        assert official == pytest.approx(_plain_argmax_balanced_accuracy(y, p))
    else:  # the inputs discriminate: plain argmax (first of the tied maxima wins) scores differently
        assert official < _plain_argmax_balanced_accuracy(y, p) - 0.01
    if kind in ("all_zero", "uniform"):  # an all-equal row is never right
        assert official == 0.0 and M.balanced_accuracy(y, p) == 0.0


def test_balanced_accuracy_with_a_class_absent_from_the_truth_equals_the_official_scorer():
    y = _truth(7, seed=3)
    y[y[:, 6] == 1] = np.eye(7)[1]  # no VASC: the official mean skips its undefined recall
    for kind in ("random", "ties"):
        p = _predictions(kind, y, seed=11)
        truth, pred, weights = _frames(ISIC2018, y, p)
        official = official_metrics.balanced_multiclass_accuracy(truth, pred, weights.score_weight)
        assert M.balanced_accuracy(y, p) == pytest.approx(official, rel=1e-12)


@pytest.mark.parametrize("kind", ["random", "ties", "all_zero"])
def test_per_class_recalls_confusion_and_operating_points_agree_with_the_headline(kind):
    task = ISIC2018
    y = _truth(task.num_classes, seed=5)
    p = _predictions(kind, y, seed=13)
    m = M.compute_metrics(task, y, p)
    recalls = [m["per_class"][c]["recall"] for c in task.classes]
    assert np.mean(recalls) == pytest.approx(m["balanced_accuracy"])
    cm = np.asarray(m["confusion_matrix"])
    support = y.sum(0)
    tied = M.predicted_class(p) == M.UNDECIDED
    assert cm.sum() == len(y) - tied.sum()  # an undecided row predicts no class
    assert (cm.sum(1) <= support).all() and [m["per_class"][c]["support"] for c in task.classes] == support.tolist()
    np.testing.assert_allclose(recalls, np.diag(cm) / support)
    assert m["accuracy"] == pytest.approx(np.trace(cm) / len(y))
    assert m["melanoma_sensitivity"] == pytest.approx(m["per_class"]["MEL"]["recall"])
    if kind == "all_zero":
        assert m["accuracy"] == m["balanced_accuracy"] == m["melanoma_sensitivity"] == 0.0


@pytest.fixture
def official_csv_reader(monkeypatch):
    """The package's CSV reader (5.6.0) calls ``DataFrame.applymap``, which pandas 3 removed (pandas 2.1
    renamed it ``DataFrame.map``); restore the alias so the official reader runs unchanged."""
    if not hasattr(pd.DataFrame, "applymap"):
        monkeypatch.setattr(pd.DataFrame, "applymap", pd.DataFrame.map, raising=False)


def test_isic2018_predictions_file_is_headed_image_scored_officially_and_read_by_evaluate(tmp_path,
                                                                                          official_csv_reader):
    task = ISIC2018
    y = _truth(task.num_classes, seed=21)
    p = _predictions("ties", y, seed=22)
    p[:20] = np.random.default_rng(23).random((20, task.num_classes))  # values the 6-decimal file rounds
    ids = [f"ISIC_{i:07d}" for i in range(len(y))]
    truth_csv = tmp_path / "truth.csv"
    pd.DataFrame(y, columns=list(task.classes)).assign(image=ids)[["image", *task.classes]].to_csv(truth_csv, index=False)

    pred_csv = write_predictions(tmp_path / "pred.csv", ids, p, task)
    assert pred_csv.read_text().splitlines()[0] == "image," + ",".join(task.classes)

    official = ClassificationScore.from_file(truth_csv, pred_csv, ClassificationMetric.BALANCED_ACCURACY).overall
    manifest = pd.DataFrame({"lesion_id": ids, **{f"label_{c}": y[:, j] for j, c in enumerate(task.classes)}})
    pred, rows, y_true, y_prob = align(pred_csv, manifest, task)
    assert list(pred["lesion_id"]) == ids and list(rows["lesion_id"]) == ids
    assert M.official_score(task, y_true, y_prob) == pytest.approx(official, rel=1e-12)
    assert official < _plain_argmax_balanced_accuracy(y_true, y_prob)  # the file has ties that matter

    # the official reader drops a `.jpg` suffix; so does evaluate's
    df = pd.read_csv(pred_csv, dtype={"image": str})
    df["image"] = df["image"] + ".jpg"
    df.iloc[::-1].to_csv(tmp_path / "pred_jpg.csv", index=False)
    pred2, _, y2, p2 = align(tmp_path / "pred_jpg.csv", manifest, task)
    assert list(pred2["lesion_id"]) == ids[::-1]
    assert M.official_score(task, y2, p2) == pytest.approx(
        ClassificationScore.from_file(truth_csv, tmp_path / "pred_jpg.csv", ClassificationMetric.BALANCED_ACCURACY).overall,
        rel=1e-12)
    assert list(read_predictions(pred_csv, task).columns) == ["lesion_id", *task.classes]


def test_milk10k_predictions_file_keeps_lesion_id(tmp_path):
    p = np.full((2, MILK10K.num_classes), 0.1)
    path = write_predictions(tmp_path / "m.csv", ["IL_0000001", "IL_0000002"], p, MILK10K)
    assert path.read_text().splitlines()[0] == "lesion_id," + ",".join(MILK10K.classes)
    assert read_predictions(path, MILK10K)["lesion_id"].tolist() == ["IL_0000001", "IL_0000002"]


# ---------------------------------------------------------------------------- MILK10k
def _dice_reference(y, p) -> float:
    """The MILK10k score from its definition, written independently of dermfusion."""
    y, p = np.asarray(y, float), np.asarray(p, float)
    scores = []
    for c in range(y.shape[1]):
        tp = fp = fn = 0
        for truth_value, prob in zip(y[:, c], p[:, c]):
            t, q = truth_value > 0.5, prob > 0.5
            tp += t and q
            fp += (not t) and q
            fn += t and not q
        scores.append(1.0 if tp + fp + fn == 0 else 2 * tp / (2 * tp + fp + fn))
    return sum(scores) / len(scores)


def _official_dice(truth: pd.DataFrame, pred: pd.DataFrame) -> float:
    """Mean over classes of the official per-category Dice, as ``ClassificationScore._category_score``
    computes it (without the per-class AUC, which fails for a class absent from the truth)."""
    return float(np.mean([
        official_metrics.binary_dice(create_binary_confusion_matrix(
            truth_binary_values=truth[c].gt(0.5).to_numpy(), prediction_binary_values=pred[c].gt(0.5).to_numpy(),
            weights=np.ones(len(truth)), name=c))
        for c in truth.columns]))


def _milk_predictions(kind: str, y: np.ndarray, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    if kind == "random":  # multi-label probabilities, informative for the true class
        return np.clip(rng.random(y.shape) * 0.9 + 0.35 * y, 0, 1)
    if kind == "ties":  # a grid with many values exactly at the 0.5 cut (0.5 itself is negative)
        return np.round(rng.random(y.shape) * 4) / 4
    if kind == "all_zero":
        return np.zeros(y.shape)
    raise ValueError(kind)


@pytest.mark.parametrize("kind", ["random", "ties", "all_zero"])
def test_milk10k_score_equals_the_official_per_category_dice_and_the_definition(kind):
    y = _truth(MILK10K.num_classes, seed=31)
    p = _milk_predictions(kind, y, seed=32)
    truth, pred, weights = _frames(MILK10K, y, p)
    ours = M.milk10k_score(y, p)
    assert ours == pytest.approx(_dice_reference(y, p), rel=1e-12)
    assert ours == pytest.approx(_official_dice(truth, pred), rel=1e-12)
    # the package's full classification score carries the same Dice per category
    full = ClassificationScore(truth, pred, weights, ClassificationMetric.BALANCED_ACCURACY)
    np.testing.assert_allclose(M.per_class_dice(y, p), full.per_category["dice"].to_numpy(), rtol=1e-12)
    assert ours == pytest.approx(full.macro_average["dice"], rel=1e-12)
    assert M.official_score(MILK10K, y, p) == ours
    if kind == "ties":  # the inputs discriminate: a `>= 0.5` cut would score differently
        assert (p == 0.5).any() and ours != pytest.approx(_dice_reference(y, np.where(p == 0.5, 0.6, p)))
    if kind == "all_zero":
        assert ours == 0.0


def test_milk10k_class_absent_and_never_predicted_scores_one():
    y = _truth(MILK10K.num_classes, seed=41)
    y[y[:, 10] == 1] = np.eye(MILK10K.num_classes)[8]  # no VASC in the truth
    p = _milk_predictions("random", y, seed=42)
    p[:, 10] = 0.2  # and never predicted: its Dice is 1.0
    truth, pred, _ = _frames(MILK10K, y, p)
    assert M.per_class_dice(y, p)[10] == 1.0
    assert M.milk10k_score(y, p) == pytest.approx(_official_dice(truth, pred), rel=1e-12)
    assert M.milk10k_score(y, p) == pytest.approx(_dice_reference(y, p), rel=1e-12)
    p[0, 10] = 0.9  # one false positive: 0
    truth, pred, _ = _frames(MILK10K, y, p)
    assert M.per_class_dice(y, p)[10] == 0.0
    assert M.milk10k_score(y, p) == pytest.approx(_official_dice(truth, pred), rel=1e-12)
