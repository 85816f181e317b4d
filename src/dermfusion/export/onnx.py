"""Export a whole fusion network (encoders, concept/metadata tokens, fusion, heads) to ONNX.

Graph inputs (batch dimension dynamic, named ``batch``):

  image_<modality>   float32 B×3×H×W   normalised pixels, one input per modality (zeros where absent)
  image_present      bool    B×M       column order = ``modalities`` in the metadata
  concepts           float32 B×K       ┐ only when the model has concepts (K > 0)
  concepts_present   bool    B×K       ┘
  numeric            float32 B×N       ┐ only when it has numeric metadata
  numeric_present    bool    B×N       ┘
  categorical        int64   B×Q         only when it has categorical metadata (0 = unknown)

Outputs: ``probabilities`` (softmax, B×C) and ``logits`` (B×C); a multi-task network (dermoscopic criteria heads)
adds ``criteria_logits`` (B×ΣL: each criterion's label logits side by side, in the criteria set's order — see
``criteria_from_onnx``); ``layer_stats`` when asked for. Absent inputs are *masked*, exactly as in PyTorch: an absent
image's pixels cannot change the output.

``metadata_props`` carry what a client needs to feed the graph without dermfusion:
``dermfusion.classes``, ``dermfusion.modalities``, ``dermfusion.preprocess`` (size/mean/std/
interpolation per modality), ``dermfusion.feature_spec``, ``dermfusion.inputs`` (name, dtype,
shape, meaning), plus task/name/version/bundle hash when exported from a bundle. All values are JSON.

At export the graph is run with ONNX Runtime on batches of several sizes (one image missing) and
compared with PyTorch; :class:`ExportParityError` is raised when probabilities differ by more than
``atol`` (1e-4).
"""
from __future__ import annotations

import contextlib
import copy
import io
import json
import logging
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch import nn

from .. import __version__
from ..bundle import BundleError, read_bundle, resolve_one
from ..errors import DermfusionError
from ..explain.explainer import Explainer
from ..models.checkpoint import CheckpointMismatchError
from ..models.factory import load_network
from ..models.fast_attention import fast_attention_
from .graph_io import (OUTPUT_NAMES, InputSpec, OnnxFusionWrapper, _example_args,  # noqa: F401 (re-exported)
                       batch_to_onnx_inputs, input_specs)
from .static_padding import static_same_padding_
from .synthetic import synthetic_batch

OPSET = 18


class ExportParityError(DermfusionError, RuntimeError):
    """The exported graph does not reproduce PyTorch's probabilities within tolerance."""


def _torch_export(wrapper: nn.Module, args: tuple, path: Path, specs: Sequence[InputSpec], opset: int,
                  exporter: str = "auto", outputs: Sequence[str] = OUTPUT_NAMES) -> str:
    """Export with ``exporter`` ("dynamo", "torchscript", or "auto": dynamo, then TorchScript); returns which worked."""
    if exporter not in {"auto", "dynamo", "torchscript"}:
        raise ValueError(f"exporter must be auto, dynamo or torchscript, not {exporter!r}")
    names = [s.name for s in specs]
    errors = []
    if exporter in {"auto", "dynamo"}:
        quiet = [logging.getLogger(n) for n in ("onnxscript", "onnx_ir", "torch.onnx", "torch.export")]
        levels = [lg.level for lg in quiet]
        try:
            for lg in quiet:
                lg.setLevel(logging.ERROR)
            batch = torch.export.Dim("batch", min=1, max=4096)
            with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
                warnings.simplefilter("ignore")
                # forward(*inputs): one var-positional argument, hence the extra tuple level
                prog = torch.onnx.export(wrapper, args, dynamo=True, input_names=names,
                                         output_names=list(outputs),
                                         dynamic_shapes=(tuple({0: batch} for _ in specs),), opset_version=opset,
                                         optimize=True, verbose=False)
                prog.save(str(path))
            return "dynamo"
        except Exception as e:  # noqa: BLE001
            errors.append(f"dynamo: {type(e).__name__}: {str(e)[:500]}")
            if exporter == "dynamo":
                raise RuntimeError("ONNX export failed:\n" + errors[0]) from e
        finally:
            for lg, lv in zip(quiet, levels):
                lg.setLevel(lv)
    try:
        axes = {n: {0: "batch"} for n in [*names, *outputs]}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(wrapper, args, str(path), dynamo=False, input_names=names,
                              output_names=list(outputs), dynamic_axes=axes, opset_version=opset,
                              do_constant_folding=True)
        return "torchscript"
    except Exception as e:  # noqa: BLE001
        errors.append(f"torchscript: {type(e).__name__}: {str(e)[:500]}")
    # one line per exporter, the first of them readable alone (callers that print one line show the cause)
    raise RuntimeError("ONNX export failed with both exporters: " + "; ".join(e.splitlines()[0] for e in errors)
                       + "\n" + "\n".join(errors))


