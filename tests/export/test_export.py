"""ONNX export of the whole fusion network, its metadata, parity with PyTorch, and Triton repositories."""
from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch

from dermfusion.export import (ExportParityError, batch_to_onnx_inputs, export_onnx, input_specs, parse_pbtxt,
                               read_metadata, write_triton_repository)
from dermfusion.export.triton import ONNX_TO_TRITON
from cli_helpers import squash
from perf_helpers import TINY_ENCODER, tiny_batch, tiny_open_clip_dir, tiny_spec, tiny_trimodal, write_tiny_bundle

ort = pytest.importorskip("onnxruntime")
CLASSES = ["MEL", "NV", "BCC", "BKL"]


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """The tiny tri-modal model exported with the default exporter (dynamo, TorchScript fallback)."""
    torch.set_num_threads(1)
    model = tiny_trimodal()
    path = tmp_path_factory.mktemp("onnx") / "model.onnx"
    res = export_onnx(model, path, classes=CLASSES)
    return model, path, res


def _session(path):
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


@pytest.mark.slow
@pytest.mark.parametrize("batch_size", [1, 3])
def test_onnx_reproduces_pytorch_probabilities(exported, batch_size):
    model, path, res = exported
    assert res.max_abs_prob_diff is not None and res.max_abs_prob_diff <= 1e-4
    batch = tiny_batch(model, batch_size, seed=10 + batch_size)
    with torch.no_grad():
        ref = torch.softmax(model(batch)["logits"], -1).numpy()
    probs, logits = _session(path).run(["probabilities", "logits"], batch_to_onnx_inputs(batch, specs=input_specs(model)))
    assert probs.shape == (batch_size, len(CLASSES))
    assert np.abs(probs - ref).max() <= 1e-4
    np.testing.assert_allclose(probs, torch.softmax(torch.from_numpy(logits), -1).numpy(), atol=1e-6)


def test_onnx_keeps_masking(exported):
    """A missing image's pixels must not influence the exported graph either."""
    model, path, _ = exported
    batch = tiny_batch(model, 3, seed=3)
    feeds = batch_to_onnx_inputs(batch, specs=input_specs(model))
    sess = _session(path)
    a = sess.run(["probabilities"], feeds)[0]
    feeds["image_clinical"][0] = np.random.default_rng(0).normal(size=feeds["image_clinical"][0].shape) * 5
    b = sess.run(["probabilities"], feeds)[0]
    np.testing.assert_array_equal(a[0], b[0])


