"""Tabular expert, CV training, stacking and ensembles on a synthetic, learnable MILK10k-shaped manifest."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from dermfusion.evaluation import calibration as _cal, metrics as _met
from dermfusion.tabular.ensemble import blend, compare_table, search_weights, write_ensemble_bundle
from dermfusion.tabular.expert import ExpertError, TabularExpert
from dermfusion.tabular.features import TabularFeatureSpec
from dermfusion.tabular.stacking import fit_stack, write_stack_bundle
from dermfusion.tabular.train import TabularConfigError, train_tabular_cv
from dermfusion.tasks import MILK10K

from tabular_helpers import CONCEPTS, FAST, synthetic_manifest  # noqa: E402,F401 — shared with tests/card


@pytest.fixture(scope="module")
def data():
    return synthetic_manifest()


def test_feature_spec_is_deterministic_and_roundtrips(data):
    df, _ = data
    spec = TabularFeatureSpec.from_manifest(df)
    X = spec.transform(df)
    assert list(X.columns) == spec.columns
    assert X.columns[0] == "clinical_erythema"  # concepts sorted, clinical first
    assert {"age", "sex", "site", "skin_tone", "diff_hair", "n_missing"} <= set(X.columns)
    assert isinstance(X["site"].dtype, pd.CategoricalDtype) and X["site"].isna().any()  # "" -> unknown
    again = TabularFeatureSpec.from_dict(json.loads(json.dumps(spec.to_dict())))
    pd.testing.assert_frame_equal(again.transform(df.iloc[::-1]), X.iloc[::-1].reset_index(drop=True))
    # a manifest without one concept column still builds the same columns (NaN)
    X2 = spec.transform(df.drop(columns=["concept_dermoscopic_hair"]))
    assert list(X2.columns) == spec.columns and X2["dermoscopic_hair"].isna().all()


@pytest.mark.parametrize("backend", ["lightgbm", "logreg"])
def test_expert_beats_chance_and_roundtrips(data, backend, tmp_path):
    df, y = data
    spec = TabularFeatureSpec.from_manifest(df)
    X = spec.transform(df)
    tr, te = np.arange(len(df)) < 230, np.arange(len(df)) >= 230
    ex = TabularExpert(backend, params=FAST if backend == "lightgbm" else None, num_classes=11,
                       class_weight="sqrt", n_jobs=1).fit(X[tr], y[tr])
    p = ex.predict_proba(X[te])
    assert p.shape == (te.sum(), 11) and np.allclose(p.sum(1), 1)
    assert (p.argmax(1) == y[te]).mean() > 0.6  # chance is 0.25
    ex.save(tmp_path)
    assert (tmp_path / ("model.txt" if backend == "lightgbm" else "model.json")).exists()
    p2 = TabularExpert.load(tmp_path).predict_proba(X[te])
    np.testing.assert_array_equal(p, p2)


def test_xgboost_roundtrip(data, tmp_path):
    pytest.importorskip("xgboost")
    df, y = data
    X = TabularFeatureSpec.from_manifest(df).transform(df)
    ex = TabularExpert("xgboost", params={"n_estimators": 40, "learning_rate": 0.2}, num_classes=11,
                       early_stopping_rounds=None, n_jobs=1).fit(X, y)
    ex.save(tmp_path)
    assert (tmp_path / "model.json").exists()
    np.testing.assert_allclose(ex.predict_proba(X), TabularExpert.load(tmp_path).predict_proba(X), atol=1e-7)


def test_expert_errors_say_what_to_do(data):
    df, y = data
    X = TabularFeatureSpec.from_manifest(df).transform(df)
    with pytest.raises(ExpertError, match="DataFrame"):
        TabularExpert().fit(X.to_numpy(), y)
    with pytest.raises(ExpertError, match="one entry per row"):
        TabularExpert().fit(X, y[:-1])
    with pytest.raises(ExpertError, match="not fitted"):
        TabularExpert().predict_proba(X)
    with pytest.raises(ExpertError, match="backend"):
        TabularExpert("catboost")
    ex = TabularExpert("logreg", num_classes=11).fit(X, y)
    with pytest.raises(ExpertError, match="same TabularFeatureSpec"):
        ex.predict_proba(X.drop(columns=["age"]))


def test_calibration_helpers():
    y = np.eye(3)[[0, 0, 1, 2, 2, 2]]
    p = np.array([[.6, .3, .1], [.4, .5, .1], [.2, .7, .1], [.3, .3, .4], [.5, .1, .4], [.1, .1, .8]])
    assert _met.milk10k_score(y, p) == pytest.approx(np.mean([2 / 3, 1.0, 0.5]))
    cuts = _cal.tune_cuts(y, p)
    s_cut = _cal.score_with_cuts(y, p, cuts)[0]
    assert s_cut >= _met.milk10k_score(y, p)
    # rescaling lands every tuned cut on 0.5, with the strict ">" kept
    assert _met.milk10k_score(y, _cal.rescale_cuts(p, cuts)) == pytest.approx(s_cut)
    # a class too rare to expect a positive in the scored set is left unpredicted (scores 1.0 when absent)
    rare_y, rare_p = np.zeros(1000), np.linspace(0, 1, 1000)
    rare_y[[10, 500]] = 1
    assert _cal.tune_cut(rare_y, rare_p) < 0.6
    assert _cal.tune_cut(rare_y, rare_p, eval_size=100) == _cal.CUT_MAX
    # an empty class scores 1.0 when nothing is predicted
    assert _met.dice_per_class(np.zeros((3, 1)), np.zeros((3, 1)))[0] == 1.0


def test_train_cv_writes_oof_and_loadable_bundles(data, tmp_path):
    from dermfusion.inference import load_predictor

    df, y = data
    cfg = {"task": "milk10k", "model": {"kind": "tabular", "backend": "lightgbm", "params": FAST,
                                        "class_weight": "sqrt", "early_stopping_rounds": None}, "n_jobs": 1}
    s = train_tabular_cv(cfg, df, "milk10k", tmp_path)
    oof = pd.read_csv(tmp_path / "oof.csv")
    assert list(oof.columns) == ["lesion_id", "fold", *MILK10K.classes] and len(oof) == len(df)
    assert s["metrics"]["nested_cut_score"] > 0.5 and len(s["fold_bundles"]) == 3
    pred = load_predictor(s["bundle"])
    assert pred.bundle.config["kind"] == "tabular" and len(pred.bundle.calibration["cuts"]) == 11
    p = pred.predict_raw(df.drop(columns=MILK10K.label_columns()))
    assert p.shape == (len(df), 11) and (p.argmax(1) == y).mean() > 0.8
    # fold bundles reproduce the OOF rows of their fold exactly
    f0 = load_predictor(s["fold_bundles"][0]).predict_raw(df[df.fold == 0])
    np.testing.assert_allclose(f0, oof[oof.fold == 0][list(MILK10K.classes)].to_numpy(), atol=1e-6)
    with pytest.raises(TabularConfigError, match="unknown model key"):
        train_tabular_cv({"model": {"backend": "lightgbm", "num_leaves": 3}}, df, "milk10k", tmp_path / "x")


def test_stacking_never_uses_a_rows_own_fold():
    """Leak detector: every row of fold k has label k and uninformative member probabilities. A meta-model
    that never saw fold k cannot predict class k; one fitted with fold k's rows would."""
    n, k = 240, 4
    folds = np.arange(n) % k
    df = pd.DataFrame({"lesion_id": [f"L{i}" for i in range(n)], "fold": folds})
    for c, cls in enumerate(MILK10K.classes):
        df[f"label_{cls}"] = (folds == c).astype(float)
    rng = np.random.default_rng(0)
    member = pd.DataFrame(rng.dirichlet(np.ones(11), n), columns=list(MILK10K.classes))
    member.insert(0, "lesion_id", df["lesion_id"])
    res = fit_stack([member, member.sample(frac=1, random_state=1)], df, "milk10k")
    p_true = res.oof[list(MILK10K.classes)].to_numpy()[np.arange(n), folds]
    assert p_true.max() < 0.01
    # the final meta-model saw every fold, so it does predict each row's own class
    final = res.meta.predict_proba([member[list(MILK10K.classes)].to_numpy()] * 2)
    assert final[np.arange(n), folds].min() > 0.05  # ~ the class prior 0.25