def _set_metadata(path: Path, props: dict[str, str]) -> None:
    import onnx

    proto = onnx.load(str(path), load_external_data=True)
    existing = {p.key: p for p in proto.metadata_props}
    for k, v in props.items():
        if k in existing:
            existing[k].value = v
        else:
            entry = proto.metadata_props.add()
            entry.key, entry.value = k, v
    proto.producer_name = "dermfusion"
    if proto.ByteSize() > 1_800_000_000:  # protobuf's 2 GB limit: keep weights beside the graph
        onnx.save(proto, str(path), save_as_external_data=True, location=path.name + ".data")
    else:
        onnx.save(proto, str(path))
    stray = path.with_name(path.name + ".data")
    if stray.exists() and proto.ByteSize() <= 1_800_000_000:
        stray.unlink()


def read_metadata(path: str | Path) -> dict:
    """The ``dermfusion.*`` metadata of an exported graph, JSON values decoded."""
    import onnx

    proto = onnx.load(str(path), load_external_data=False)
    out = {}
    for p in proto.metadata_props:
        try:
            out[p.key] = json.loads(p.value)
        except json.JSONDecodeError:
            out[p.key] = p.value
    return out


@dataclass
class ExportResult:
    path: Path
    exporter: str
    inputs: list[dict]
    max_abs_prob_diff: float | None = None
    parity: dict = field(default_factory=dict)   # batch size -> max abs prob diff

    def to_dict(self) -> dict:
        return {"path": str(self.path), "exporter": self.exporter, "inputs": self.inputs,
                "max_abs_prob_diff": self.max_abs_prob_diff, "parity": self.parity}


