"""Drift monitoring: reference statistics in the bundle, PSI per signal, the rolling window; and the
`serve` verb's configuration output."""
from __future__ import annotations

import numpy as np
import pytest
import yaml
from PIL import Image

from service_fixtures import tiny_bundle, tiny_predictor  # noqa: F401

from dermfusion.evaluation.drift_reference import (REFERENCE_FILE, categorical_reference, image_stats,
                                                   numeric_reference, read_reference_stats)
from dermfusion.service.drift import DriftMonitor, drift_psi, psi, signal_psi


def test_psi_basics():
    rng = np.random.default_rng(0)
    ref = numeric_reference(rng.normal(0.5, 0.1, 2000).tolist())
    assert len(ref["probs"]) == 10 and sum(ref["probs"]) == pytest.approx(1)
    same = signal_psi(ref, rng.normal(0.5, 0.1, 500).tolist())
    shifted = signal_psi(ref, rng.normal(0.7, 0.1, 500).tolist())
    assert same < 0.1 < 0.25 < shifted
    cat = categorical_reference(["NV"] * 70 + ["MEL"] * 30, ["MEL", "NV"])
    assert signal_psi(cat, ["NV"] * 7 + ["MEL"] * 3) == pytest.approx(0, abs=1e-9)
    assert signal_psi(cat, ["MEL"] * 10) > 0.25
    assert np.isnan(psi([0.5, 0.5], [0, 0]))


def test_image_stats_see_brightness_and_colour():
    dark = image_stats(Image.new("RGB", (300, 200), (30, 30, 30)))
    red = image_stats(Image.new("RGB", (64, 64), (220, 40, 40)))
    assert dark["brightness"] < 0.15 and dark["contrast"] == pytest.approx(0, abs=1e-6)
    assert red["red"] > 0.8 > red["green"] and red["saturation"] > 0.7


def test_reference_in_bundle_and_monitor(tiny_bundle, tiny_predictor):
    ref = read_reference_stats(tiny_bundle)
    assert (tiny_bundle / REFERENCE_FILE).exists() and ref["task"] == "isic2018" and ref["n_lesions"] == 48
    assert set(ref["class_prior"]) == set(tiny_predictor.task.classes)
    assert sum(ref["class_prior"].values()) == pytest.approx(1)
    for s in ("dermoscopic.brightness", "dermoscopic.contrast", "dermoscopic.red", "dermoscopic.saturation",
              "confidence", "predicted_class"):
        assert s in ref["signals"], s
    mon = DriftMonitor(ref, window=20, min_samples=5)
    assert mon.current() == {}  # not enough data yet
    for _ in range(25):  # very dark images, one class
        mon.observe({"dermoscopic.brightness": 0.02, "confidence": 0.99, "predicted_class": "VASC"})
    cur = mon.current()
    assert len(mon.window) == 20 and cur["dermoscopic.brightness"]["level"] == "major"
    assert cur["dermoscopic.brightness"]["n"] == 20 and "dermoscopic.red" not in cur
    assert drift_psi(ref, []) == {}


def test_serve_print_config_and_errors(tmp_path):
    from typer.testing import CliRunner

    from dermfusion.cli import app
    from dermfusion.service.config import ServiceConfig

    res = CliRunner().invoke(app, ["serve", "--print-config"])
    assert res.exit_code == 0, res.output
    cfg = ServiceConfig.model_validate(yaml.safe_load(res.output))
    # triage cut-offs unset: the served bundle's operating point applies unless service.yaml overrides it
    assert cfg.triage.urgent_risk is None and not cfg.triage.is_override and cfg.audit.db_url.startswith("sqlite:///")
    res = CliRunner().invoke(app, ["serve", str(tmp_path / "nope")])
    assert res.exit_code == 2 and "not found" in res.output
    bad = tmp_path / "service.yaml"
    bad.write_text("workers: {workers: -1}\n")
    res = CliRunner().invoke(app, ["serve", str(tmp_path), "--config", str(bad)])
    assert res.exit_code == 2 and "workers" in res.output


def test_reference_from_given_probabilities(tiny_predictor, ham_sample):
    from dermfusion.evaluation.drift_reference import compute_reference_stats

    n, c = len(ham_sample), tiny_predictor.task.num_classes
    probs = np.full((n, c), 0.02)
    probs[:, 1] = 1 - 0.02 * (c - 1)  # always NV
    ref = compute_reference_stats(tiny_predictor, ham_sample, probs=probs, max_lesions=20)
    assert ref["n_lesions"] == 20 and ref["signals"]["predicted_class"]["probs"][1] == 1.0
    with pytest.raises(ValueError):
        compute_reference_stats(tiny_predictor, ham_sample, probs=probs[:3])