def test_onnx_inputs_outputs_and_metadata(exported):
    model, path, _ = exported
    proto = onnx.load(str(path))
    assert max(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")) >= 17
    inputs = {i.name: i for i in proto.graph.input}
    assert list(inputs) == ["image_clinical", "image_dermoscopic", "image_present", "concepts", "concepts_present",
                            "numeric", "numeric_present", "categorical"]
    assert inputs["image_present"].type.tensor_type.elem_type == onnx.TensorProto.BOOL
    assert inputs["categorical"].type.tensor_type.elem_type == onnx.TensorProto.INT64
    for v in list(proto.graph.input) + list(proto.graph.output):  # dynamic batch everywhere
        assert not v.type.tensor_type.shape.dim[0].HasField("dim_value")
    assert [o.name for o in proto.graph.output] == ["probabilities", "logits"]
    meta = read_metadata(path)
    assert meta["dermfusion.classes"] == CLASSES
    assert meta["dermfusion.modalities"] == ["clinical", "dermoscopic"]
    for m, dc in model.data_config.items():
        pre = meta["dermfusion.preprocess"][m]
        assert pre["size"] == dc["input_size"][-1]
        assert pre["mean"] == pytest.approx(list(dc["mean"])) and pre["std"] == pytest.approx(list(dc["std"]))


def test_torchscript_exporter_dynamic_batch(tmp_path):
    torch.set_num_threads(1)
    model = tiny_trimodal(seed=1)
    res = export_onnx(model, tmp_path / "m.onnx", exporter="torchscript", batch_sizes=(1, 3, 5))
    assert res.exporter == "torchscript" and set(res.parity) == {1, 3, 5}
    assert res.max_abs_prob_diff <= 1e-4


@pytest.mark.parametrize("use_metadata", [True, False])
def test_torchscript_export_without_concepts(tmp_path, use_metadata):
    """HAM10000-style models have no MONET concept scores: the empty concept part must not reach the graph
    (as a B×0×D Reshape, which ONNX reads as "copy that dimension" and ONNX Runtime refuses)."""
    from dermfusion.data.features import FeatureSpec

    torch.set_num_threads(1)
    spec = FeatureSpec(modalities=["clinical", "dermoscopic"], concepts=[])
    if not use_metadata:
        spec.numeric, spec.categorical = [], {}
    model = tiny_trimodal(seed=2, spec=spec)
    res = export_onnx(model, tmp_path / "m.onnx", exporter="torchscript", batch_sizes=(1, 3))
    assert res.max_abs_prob_diff <= 1e-4
    batch = tiny_batch(model, 3)
    sess = _session(tmp_path / "m.onnx")
    (probs,) = sess.run(["probabilities"], batch_to_onnx_inputs(batch, names=[i.name for i in sess.get_inputs()]))
    with torch.no_grad():
        ref = torch.softmax(model(batch)["logits"], -1).numpy()
    assert np.isfinite(probs).all() and np.abs(probs - ref).max() <= 1e-4


def test_single_image_with_categorical_metadata_only_exports_with_a_dynamic_batch(tmp_path):
    """Derm7pt's metadata model (sex, site, elevation: categorical fields, no numeric one) once exported with its
    batch size pinned to the trace's (Python ``len()`` of a tensor, and an empty concept group reshaped to
    B×0×D), so the training's out-of-fold pass and `predict` fell back to eager PyTorch. Parity at batch sizes the
    trace did not use fails such a graph."""
    from dermfusion.data.features import FeatureSpec
    from dermfusion.models import create_model

    torch.set_num_threads(1)
    torch.manual_seed(3)
    spec = FeatureSpec(modalities=["dermoscopic"], concepts=[])
    spec.numeric = []
    assert spec.categorical  # sex, skin tone, site, … — codes only
    model = create_model("single_image", num_classes=5, feature_spec=spec, encoder=TINY_ENCODER, use_metadata=True,
                         meta_dim=16).eval()
    res = export_onnx(model, tmp_path / "m.onnx", batch_sizes=(1, 3, 5))
    assert set(res.parity) == {1, 3, 5} and res.max_abs_prob_diff <= 1e-4
    assert "numeric" not in [s["name"] for s in res.inputs] and "categorical" in [s["name"] for s in res.inputs]


def test_parity_failure_raises(tmp_path):
    with pytest.raises(ExportParityError):
        export_onnx(tiny_trimodal(), tmp_path / "m.onnx", exporter="torchscript", atol=-1.0)


# ------------------------------------------------------------------------------------------ Triton
def test_pbtxt_parser():
    text = '''name: "m"  # comment
    max_batch_size: 8
    input [ { name: "a" data_type: TYPE_FP32 dims: [ 3, 4 ] }, { name: "b", data_type: TYPE_BOOL, dims: [2] } ]
    dynamic_batching { preferred_batch_size: [ 4, 8 ] max_queue_delay_microseconds: 100 }
    parameters { key: "k" value: { string_value: "say \\"hi\\"" } }
    '''
    c = parse_pbtxt(text)
    assert c["name"] == ["m"] and c["max_batch_size"] == [8]
    assert [i["name"][0] for i in c["input"]] == ["a", "b"]
    assert c["input"][0]["dims"] == [3, 4] and c["input"][1]["data_type"] == ["TYPE_BOOL"]
    assert c["dynamic_batching"][0]["preferred_batch_size"] == [4, 8]
    assert c["parameters"][0]["value"][0]["string_value"] == ['say "hi"']


def _graph_io(values):
    return {v.name: (ONNX_TO_TRITON[v.type.tensor_type.elem_type], [d.dim_value for d in v.type.tensor_type.shape.dim[1:]])
            for v in values}


def test_triton_repository_matches_onnx_graph(exported, tmp_path):
    _, path, _ = exported
    model_dir = write_triton_repository(path, tmp_path / "repo", "tiny_fusion", max_batch_size=16)
    assert (model_dir / "1" / "model.onnx").is_file()
    cfg = parse_pbtxt((model_dir / "config.pbtxt").read_text())
    assert cfg["name"] == ["tiny_fusion"] and cfg["platform"] == ["onnxruntime_onnx"]
    assert cfg["max_batch_size"] == [16] and "dynamic_batching" in cfg
    proto = onnx.load(str(model_dir / "1" / "model.onnx"))
    for kind, values in (("input", proto.graph.input), ("output", proto.graph.output)):
        declared = {t["name"][0]: (t["data_type"][0], t["dims"]) for t in cfg[kind]}
        assert declared == _graph_io(values), kind
    params = {p["key"][0]: p["value"][0]["string_value"][0] for p in cfg["parameters"]}
    assert json.loads(params["dermfusion.classes"]) == CLASSES


def test_export_cli_triton_from_bundle(tmp_path):
    from typer.testing import CliRunner

    from dermfusion.cli import app

    torch.set_num_threads(1)
    bundle = write_tiny_bundle(tmp_path / "bundle")
    res = CliRunner().invoke(app, ["export", str(bundle), "--format", "triton", "--out", str(tmp_path / "repo"),
                                   "--exporter", "torchscript", "--max-batch-size", "8"])
    assert res.exit_code == 0, res.output
    assert "max |Δp|" in squash(res.output)
    model_dir = tmp_path / "repo" / "tiny_trimodal_fold0"
    cfg = parse_pbtxt((model_dir / "config.pbtxt").read_text())
    assert cfg["max_batch_size"] == [8]
    meta = read_metadata(model_dir / "1" / "model.onnx")
    assert meta["dermfusion.task"] == "milk10k" and len(meta["dermfusion.classes"]) == 11
    res = CliRunner().invoke(app, ["export", str(bundle), "--format", "onnx", "--out", str(tmp_path / "onnx"),
                                   "--exporter", "torchscript"])
    assert res.exit_code == 0, res.output
    assert (tmp_path / "onnx" / "model.onnx").is_file() and (tmp_path / "onnx" / "export.json").is_file()


@pytest.mark.slow
def test_open_clip_encoder_exports(tmp_path):
    """open_clip / DermLIP towers use nn.MultiheadAttention, whose fused eval kernel no ONNX exporter knows:
    export must go through the equal SDPA form and still match PyTorch."""
    from dermfusion.models import create_model

    tiny_open_clip_dir(tmp_path / "dermlip")
    torch.manual_seed(0)
    model = create_model("trimodal_fusion", num_classes=len(CLASSES), feature_spec=tiny_spec(),
                         encoder={"name": f"open_clip:{tmp_path / 'dermlip'}"}, fusion_dim=32, num_heads=2).eval()
    assert any(type(m) is torch.nn.MultiheadAttention for m in model.modules())
    res = export_onnx(model, tmp_path / "model.onnx", classes=CLASSES)
    assert res.max_abs_prob_diff <= 1e-4
    assert any(type(m) is torch.nn.MultiheadAttention for m in model.modules())  # the caller's model is untouched
    batch = tiny_batch(model, 2, seed=5)
    with torch.no_grad():
        ref = torch.softmax(model(batch)["logits"], -1).numpy()
    probs = _session(tmp_path / "model.onnx").run(["probabilities"], batch_to_onnx_inputs(batch, specs=input_specs(model)))[0]
    assert np.abs(probs - ref).max() <= 1e-4


def test_criteria_heads_ride_in_the_graph(tmp_path):
    """A multi-task network's 7-point criteria are a further graph output, so `predict` and the service get them
    from the same ONNX Runtime pass as the diagnosis (no second, eager pass): split back per criterion they equal
    PyTorch's heads, and the ONNX backend returns them as the model does."""
    from dermfusion.data.features import FeatureSpec
    from dermfusion.export.graph_io import CRITERIA_OUTPUT, criteria_from_onnx
    from dermfusion.inference.backends.onnx_runtime import onnx_backend
    from dermfusion.models import create_model

    torch.set_num_threads(1)
    torch.manual_seed(4)
    spec = FeatureSpec(modalities=["dermoscopic"], concepts=[])
    spec.numeric, spec.categorical = [], {}
    model = create_model("single_image", num_classes=5, feature_spec=spec, encoder=TINY_ENCODER,
                         use_metadata=False, criteria="seven_point").eval()
    res = export_onnx(model, tmp_path / "m.onnx", exporter="torchscript", batch_sizes=(1, 3))
    assert res.max_abs_prob_diff <= 1e-4
    sess = _session(tmp_path / "m.onnx")
    assert [o.name for o in sess.get_outputs()] == ["probabilities", "logits", CRITERIA_OUTPUT]
    from dermfusion.export.onnx import synthetic_batch

    batch = synthetic_batch(model, 3, seed=5)
    (flat,) = sess.run([CRITERIA_OUTPUT], batch_to_onnx_inputs(batch, names=[i.name for i in sess.get_inputs()]))
    with torch.no_grad():
        ref = model(batch)["criteria"]
    got = criteria_from_onnx(model, flat)
    assert list(got) == [c.name for c in model.criteria_heads.criteria]
    for name, z in ref.items():
        np.testing.assert_allclose(got[name].numpy(), z.numpy(), atol=1e-4)
    served = onnx_backend(model, "cpu", threads=1, exporter="torchscript")(batch)
    assert set(served["criteria"]) == set(ref)
