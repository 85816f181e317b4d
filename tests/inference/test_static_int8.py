"""The CNN fast path: TF "same" padding made static for export (outputs unchanged, no shape arithmetic left in
the graph), ONNX Runtime static int8 (``onnx-qdq``: calibrated, first conv and head in float32), the layer
statistics as an ONNX output, and the backend check written into the bundle (not hashed)."""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from dermfusion.data.features import FeatureSpec
from dermfusion.export.onnx import synthetic_batch
from dermfusion.export.static_padding import static_same_padding_
from dermfusion.models.layer_stats import LayerStats

pytestmark = pytest.mark.usefixtures("one_torch_thread")
pytest.importorskip("onnxruntime")


@pytest.fixture(scope="module")
def lite_model():
    """A randomly initialised single-image EfficientNet-Lite0 network at 64 px (timm's TF port: Conv2dSame)."""
    from dermfusion.models import create_model

    torch.manual_seed(0)
    spec = FeatureSpec(modalities=["dermoscopic"], concepts=[])
    spec.numeric, spec.categorical = [], {}
    m = create_model("single_image", num_classes=4, feature_spec=spec, modality="dermoscopic",
                     encoder={"name": "timm:tf_efficientnet_lite0", "input_size": 64}).eval()
    return m


def test_static_padding_keeps_outputs_and_removes_shape_arithmetic(lite_model, tmp_path):
    import onnx

    from dermfusion.export.onnx import export_onnx

    batch = synthetic_batch(lite_model, 2)
    static = copy.deepcopy(lite_model)
    n = static_same_padding_(static, batch)
    assert n >= 4 and not any(type(m).__name__ == "Conv2dSame" for m in static.modules())
    with torch.no_grad():
        torch.testing.assert_close(static(batch)["logits"], lite_model(batch)["logits"], atol=1e-6, rtol=1e-6)
    assert any(type(m).__name__ == "Conv2dSame" for m in lite_model.modules())  # the original is untouched
    export_onnx(lite_model, tmp_path / "m.onnx", exporter="torchscript", batch_sizes=(1, 3))  # parity-checked
    ops = {n.op_type for n in onnx.load(str(tmp_path / "m.onnx")).graph.node}
    assert "Ceil" not in ops and "Pad" in ops


def test_onnx_backends_return_the_familiarity_layer_statistics(lite_model):
    from dermfusion.inference.backends import prepare_backend

    batch = synthetic_batch(lite_model, 3)
    probe = LayerStats(lite_model, "dermoscopic")
    with torch.no_grad(), probe:
        lite_model(batch)
    ref = probe.take().numpy()
    out = prepare_backend(lite_model, "onnx", layer_stats="dermoscopic")(batch)
    np.testing.assert_allclose(out["layer_stats"], ref, rtol=1e-3, atol=1e-4)
    assert "layer_stats" not in prepare_backend(lite_model, "onnx")(batch)


def test_onnx_qdq_quantises_convolutions_and_keeps_the_head_in_float(lite_model):
    from dermfusion.inference.backends import compare_probs, prepare_backend

    cal = [synthetic_batch(lite_model, 4, seed=s) for s in range(3)]
    runner = prepare_backend(lite_model, "onnx-qdq", calibration_batches=cal)
    assert runner.name == "onnx-qdq" and runner.info["calibration_images"] == 12 and runner.info["float_nodes"] > 0
    batch = synthetic_batch(lite_model, 4, seed=9)
    with torch.no_grad():
        ref = torch.softmax(lite_model(batch)["logits"], -1)
    cmp = compare_probs(ref, runner.predict_proba(batch))
    assert np.isfinite(cmp["max_prob_diff"]) and cmp["max_prob_diff"] < 0.5  # int8 of a random net: close, not equal
    everything = prepare_backend(lite_model, "onnx-qdq", calibration_batches=cal, keep_float="none")
    assert everything.info["float_nodes"] == 0
    with pytest.raises(Exception, match="calibration"):
        prepare_backend(lite_model, "onnx-qdq", calibration_batches=cal, calibration="guess")


def test_static_int8_is_measured_for_cnns_and_auto_needs_an_agreement_record(lite_model):
    from dermfusion.inference.backend_policy import approximate_candidates
    from dermfusion.inference.network import default_candidates
    from perf_helpers import tiny_trimodal

    assert "onnx-qdq" in approximate_candidates("cpu", lite_model)
    assert "onnx-qdq" not in approximate_candidates("cpu", tiny_trimodal())  # a ViT: only its patch embedding convolves
    # without a bundle's agreement record, auto considers the exact backends only
    assert default_candidates("cpu", lite_model) == ["onnx"]


def test_backend_check_is_written_into_the_bundle_outside_the_hash(tmp_path):
    from dermfusion.bundle import read_bundle, verify_bundle
    from dermfusion.inference.network import write_backend_check
    from perf_helpers import write_tiny_bundle

    bundle = read_bundle(write_tiny_bundle(tmp_path / "b"))
    write_backend_check(bundle, "onnx", [{"name": "fp32", "ok": True, "latency_ms": 3.0},
                                         {"name": "onnx", "ok": True, "latency_ms": 1.0, "error": "x"}], 32)
    import json

    data = json.loads((bundle.path / "backend_check.json").read_text())
    (entry,) = data.values()
    assert entry["chosen"] == "onnx" and entry["lesions_checked"] == 32
    assert all("error" not in c for c in entry["candidates"])
    verify_bundle(bundle.path)  # documentation: the content hash is unchanged
