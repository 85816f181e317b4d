"""The "cannot assess" gate's familiarity check: the reference statistics (cross-fitted, stored, read back), the
layer probes on real timm encoders, and the check through the service (refuses with code "unfamiliar")."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from dermfusion.evaluation.embedding_reference import (EmbeddingReferenceError, fit_reference, read_reference,
                                                       score_threshold, unfamiliarity, write_reference)
from dermfusion.models.layer_stats import LayerStats, pooled_stats, probe_layers

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _lesions(n, dims=(12, 20), seed=0):
    basis = np.random.default_rng(100).normal(size=(4, sum(dims)))  # one population; seeds draw lesions from it
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, 4)) @ basis + 0.1 * rng.normal(size=(n, sum(dims))) + 5.0


def test_typical_rows_score_about_one_and_unlike_rows_far_above_the_cut():
    dims = (12, 20)
    ref = fit_reference(_lesions(400, dims), dims, layer_names=("a", "b"))
    typical = unfamiliarity(ref, _lesions(300, dims, seed=1))
    assert 0.8 < np.median(typical) < 1.25
    cut = score_threshold(ref)
    assert cut == pytest.approx(ref["quantiles"][-1])           # margin 1, level 1: the largest reference score
    assert (typical > cut).mean() < 0.03                          # cross-fitted: new typical rows rarely exceed it
    odd = _lesions(20, dims, seed=2) + np.random.default_rng(3).normal(scale=3.0, size=(20, sum(dims)))
    assert (unfamiliarity(ref, odd) > cut).all()
    assert score_threshold(ref, margin=2.0) == pytest.approx(2 * cut)


def test_reference_round_trips_and_refuses_bad_input(tmp_path):
    dims = (12, 20)
    x = _lesions(100, dims)
    ref = fit_reference(x, dims, layer_names=("a", "b"), source="unit test")
    ref["modality"] = "dermoscopic"
    write_reference(tmp_path, ref)
    back = read_reference(tmp_path)
    assert back["dims"] == [12, 20] and back["layer_names"] == ["a", "b"] and back["modality"] == "dermoscopic"
    assert back["n"] == 100 and back["source"] == "unit test"
    np.testing.assert_allclose(unfamiliarity(back, x[:5]), unfamiliarity(ref, x[:5]), rtol=1e-4)
    assert read_reference(tmp_path / "nowhere") is None
    with pytest.raises(EmbeddingReferenceError, match="columns"):
        unfamiliarity(ref, np.zeros((1, 31)))
    with pytest.raises(EmbeddingReferenceError, match="at least"):
        fit_reference(x[:10], dims)
    bad = x.copy()
    bad[0, 0] = np.nan
    with pytest.raises(EmbeddingReferenceError, match="NaN"):
        fit_reference(bad, dims)


def test_pooled_stats_of_maps_and_tokens():
    m = torch.arange(2 * 3 * 4 * 5, dtype=torch.float32).reshape(2, 3, 4, 5)
    s = pooled_stats(m)
    assert s.shape == (2, 6)
    torch.testing.assert_close(s[:, :3], m.mean((2, 3)))
    t = torch.randn(2, 7, 5)
    torch.testing.assert_close(pooled_stats(t)[:, 5:], t.std(1))


@pytest.mark.parametrize("name,expected", [("efficientnet_lite0", ["blocks.2", "blocks.3", "blocks.4", "blocks.5"]),
                                           ("resnet18", ["layer2", "layer3"])])
def test_probe_layers_of_timm_encoders(name, expected):
    timm = pytest.importorskip("timm")
    from dermfusion.models.backbones import create_backbone

    enc = create_backbone(f"timm:{name}")
    assert [n for n, _ in probe_layers(enc)] == expected
    model = torch.nn.Module()
    model.encoders = torch.nn.ModuleDict({"dermoscopic": enc})
    probe = LayerStats(model, "dermoscopic")
    with torch.no_grad(), probe:
        enc.forward_tokens(torch.randn(3, 3, 64, 64))
    rows = probe.take()
    assert rows.shape[0] == 3 and rows.shape[1] == sum(probe.dims()) and torch.isfinite(rows).all()
    with torch.no_grad():  # hooks are gone after the block: nothing new is recorded
        probe._out.clear()
        enc.forward_tokens(torch.randn(1, 3, 64, 64))
    assert probe.take() is None
    shared = torch.nn.Module()
    shared.encoders = torch.nn.ModuleDict({"clinical": enc, "dermoscopic": enc})
    assert not LayerStats(shared, "dermoscopic").available  # a shared encoder's calls cannot be told apart
    del timm


def test_layer_stats_keep_only_their_own_threads_pass():
    """Two requests through one model at once: each keeps the statistics of its own image."""
    import threading

    enc = torch.nn.Module()
    enc.blocks = torch.nn.Sequential(*[torch.nn.Conv2d(3, 3, 1) for _ in range(2)])
    model = torch.nn.Module()
    model.encoders = torch.nn.ModuleDict({"dermoscopic": enc})
    started, other_done = threading.Event(), threading.Event()

    def other():
        started.wait()
        with torch.no_grad():
            enc.blocks(torch.full((1, 3, 4, 4), 7.0))  # runs while the first probe's hooks are registered
        other_done.set()

    t = threading.Thread(target=other)
    t.start()
    probe = LayerStats(model, "dermoscopic")
    with torch.no_grad(), probe:
        started.set()
        other_done.wait(5)
        assert probe.take() is None  # the other thread's pass was not recorded
        x = torch.zeros(1, 3, 4, 4)
        enc.blocks(x)
    t.join()
    with torch.no_grad():
        ref = torch.cat([pooled_stats(enc.blocks[0](x)), pooled_stats(enc.blocks[1](enc.blocks[0](x)))], 1)
    torch.testing.assert_close(probe.take(), ref)
