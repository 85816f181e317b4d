"""Calibration: the serialised contract, temperature recovery, cut rescaling and the nested estimate."""
import json

import numpy as np
import pytest

from dermfusion.evaluation import calibration as K
from dermfusion.evaluation.metrics import milk10k_score
from dermfusion.tasks import ISIC2018, MILK10K


def _softmax(z):
    e = np.exp(z - z.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)


def _noise(n=600, C=11, seed=0):
    rng = np.random.default_rng(seed)
    y = np.eye(C)[rng.choice(C, n, p=np.r_[0.3, 0.2, np.full(C - 2, 0.5 / (C - 2))])]
    return y, _softmax(rng.normal(size=(n, C)))


def test_dict_round_trip_and_identity():
    cal = K.Calibration(1.7, [0.1, -0.2, 0.0], [0.3, 0.5, 0.2])
    d = json.loads(json.dumps(cal.to_dict()))
    assert d == {"temperature": 1.7, "prior_adjustment": [0.1, -0.2, 0.0], "cuts": [0.3, 0.5, 0.2]}
    assert K.Calibration.from_dict(d) == cal
    assert K.Calibration.from_dict(None).is_identity and K.Calibration.from_dict({}).is_identity
    p = _softmax(np.random.default_rng(0).normal(size=(5, 3)))
    np.testing.assert_allclose(K.Calibration().apply(p), p, atol=1e-12)
    with pytest.raises(ValueError, match="3 cuts"):
        K.Calibration(cuts=[0.5, 0.5, 0.5]).apply(np.full((2, 4), 0.25), rescale_cuts=True)


def test_apply_is_softmax_of_scaled_log_probs_plus_adjustment():
    p = _softmax(np.random.default_rng(1).normal(size=(8, 4)))
    adj = [0.5, 0.0, -0.3, 0.1]
    want = _softmax(np.log(p) / 2.0 + np.array(adj))
    np.testing.assert_allclose(K.Calibration(2.0, adj).apply(p), want, atol=1e-12)
    np.testing.assert_allclose(K.fit_prior_adjustment([0.5, 0.25, 0.25], tau=2.0), -2 * np.log([0.5, 0.25, 0.25]))


def test_fit_temperature_recovers_known_temperature():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(20000, 6)) * 1.5
    labels = (_softmax(logits).cumsum(1) > rng.random((20000, 1))).argmax(1)
    overconfident = _softmax(logits * 2.5)  # a model whose logits are 2.5x too large
    T = K.fit_temperature(labels, overconfident)
    assert T == pytest.approx(2.5, rel=0.05)
    assert K.fit_temperature(np.eye(6)[labels], _softmax(logits)) == pytest.approx(1.0, rel=0.05)


def test_rescale_maps_cut_to_half_and_preserves_order():
    cuts = np.array([0.2, 0.5, 0.8])
    p = np.array([[0.0, 0.0, 0.0], [0.1, 0.25, 0.4], [0.2, 0.5, 0.8], [0.6, 0.75, 0.9], [1.0, 1.0, 1.0]])
    r = K.rescale_cuts(p, cuts)
    np.testing.assert_allclose(r[2], 0.5)  # the cut itself lands on 0.5 (and is therefore negative)
    np.testing.assert_allclose(r[0], 0.0)
    np.testing.assert_allclose(r[4], 1.0)
    assert (np.diff(r, axis=0) > 0).all()  # monotone in each class
    rng = np.random.default_rng(0)
    q = rng.random((500, 3))
    rq = K.rescale_cuts(q, cuts)
    for c in range(3):
        assert (np.argsort(q[:, c], kind="stable") == np.argsort(rq[:, c], kind="stable")).all()
        assert ((rq[:, c] > 0.5) == (q[:, c] > cuts[c])).all()


def test_rescale_keeps_strictness_next_to_the_cut():
    t = 0.3
    just_above = np.nextafter(t, 1.0)
    r = K.rescale_cuts(np.array([[t], [just_above], [np.nextafter(t, 0.0)]]), [t])
    assert r[0, 0] == 0.5                         # at the cut: negative, as p > t is False
    assert r[1, 0] > 0.5                          # one ulp above: positive (0.5 + tiny would round to 0.5)
    assert r[2, 0] < 0.5


