"""Metrics: the MILK10k rule's edge cases and agreement with independent (sklearn) computations."""
import numpy as np
import pytest
from sklearn.metrics import average_precision_score, balanced_accuracy_score, f1_score, roc_auc_score

from dermfusion.evaluation import metrics as M
from dermfusion.tasks import ISIC2018, MILK10K


def _random(n=400, C=7, seed=0, signal=1.5):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, C, n)
    z = rng.normal(size=(n, C))
    z[np.arange(n), y] += signal
    p = np.exp(z) / np.exp(z).sum(1, keepdims=True)
    return np.eye(C)[y], p


# ---------------------------------------------------------------------------- the official MILK10k score
def test_absent_unpredicted_class_scores_one():
    y = np.array([[1, 0, 0], [0, 1, 0]], float)
    p = np.array([[0.9, 0.05, 0.05], [0.2, 0.7, 0.1]])
    assert M.per_class_dice(y, p).tolist() == [1.0, 1.0, 1.0]
    assert M.milk10k_score(y, p) == 1.0


def test_probability_exactly_half_is_negative():
    y = np.array([[1, 0], [0, 1]], float)
    p = np.array([[0.5, 0.5], [0.5, 0.5]])
    # nothing predicted: both classes have FN only -> Dice 0
    assert M.per_class_dice(y, p).tolist() == [0.0, 0.0]
    p2 = np.nextafter(p, 1.0)  # the next float above 0.5 is positive
    assert M.per_class_dice(y, p2).tolist() == [2 / 3, 2 / 3]


def test_truth_above_half_is_positive_soft_labels():
    y = np.array([[0.6, 0.4], [0.4, 0.6]])
    p = np.array([[0.9, 0.1], [0.1, 0.9]])
    assert M.milk10k_score(y, p) == 1.0


def test_all_zero_prediction_row():
    y = np.eye(3)[[0, 1, 2]]
    p = np.array([[0.9, 0.0, 0.0], [0.0, 0.0, 0.0], [0.0, 0.0, 0.8]])
    # class 1 has one FN, no TP -> 0; the others are perfect
    assert M.per_class_dice(y, p).tolist() == [1.0, 0.0, 1.0]
    assert M.milk10k_score(y, p) == pytest.approx(2 / 3)


def test_all_zero_truth_row_with_no_prediction_changes_nothing():
    y = np.vstack([np.eye(3), np.zeros((1, 3))])
    p = np.vstack([np.eye(3) * 0.9, np.zeros((1, 3))])
    assert M.milk10k_score(y, p) == 1.0


def test_milk10k_matches_sklearn_f1_per_class():
    y, p = _random(C=11, seed=3, signal=2.5)
    pred = (p > 0.5).astype(int)
    ref = f1_score(y.astype(int), pred, average=None, zero_division=1)
    np.testing.assert_allclose(M.per_class_dice(y, p), ref)
    assert M.milk10k_score(y, p) == pytest.approx(ref.mean())


def test_official_score_dispatch():
    y, p = _random(C=11)
    assert M.official_score(MILK10K, y, p) == M.milk10k_score(y, p)
    y7, p7 = _random(C=7)
    assert M.official_score(ISIC2018, y7, p7) == M.balanced_accuracy(y7, p7)


# ---------------------------------------------------------------------------- argmax metrics vs sklearn
def test_balanced_accuracy_and_macro_f1_match_sklearn():
    y, p = _random(seed=1)
    t, pr = y.argmax(1), p.argmax(1)
    assert M.balanced_accuracy(y, p) == pytest.approx(balanced_accuracy_score(t, pr))
    assert M.balanced_accuracy(t, p) == pytest.approx(balanced_accuracy_score(t, pr))  # index labels too
    assert M.macro_f1(y, p) == pytest.approx(f1_score(t, pr, average="macro"))


def test_balanced_accuracy_ignores_classes_absent_from_truth():
    y = np.eye(3)[[0, 0, 1, 1]]
    p = np.eye(3)[[0, 2, 1, 1]]
    assert M.balanced_accuracy(y, p) == pytest.approx((0.5 + 1.0) / 2)


def test_per_class_prf_auroc_ap_match_sklearn_and_nan_when_undefined():
    y, p = _random(seed=2)
    y[y[:, 6] == 1] = np.eye(7)[0]  # class 6 never true: its recall, AUROC and AP are undefined
    pc = M.per_class_metrics(ISIC2018, y, p)
    t, pr = y.argmax(1), p.argmax(1)
    for j, c in enumerate(ISIC2018.classes[:6]):
        assert pc[c]["f1"] == pytest.approx(f1_score(t == j, pr == j))
        assert pc[c]["auroc"] == pytest.approx(roc_auc_score(y[:, j], p[:, j]))
        assert pc[c]["average_precision"] == pytest.approx(average_precision_score(y[:, j], p[:, j]))
    last = pc[ISIC2018.classes[6]]
    assert np.isnan(last["recall"]) and np.isnan(last["auroc"]) and np.isnan(last["average_precision"])