def test_ensemble_weights_on_simplex_and_not_worse_than_best(data):
    df, y = data
    Y = df[MILK10K.label_columns()].to_numpy()
    rng = np.random.default_rng(0)
    good = 0.6 * Y + 0.4 * rng.dirichlet(np.ones(11), len(y))
    noisy = rng.dirichlet(np.ones(11), len(y))
    mid = 0.3 * Y + 0.7 * rng.dirichlet(np.ones(11), len(y))
    members = [noisy, mid, good]

    def metric(yt, p):
        return -_met.log_loss(yt.argmax(1), p)

    w, score = search_weights(members, Y, metric)
    assert w.shape == (3,) and np.all(w >= 0) and w.sum() == pytest.approx(1.0)
    assert score >= max(metric(Y, m) for m in members) - 1e-12
    assert score == pytest.approx(metric(Y, blend(members, w)))
    table = compare_table({"noisy": noisy, "good": good, "ens": blend(members, w)}, Y, df.fold.to_numpy(),
                          "milk10k", print_table=False)
    assert {"official_raw", "nested_cut", "balanced_acc", "macro_f1"} <= set(table.columns)


def test_stack_and_ensemble_bundles_load(data, tmp_path):
    from dermfusion.inference import load_predictor

    df, y = data
    runs = []
    for i, backend in enumerate(["lightgbm", "logreg"]):
        cfg = {"task": "milk10k", "model": {"backend": backend, "params": FAST if backend == "lightgbm" else {},
                                            "early_stopping_rounds": None}, "n_jobs": 1}
        runs.append(train_tabular_cv(cfg, df, "milk10k", tmp_path / "runs" / f"r{i}", verbose=False))
    oofs = [pd.read_csv(r["oof"]) for r in runs]
    bundles = [r["bundle"] for r in runs]
    res = fit_stack(oofs, df, "milk10k", use_concepts=True, use_metadata=True)
    sb = write_stack_bundle(tmp_path / "stack", res, bundles, "milk10k")
    eb = write_ensemble_bundle(tmp_path / "ens", bundles, [0.25, 0.75], "milk10k")
    assert not json.loads((sb.path / "members.json").read_text())[0]["path"].startswith("/")
    members = [load_predictor(b).predict_raw(df) for b in bundles]
    np.testing.assert_allclose(load_predictor(eb.path).predict_raw(df), 0.25 * members[0] + 0.75 * members[1])
    ps = load_predictor(sb.path).predict_raw(df)
    np.testing.assert_allclose(ps, res.meta.predict_proba(members, df))
    assert (ps.argmax(1) == y).mean() > 0.8