def test_tuned_cuts_applied_by_rescaling_score_the_same():
    y, p = _noise(seed=1)
    cuts = K.tune_cuts(y, p)
    s_cut, _ = K.score_with_cuts(y, p, cuts)
    assert s_cut >= milk10k_score(y, p)
    sub = K.Calibration(cuts=cuts.tolist()).apply(p, rescale_cuts=True)
    assert milk10k_score(y, sub) == pytest.approx(K.score_with_cuts(y, K.Calibration().apply(p), cuts)[0])
    grid = K.tune_cuts(y, p, grid=K.DEFAULT_GRID)
    assert np.isin(grid, K.DEFAULT_GRID).all()  # every class has positives here, so every cut is a grid point
    with pytest.raises(ValueError, match="milk10k_dice"):
        K.tune_cuts(y, p, metric="balanced_accuracy")


def test_class_without_positives_is_left_unpredicted():
    y = np.zeros((50, 1))
    p = np.random.default_rng(0).random((50, 1))
    assert K.tune_cut(y[:, 0], p[:, 0]) == K.CUT_MAX
    assert K.score_with_cuts(y, p, [K.CUT_MAX])[0] == 1.0


def test_nested_estimate_is_below_in_sample_on_noise():
    y, p = _noise(n=800, seed=2)
    folds = np.arange(len(y)) % 5
    est = K.nested_cut_estimate(p, y, folds)
    assert est["score"] <= est["in_sample_score"]
    assert set(est["fold_cuts"]) == {"0", "1", "2", "3", "4"} and len(est["cuts"]) == 11
    assert est["pred"].shape == p.shape


def test_fit_calibration_task_form_reports_nested_before_after():
    y, p = _noise(n=500, seed=3)
    folds = np.arange(len(y)) % 4
    cal, report = K.fit_calibration(MILK10K, y, p, folds)
    assert cal.cuts is not None and len(cal.cuts) == 11 and cal.temperature > 0
    json.dumps(report)  # JSON-ready (goes into summary.json)
    c = report["cuts"]
    assert c["nested_score"] <= c["in_sample_score"] and "official_untuned" in c
    cal2, rep2 = K.fit_calibration(ISIC2018, np.eye(7)[np.arange(70) % 7], _softmax(np.random.default_rng(0).normal(size=(70, 7))),
                                   np.arange(70) % 2, logit_adjust=True)
    assert cal2.cuts is None and len(cal2.prior_adjustment) == 7 and "cuts" not in rep2
    # the array form used by the tabular stage
    assert isinstance(K.fit_calibration(p, y, "milk10k_dice"), K.Calibration)


def test_calibrate_oof_report_keys_and_improvement():
    rng = np.random.default_rng(5)
    n, C = 1500, 11
    logits = rng.normal(size=(n, C)) * 1.5
    y = np.eye(C)[(_softmax(logits).cumsum(1) > rng.random((n, 1))).argmax(1)]
    over = _softmax(logits * 3.0)  # over-confident model
    cal, rep = K.calibrate_oof(MILK10K, y, over, np.arange(n) % 5)
    for k in ("n", "temperature", "prior_adjustment", "nll_before", "nll_after", "ece_before", "ece_after",
              "official_before", "official_after", "cuts", "official_untuned", "nested_cut_score",
              "in_sample_cut_score"):
        assert k in rep, k
    assert set(rep["cuts"]) >= {"folds", "official_untuned", "nested_score", "nested_per_class", "in_sample_score",
                                "fold_cuts", "cuts"}
    assert rep["cuts"]["folds"] == "given" and list(rep["cuts"]["cuts"]) == list(MILK10K.classes)
    assert rep["temperature"] == pytest.approx(3.0, rel=0.10)
    assert rep["nll_after"] < rep["nll_before"] and rep["ece_after"] < rep["ece_before"]
    assert rep["cuts"]["in_sample_score"] >= rep["cuts"]["official_untuned"]
    json.dumps(rep)
    # no usable folds: random 5-fold, and the report says so
    _, rep2 = K.calibrate_oof(MILK10K, y, over, None, temperature=False)
    assert rep2["temperature"] == 1.0 and rep2["cuts"]["folds"].startswith("random")