def test_auroc_with_ties_matches_sklearn():
    rng = np.random.default_rng(4)
    y = np.eye(3)[rng.integers(0, 3, 200)]
    p = np.round(rng.random((200, 3)), 1)  # many ties
    for j in range(3):
        assert M.auroc_per_class(y, p)[j] == pytest.approx(roc_auc_score(y[:, j], p[:, j]))
        assert M.average_precision_per_class(y, p)[j] == pytest.approx(average_precision_score(y[:, j], p[:, j]))


def test_melanoma_and_malignant_operating_points():
    C = ISIC2018.num_classes
    mel, nv, bcc = ISIC2018.index("MEL"), ISIC2018.index("NV"), ISIC2018.index("BCC")
    y = np.eye(C)[[mel, mel, nv, nv, bcc]]
    p = np.eye(C)[[mel, nv, nv, mel, mel]] * 0.6 + 0.4 / C
    op = M.melanoma_operating_point(ISIC2018, y, p)
    assert op == {"melanoma_sensitivity": 0.5, "melanoma_specificity": pytest.approx(1 / 3)}
    assert M.melanoma_operating_point(ISIC2018, y, p, cut=0.99)["melanoma_sensitivity"] == 0.0
    mal = M.malignant_operating_point(ISIC2018, y, p)  # MEL, BCC malignant: truth [1,1,0,0,1], pred [1,0,0,1,1]
    assert mal["malignant_sensitivity"] == pytest.approx(2 / 3) and mal["malignant_specificity"] == 0.5


def test_top_k_brier_and_ece():
    y = np.eye(3)[[0, 1, 2]]
    p = np.array([[0.5, 0.3, 0.2], [0.5, 0.3, 0.2], [0.5, 0.3, 0.2]])
    assert M.top_k_accuracy(y, p, 1) == pytest.approx(1 / 3)
    assert M.top_k_accuracy(y, p, 2) == pytest.approx(2 / 3)
    assert M.brier_score(y, np.eye(3)[[0, 1, 2]]) == 0.0
    assert M.brier_score(y, np.eye(3)[[1, 2, 0]]) == 2.0
    # perfectly calibrated synthetic data: labels drawn from the stated probabilities
    rng = np.random.default_rng(0)
    z = rng.normal(size=(20000, 5)) * 2
    probs = np.exp(z) / np.exp(z).sum(1, keepdims=True)
    labels = (probs.cumsum(1) > rng.random((20000, 1))).argmax(1)
    assert M.expected_calibration_error(labels, probs) < 0.02
    assert M.expected_calibration_error(labels, probs ** 3 / (probs ** 3).sum(1, keepdims=True)) > 0.05


def test_compute_metrics_shape_and_validation():
    y, p = _random(seed=5)
    m = M.compute_metrics(ISIC2018, y, p)
    assert set(M.HEADLINE) <= set(m)
    assert list(m["per_class"]) == list(ISIC2018.classes)
    assert np.asarray(m["confusion_matrix"]).sum() == len(y)
    with pytest.raises(ValueError, match="7 classes"):
        M.compute_metrics(ISIC2018, np.eye(11)[[0, 1]], np.full((2, 11), 1 / 11))
    with pytest.raises(ValueError, match="same shape"):
        M.milk10k_score(np.eye(3), np.eye(4))


def test_bootstrap_ci_shapes_and_coverage():
    y, p = _random(n=300, seed=6)
    lo, hi = M.bootstrap_ci(M.balanced_accuracy, y, p, n=200, seed=0)
    assert lo < M.balanced_accuracy(y, p) < hi
    again = M.bootstrap_ci(M.balanced_accuracy, y, p, n=200, seed=0)
    assert again == (lo, hi)  # seeded
    arr_lo, arr_hi = M.bootstrap_ci(M.per_class_dice, y, p, n=50)
    assert arr_lo.shape == (7,) and (arr_lo <= arr_hi).all()
    d = M.bootstrap_ci(lambda t, q: {"a": M.accuracy(t, q), "nan": float("nan")}, y, p, n=20)
    assert d["a"][0] <= d["a"][1] and np.isnan(d["nan"][0])
    full = M.bootstrap_metrics(ISIC2018, y, p, n=30)
    assert set(full["per_class"]) == set(ISIC2018.classes) and "official" in full["headline"]


def test_training_epoch_metrics_agree_with_evaluation():
    from dermfusion.training.val_metrics import epoch_metrics

    for task, C in ((ISIC2018, 7), (MILK10K, 11)):
        y, p = _random(C=C, seed=7)
        got = epoch_metrics(task, y, p)
        full = M.compute_metrics(task, y, p)
        for k, v in got.items():
            if k in full:
                assert v == pytest.approx(full[k]), (task.name, k)
        assert got["official"] == pytest.approx(M.official_score(task, y, p))


def test_bootstrap_metrics_intervals_contain_point_estimates():
    y, p = _random(n=500, seed=8)
    point = M.headline_metrics(ISIC2018, y, p)
    ci = M.bootstrap_metrics(ISIC2018, y, p, n=200)["headline"]
    for k in ("official", "balanced_accuracy", "macro_f1", "accuracy", "macro_auroc", "brier", "log_loss"):
        lo, hi = ci[k]
        assert lo <= point[k] <= hi, (k, lo, point[k], hi)
