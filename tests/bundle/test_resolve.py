"""One resolver for bundles and training runs (bundle.resolve): what predicts for a bundle, a network run, a tabular
run, RUN/bundle or a list — and the errors for anything else."""
from __future__ import annotations

import json
import shutil

import pytest

from dermfusion.bundle import BundleError, is_bundle, read_bundle, resolve_one, resolve_run, run_bundles
from dermfusion.bundle.resolve import write_average_bundle


def test_network_run_resolves_to_its_fold_bundles(network_run):
    bundles = resolve_run(network_run)
    assert bundles == [network_run / "fold_0" / "bundle", network_run / "fold_1" / "bundle"]
    assert (network_run / "config.yaml").exists() and not is_bundle(network_run), \
        "a run's experiment config.yaml does not make the run directory a bundle"
    assert resolve_run(bundles[0]) == [bundles[0]]
    assert resolve_run([bundles[1], bundles[0]]) == [bundles[1], bundles[0]]


def test_tabular_run_resolves_to_its_calibrated_refit(tabular_run):
    assert resolve_run(tabular_run) == [tabular_run / "bundle"]
    assert read_bundle(tabular_run / "bundle").calibration, "the refit carries the run's calibration"
    everything, run = run_bundles(tabular_run)
    assert run == tabular_run
    assert everything[-1] == tabular_run / "bundle" and len(everything) == 3  # 2 fold bundles + the refit


def test_tabular_run_without_refit_resolves_to_its_folds(tmp_path, tabular_run):
    copy = shutil.copytree(tabular_run, tmp_path / "run")
    shutil.rmtree(copy / "bundle")
    assert resolve_run(copy) == [copy / "folds" / "fold0", copy / "folds" / "fold1"]


def test_average_bundle_stands_for_a_run(tmp_path, network_run):
    copy = shutil.copytree(network_run, tmp_path / "run")
    avg = write_average_bundle(copy, resolve_run(copy))
    assert avg.kind == "average" and avg.calibration == read_bundle(copy / "fold_0" / "bundle").calibration
    (copy / "summary.json").unlink()
    assert resolve_run(copy) == [copy / "bundle"]


def test_errors_say_what_was_expected(tmp_path, network_run):
    with pytest.raises(BundleError, match="not found"):
        resolve_run(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(BundleError, match="neither a bundle"):
        resolve_run(tmp_path / "empty")
    with pytest.raises(BundleError, match="no bundle"):
        resolve_run([])
    unfinished = shutil.copytree(network_run, tmp_path / "unfinished")
    (unfinished / "summary.json").unlink()
    with pytest.raises(BundleError, match="training has not finished"):
        resolve_run(unfinished)
    with pytest.raises(BundleError, match="export needs one bundle"):
        resolve_one(network_run, "export")
    broken = shutil.copytree(network_run, tmp_path / "broken")
    s = json.loads((broken / "summary.json").read_text())
    s["bundles"].append("fold_9/bundle")
    (broken / "summary.json").write_text(json.dumps(s))
    with pytest.raises(BundleError, match="fold_9"):
        resolve_run(broken)