def test_training_prior_follows_the_sampler_power():
    from dermfusion.evaluation.calibration import training_prior

    counts = [400, 100, 25]
    assert np.allclose(training_prior(counts, 0.0), np.array(counts) / 525)  # natural frequencies
    assert np.allclose(training_prior(counts, 1.0), 1 / 3)  # fully balanced
    sqrt = training_prior(counts, 0.5)
    assert np.allclose(sqrt, np.array([20, 10, 5]) / 35)


def test_training_prior_adjustment_undoes_the_sampling_prior():
    """A model whose output is exactly the (square-root) sampling prior says nothing about the lesion:
    after dividing that prior out, every class is equally likely."""
    from dermfusion.evaluation.calibration import fit_prior_adjustment, training_prior

    prior = training_prior([400, 100, 25], 0.5)
    calib = K.Calibration(prior_adjustment=fit_prior_adjustment(prior))
    assert np.allclose(calib.apply(prior[None]), 1 / 3)


def test_prior_strength_leans_further_towards_rare_classes():
    """``calibration.prior_strength`` k divides by prior**k: k = 1 makes the prior itself uniform; k > 1 turns
    it around (the rarest class now most likely); a full run's bundle calibration uses the config's k."""
    import pandas as pd

    from dermfusion.config import CalibrationConfig
    from dermfusion.evaluation.calibration import training_prior
    from dermfusion.tasks import get_task
    from dermfusion.training.cv import calibrate_run

    task = get_task("derm7pt")
    counts = np.array([40, 200, 60, 30, 20])
    y = np.repeat(np.eye(5), counts, axis=0)
    prior = training_prior(counts, 0.5)
    oof = pd.DataFrame(np.repeat(prior[None], len(y), 0), columns=list(task.classes))
    oof["fold"] = np.arange(len(y)) % 2
    out = {}
    for k in (1.0, 1.5):
        opts = CalibrationConfig(temperature=False, cuts=False, prior_adjustment="training_prior", prior_strength=k)
        res = calibrate_run(opts, task, y, oof, [], sampler_power=0.5)
        out[k] = K.Calibration.from_dict(res["fitted"]).apply(prior[None])[0]
    assert np.allclose(out[1.0], 0.2)
    assert out[1.5].argmax() == counts.argmin() and out[1.5].argmin() == counts.argmax()


def test_a_stronger_balanced_rule_is_the_strength_one_scores_times_a_power_of_the_prior():
    """benchmarks/derm7pt_prior_strength.py rewrites a strength-1 official file at strength k by
    scores_k ∝ scores_1 × prior^(1 − k): true for a refit's calibration (temperature 1, bias from the sampler)."""
    rng = np.random.default_rng(3)
    counts = np.array([19.0, 256, 90, 16, 32])
    mix = counts / counts.sum()
    bias = (np.log(mix) - np.log(K.training_prior(counts, 0.5))).tolist()
    raw = rng.dirichlet(np.ones(5), 50)
    one = K.Calibration(1.0, None, None, bias, mix.tolist(), 1.0).balanced(raw)
    for k in (1.3, 1.5, 2.0):
        direct = K.Calibration(1.0, None, None, bias, mix.tolist(), k).balanced(raw)
        derived = one * mix[None] ** (1 - k)
        assert np.allclose(direct, derived / derived.sum(1, keepdims=True), atol=1e-12)
        assert not np.allclose(direct, one)


def test_training_prior_counts_come_from_the_training_rows():
    """A run of one fold divides by the prior its model was trained under — the *other* folds' class mix, not the
    held-out fold's (Derm7pt's official validation split has 30 % melanomas, its training split 22 %)."""
    import pandas as pd

    from dermfusion.tasks import get_task
    from dermfusion.training.cv import training_class_counts

    task = get_task("derm7pt")
    labels = ["MEL"] * 6 + ["NEV"] * 4 + ["NEV"] * 9 + ["MEL"] * 1   # fold 0: 6 MEL 4 NEV; fold 1: 1 MEL 9 NEV
    df = pd.DataFrame({f"label_{k}": [float(lab == k) for lab in labels] for k in task.classes})
    df["fold"] = [0] * 10 + [1] * 10
    df = pd.concat([df, pd.DataFrame({"fold": [-1], **{f"label_{k}": [np.nan] for k in task.classes}})])
    got = dict(zip(task.classes, training_class_counts(df, task, [0])))
    assert got["MEL"] == 1 and got["NEV"] == 9 and got["BCC"] == 0
    both = dict(zip(task.classes, training_class_counts(df, task, [0, 1])))
    assert both["MEL"] == 7 and both["NEV"] == 13  # every labelled row once: the whole manifest's mix


