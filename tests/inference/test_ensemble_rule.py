"""The one ensemble rule (inference.predictor): members' raw probabilities are combined, then one calibration is
applied — the same for `dermfusion predict`, an average bundle and the service."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from dermfusion.bundle import BundleError, read_bundle, resolve_run, update_calibration
from dermfusion.cli import app
from dermfusion.data.predictions import read_predictions
from dermfusion.evaluation.calibration import Calibration
from dermfusion.inference import AveragePredictor, load_predictor, load_run
from dermfusion.tasks import ISIC2018


def test_fold_ensemble_averages_raw_then_calibrates_once(network_run, ham_sample):
    rows = ham_sample.head(6)
    pred = load_run(network_run, backend="fp32")
    assert isinstance(pred, AveragePredictor) and len(pred.members) == 2
    raw = np.mean([m.predict_raw(rows) for m in pred.members], axis=0)
    np.testing.assert_allclose(pred.predict_raw(rows), raw, atol=1e-6)
    calib = Calibration.from_dict(read_bundle(network_run / "fold_0" / "bundle").calibration)
    assert calib.temperature != 1.0, "the run's calibration is fitted (a temperature), so the rule is visible"
    np.testing.assert_allclose(pred.predict_proba(rows), calib.posterior(raw), atol=1e-6)
    np.testing.assert_allclose(pred.predict_balanced(rows), calib.balanced(raw), atol=1e-6)
    per_member = np.mean([calib.posterior(m.predict_raw(rows)) for m in pred.members], axis=0)
    assert not np.allclose(pred.predict_proba(rows), per_member, atol=1e-6), \
        "calibrating each member then averaging is the other rule, not the one documented"


def test_bundles_with_different_calibrations_are_not_averaged_ad_hoc(tmp_path, network_run):
    import shutil

    copy = shutil.copytree(network_run, tmp_path / "run")
    update_calibration(copy / "fold_1" / "bundle", {"temperature": 3.0})
    with pytest.raises(BundleError, match="different calibrations"):
        load_run(copy)


def test_predict_a_tabular_run_directory(tmp_path, tabular_run, ham_manifest, ham_sample):
    out = tmp_path / "pred.csv"
    res = CliRunner().invoke(app, ["predict", str(tabular_run), "--manifest", str(ham_manifest), "--out", str(out)])
    assert res.exit_code == 0, res.output
    got = read_predictions(out, ISIC2018)
    assert list(got["lesion_id"]) == list(ham_sample["lesion_id"]) and len(got) == 48
    direct = load_predictor(tabular_run / "bundle").predict_balanced(ham_sample)  # the official file: balanced rule
    np.testing.assert_allclose(got[list(ISIC2018.classes)].to_numpy(), direct, atol=1e-5)
    assert resolve_run(tabular_run) == [tabular_run / "bundle"]


def test_predict_a_network_run_directory_matches_its_bundles(tmp_path, network_run, ham_manifest, ham_sample):
    out = tmp_path / "pred.csv"
    res = CliRunner().invoke(app, ["predict", str(network_run), "--manifest", str(ham_manifest), "--out", str(out),
                                   "--backend", "fp32"])
    assert res.exit_code == 0, res.output
    fold_bundles = [str(b) for b in resolve_run(network_run)]
    out2 = tmp_path / "pred2.csv"
    res = CliRunner().invoke(app, ["predict", *fold_bundles, "--manifest", str(ham_manifest), "--out", str(out2),
                                   "--backend", "fp32"])
    assert res.exit_code == 0, res.output
    a, b = pd.read_csv(out), pd.read_csv(out2)
    np.testing.assert_allclose(a[list(ISIC2018.classes)], b[list(ISIC2018.classes)], atol=1e-6)


def test_the_service_combines_networks_as_the_predictor_does(tmp_path, network_run, tabular_run, ham_sample):
    """Predictor.mixture(): an `ensemble` bundle's weights reach the service's model pass (they were once ignored:
    every network counted equally), a stack keeps its meta-model (no mixture), a mixed ensemble is predicted whole."""
    pytest.importorskip("fastapi")
    from dermfusion.clinical.model_pass import ModelPass
    from dermfusion.tabular.ensemble import write_ensemble_bundle

    folds = resolve_run(network_run)
    calib = read_bundle(folds[0]).calibration
    write_ensemble_bundle(tmp_path / "ens", folds, [0.8, 0.2], ISIC2018, calibration=calib)
    ens = load_predictor(tmp_path / "ens", backend="fp32")
    mp = ModelPass(ens)
    assert mp.is_network and np.allclose(mp.weights, [0.8, 0.2])
    rows = ham_sample.head(3)
    raw = 0.8 * ens.members[0].predict_raw(rows) + 0.2 * ens.members[1].predict_raw(rows)
    np.testing.assert_allclose(ens.predict_proba(rows), Calibration.from_dict(calib).posterior(raw), atol=1e-6)
    write_ensemble_bundle(tmp_path / "mixed", [folds[0], tabular_run / "bundle"], [0.5, 0.5], ISIC2018,
                          calibration=calib)
    assert not ModelPass(load_predictor(tmp_path / "mixed")).is_network, "a tabular member: the generic path"


def test_each_network_of_a_blend_runs_with_its_own_test_time_views(tmp_path, network_run, ham_sample):
    """A blend of networks validated with different `train.tta` (e.g. a recipe with 8 views beside one with none):
    each runs with its own views, as its out-of-fold predictions did — not the first network's for all."""
    pytest.importorskip("fastapi")
    from dermfusion.clinical.lesion import lesions_from_manifest
    from dermfusion.clinical.model_pass import ModelPass, network_tta
    from dermfusion.tabular.ensemble import write_ensemble_bundle

    folds = resolve_run(network_run)
    write_ensemble_bundle(tmp_path / "ens", folds, [0.8, 0.2], ISIC2018, calibration=read_bundle(folds[0]).calibration)
    ens = load_predictor(tmp_path / "ens", backend="fp32")
    mp = ModelPass(ens)
    assert mp.views == [network_tta(m) for m in ens.members]
    mp.views = [2, 0]  # as if the second network had been validated without test-time views
    lesions = next(lesions_from_manifest(ham_sample.head(3), mp.modalities))
    own = mp.run(lesions, tta=None).raw
    expected = 0.8 * ModelPass(ens.members[0]).run(lesions, tta=2).raw + \
        0.2 * ModelPass(ens.members[1]).run(lesions, tta=0).raw
    np.testing.assert_allclose(own, expected, atol=1e-6)
    assert np.abs(mp.run(lesions, tta=2).raw - own).max() > 1e-6  # one number for all (the caller's) differs