def cpu_session(model: str | Path | bytes, threads: int | None = None):
    """An ONNX Runtime CPU session on a model file or serialised bytes: ``threads`` intra-op threads (torch's
    count by default), one inter-op thread, every graph optimisation."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads or torch.get_num_threads()
    opts.inter_op_num_threads = 1
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(model if isinstance(model, bytes) else str(model), opts,
                                providers=["CPUExecutionProvider"])


def check_parity(model: nn.Module, path: str | Path, batch_sizes: Sequence[int] = (1, 3), seed: int = 1,
                 batches: Sequence[dict] | None = None, threads: int | None = None) -> dict[int, float]:
    """Max |p_onnx − p_torch| per batch size on random batches with one missing image."""
    sess = cpu_session(path, threads)
    specs = input_specs(model)
    batches = list(batches) if batches is not None else [synthetic_batch(model, b, seed=seed + b) for b in batch_sizes]
    model.eval()
    out = {}
    for batch in batches:
        with torch.no_grad():
            ref = torch.softmax(model(batch)["logits"].float(), -1).numpy()
        probs = sess.run(["probabilities"], batch_to_onnx_inputs(batch, specs=specs))[0]
        out[int(ref.shape[0])] = float(np.abs(probs - ref).max())
    return out


def export_onnx(model: nn.Module, out: str | Path, *, classes: Sequence[str] | None = None,
                preprocess: dict | None = None, metadata: dict | None = None, opset: int = OPSET,
                check: bool = True, atol: float = 1e-4, batch_sizes: Sequence[int] = (1, 3),
                exporter: str = "auto", layer_stats: str | None = None) -> ExportResult:
    """Write ``model`` (a dermfusion network, float32) to ``out`` (a .onnx file); see the module doc.

    ``preprocess`` defaults to the model's ``data_config``. With ``check`` the graph is compared with
    PyTorch at ``batch_sizes`` and :class:`ExportParityError` raised beyond ``atol``. ``exporter``:
    "dynamo" (torch.export), "torchscript" (the legacy tracer; faster to run), or "auto" (dynamo,
    falling back to TorchScript). ``layer_stats``: an image modality whose encoder's layer statistics
    (``models.layer_stats``) become a third output, ``layer_stats`` (what the service's familiarity check reads).
    """
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    model = model.float().eval()
    specs = input_specs(model)
    # nn.MultiheadAttention (open_clip / DermLIP towers, our fusion) runs aten::_native_multi_head_attention in
    # eval mode, which no ONNX exporter supports: export a copy with the numerically equal SDPA form.
    graph_model = copy.deepcopy(model)
    Explainer.remove_from(graph_model)  # an explained model's copy: no recording hooks, fused attention back on
    fast_attention_(graph_model)
    example = synthetic_batch(model, 2, seed=0)
    static_same_padding_(graph_model, example)  # the graph takes one image size: TF "same" padding made constant
    wrapper = OnnxFusionWrapper(graph_model, [s.name for s in specs], layer_stats).eval()
    outputs = wrapper.output_names
    with torch.no_grad():
        exporter = _torch_export(wrapper, _example_args(example, specs), out, specs, opset, exporter, outputs)
    if preprocess is None:
        preprocess = {m: {"size": int(c["input_size"][-1]), "mean": list(c["mean"]), "std": list(c["std"]),
                          "interpolation": c.get("interpolation", "bicubic"),
                          "crop_pct": float(c.get("resize_crop_pct", 1.0)),
                          "source": str(c.get("preprocess_source", ""))} for m, c in model.data_config.items()}
    props = {"dermfusion.version": __version__,
             "dermfusion.modalities": list(model.feature_spec.modalities),
             "dermfusion.preprocess": preprocess,
             "dermfusion.feature_spec": model.feature_spec.to_dict(),
             "dermfusion.inputs": [s.to_dict() for s in specs],
             "dermfusion.outputs": list(outputs)}
    if classes is not None:
        props["dermfusion.classes"] = list(classes)
    props.update(metadata or {})
    _set_metadata(out, {k: v if isinstance(v, str) else json.dumps(v) for k, v in props.items()})
    result = ExportResult(out, exporter, [s.to_dict() for s in specs])
    if check:
        result.parity = check_parity(model, out, batch_sizes)
        result.max_abs_prob_diff = max(result.parity.values())
        if not result.max_abs_prob_diff <= atol:
            raise ExportParityError(f"{out}: ONNX probabilities differ from PyTorch by {result.max_abs_prob_diff:.3g} "
                                    f"(> {atol}); per batch size: {result.parity}")
    return result


def load_bundle_model(bundle_path: str | Path, what: str = "export"):
    """(model in eval mode, bundle) from a network bundle — the same weights ``NetworkPredictor`` loads. A run
    directory that stands for a single bundle (``--folds full``) is accepted too."""
    bundle = read_bundle(resolve_one(bundle_path, what))
    if bundle.kind != "network":
        raise BundleError(f"{bundle_path}: {what} needs a network bundle (kind 'network'), not {bundle.kind!r}")
    try:
        model, *_ = load_network(bundle.config, bundle.file("model.safetensors"))
    except CheckpointMismatchError as e:
        raise BundleError(f"{bundle.path}: weights do not match the model ({e})") from None
    return model, bundle


def export_bundle_onnx(bundle_path: str | Path, out: str | Path, **kwargs) -> ExportResult:
    """Export a network bundle's model to ``out`` (a .onnx file), with the bundle's classes, preprocessing
    and provenance in the metadata."""
    model, bundle = load_bundle_model(bundle_path)
    meta = {"dermfusion.task": bundle.config.get("task"), "dermfusion.name": bundle.name,
            "dermfusion.bundle_hash": bundle.content_hash,
            "dermfusion.calibration": bundle.calibration or {}}
    return export_onnx(model, out, classes=bundle.config.get("classes") or list(bundle.task.classes),
                       preprocess=bundle.config.get("preprocess"), metadata=meta, **kwargs)