def test_a_refit_calibrated_on_other_models_evidence_lands_on_their_posteriors():
    """A full-data refit trained under another class mix than the evidence run's fold models (Derm7pt: train + valid
    vs train alone): its raw output is under its own sampling prior, so the calibration it is given shifts the bias by
    Bayes' rule — a lesion the refit sees as the fold models would, once each sampler's prior is divided out, gets the
    posteriors the decision rules were fitted on."""
    import pandas as pd

    from dermfusion.config import CalibrationConfig
    from dermfusion.evaluation.calibration import training_prior
    from dermfusion.tasks import get_task
    from dermfusion.training.cv import calibrate_run

    task = get_task("derm7pt")
    rng = np.random.default_rng(0)
    counts_ev, counts_refit = np.array([40, 200, 60, 30, 20]), np.array([47, 300, 121, 40, 45])
    y = np.repeat(np.eye(5), counts_ev, axis=0)
    raw_ev = 0.6 * y + 0.4 * rng.dirichlet(np.ones(5), len(y))
    oof = pd.DataFrame(raw_ev, columns=list(task.classes))
    oof["fold"] = 0
    opts = CalibrationConfig(temperature=True, posterior="temperature", cuts=False, prior_adjustment="training_prior")
    s_ev, s_refit = training_prior(counts_ev, 0.5), training_prior(counts_refit, 0.5)
    ev = K.Calibration.from_dict(calibrate_run(opts, task, y, oof, [], sampler_power=0.5, class_counts=counts_ev)
                                 ["fitted"])
    refit = K.Calibration.from_dict(calibrate_run(opts, task, y, oof, [], sampler_power=0.5, class_counts=counts_ev,
                                                  evidence="cv_run", bundle_sampling_prior=s_refit)["fitted"])
    assert ev.temperature != 1.0  # a fitted temperature: the shift is divided by it
    likelihood = rng.dirichlet(np.ones(5), 8)   # what the lesion says, free of any prior
    seen_by_fold_models = likelihood * s_ev / (likelihood * s_ev).sum(1, keepdims=True)
    seen_by_refit = likelihood * s_refit / (likelihood * s_refit).sum(1, keepdims=True)
    np.testing.assert_allclose(refit.posterior(seen_by_refit), ev.posterior(seen_by_fold_models), atol=1e-9)
    assert not np.allclose(ev.posterior(seen_by_refit), ev.posterior(seen_by_fold_models), atol=1e-3)


@pytest.mark.parametrize("strength, oof_like_training, warned", [(1.5, False, True), (1.0, False, False),
                                                                 (1.5, True, False)])
def test_a_strength_other_than_one_on_an_out_of_fold_mix_unlike_training_is_called_out(strength, oof_like_training,
                                                                                      warned):
    """At strength k ≠ 1 a cross-validated run's balanced rule carries its out-of-fold mix ** (1 − k); a Derm7pt
    --folds 0 run's out-of-fold lesions are the validation split (30 % melanoma against 22 % in training), so its
    rule is not the one the full-data refit applies. Training says so; at strength 1, or with like mixes, it does not."""
    import pandas as pd

    from dermfusion.config import CalibrationConfig
    from dermfusion.console import console
    from dermfusion.tasks import get_task
    from dermfusion.training.run_calibration import calibrate_run

    task = get_task("derm7pt")
    oof_counts = np.array([7, 61, 25, 100, 10])
    train_counts = oof_counts * 2 if oof_like_training else np.array([19, 90, 32, 256, 16])
    y = np.repeat(np.eye(5), oof_counts, axis=0)
    oof = pd.DataFrame(np.full((len(y), 5), 0.2), columns=list(task.classes))
    oof["fold"] = 0
    opts = CalibrationConfig(temperature=False, cuts=False, prior_adjustment="training_prior", prior_strength=strength)
    with console.capture() as cap:
        calibrate_run(opts, task, y, oof, [], sampler_power=0.5, class_counts=train_counts)
    assert ("prior_strength 1.5 ≠ 1 divides by the out-of-fold class mix" in " ".join(cap.get().split())) is warned
