"""What goes into and comes out of an exported graph: the named inputs of a dermfusion network (``input_specs``), a
batch turned into ONNX Runtime feeds (``batch_to_onnx_inputs``), and the wrapper whose positional outputs are
``probabilities``, ``logits``, a multi-task network's ``criteria_logits`` and, when asked, ``layer_stats``
(``OnnxFusionWrapper``; ``criteria_from_onnx`` splits the criteria back per criterion). ``export.onnx`` writes the
graph."""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
from torch import nn

from ..models.layer_stats import LayerStats

IMAGE_PREFIX = "image_"
OUTPUT_NAMES = ("probabilities", "logits")
CRITERIA_OUTPUT = "criteria_logits"


@dataclass
class InputSpec:
    name: str
    dtype: str            # numpy dtype name: float32 | bool | int64
    shape: tuple          # without the batch dimension
    meaning: str

    def to_dict(self) -> dict:
        return {"name": self.name, "dtype": self.dtype, "shape": ["batch", *self.shape], "meaning": self.meaning}


def model_modalities(model: nn.Module) -> list[str]:
    mods = getattr(model, "modalities", None) or getattr(getattr(model, "feature_spec", None), "modalities", None)
    if not mods:
        raise ValueError("the model has no `modalities` (is it a dermfusion network?)")
    return list(mods)


def input_specs(model: nn.Module) -> list[InputSpec]:
    """The graph inputs of ``model``, in order."""
    spec = model.feature_spec
    dc = model.data_config
    specs = [InputSpec(IMAGE_PREFIX + m, "float32", tuple(dc[m]["input_size"]), f"{m} image, normalised")
             for m in spec.modalities]
    specs.append(InputSpec("image_present", "bool", (len(spec.modalities),),
                           f"which images are present, columns {list(spec.modalities)}"))
    if spec.concepts:
        k = len(spec.concepts)
        specs += [InputSpec("concepts", "float32", (k,), "concept scores"),
                  InputSpec("concepts_present", "bool", (k,), "which concept scores are known")]
    if spec.numeric:
        n = len(spec.numeric)
        specs += [InputSpec("numeric", "float32", (n,), f"numeric metadata {list(spec.numeric)}"),
                  InputSpec("numeric_present", "bool", (n,), "which numeric values are known")]
    if spec.categorical:
        specs.append(InputSpec("categorical", "int64", (len(spec.categorical),),
                               f"categorical metadata codes {list(spec.categorical)}; 0 = unknown"))
    return specs


class OnnxFusionWrapper(nn.Module):
    """Positional tensors in (``input_specs`` order) -> (probabilities, logits[, criteria_logits][, layer_stats])."""

    def __init__(self, model: nn.Module, names: Sequence[str], stats_modality: str | None = None):
        super().__init__()
        self.model, self.names = model, list(names)
        self.modalities = list(model.feature_spec.modalities)
        heads = getattr(model, "criteria_heads", None)
        self.criteria = [c.name for c in heads.criteria] if heads is not None else []
        # with a modality whose encoder has known layers: a further output, that image's layer statistics (the
        # service's familiarity check)
        probe = LayerStats(model, stats_modality) if stats_modality else None
        self.stats = probe if probe is not None and probe.available else None

    @property
    def output_names(self) -> list[str]:
        return [*OUTPUT_NAMES, *([CRITERIA_OUTPUT] if self.criteria else []),
                *(["layer_stats"] if self.stats is not None else [])]

    def forward(self, *inputs: torch.Tensor):
        x = dict(zip(self.names, inputs))
        batch = {"images": {m: x[IMAGE_PREFIX + m] for m in self.modalities}, "image_present": x["image_present"]}
        for k in ("concepts", "concepts_present", "numeric", "numeric_present", "categorical"):
            if k in x:
                batch[k] = x[k]
        with self.stats if self.stats is not None else contextlib.nullcontext():
            out = self.model(batch)
        logits = out["logits"].float()
        result = [torch.softmax(logits, dim=-1), logits]
        if self.criteria:
            result.append(torch.cat([out["criteria"][name].float() for name in self.criteria], dim=1))
        if self.stats is not None:
            result.append(self.stats.take())
        return tuple(result)


def criteria_from_onnx(model: nn.Module, flat) -> dict[str, torch.Tensor]:
    """``criteria_logits`` (B×ΣL) split back into ``{criterion: B×L logits}`` — what the PyTorch model returns under
    ``outputs["criteria"]``."""
    out, start = {}, 0
    for c in model.criteria_heads.criteria:
        out[c.name] = torch.as_tensor(flat[:, start:start + len(c.labels)])
        start += len(c.labels)
    return out


_DTYPES = {"float32": (np.float32, torch.float32), "bool": (np.bool_, torch.bool), "int64": (np.int64, torch.long)}


def _batch_tensor(batch: dict, name: str) -> torch.Tensor:
    if name.startswith(IMAGE_PREFIX) and name != "image_present":
        return batch["images"][name[len(IMAGE_PREFIX):]]
    return batch[name]


def batch_to_onnx_inputs(batch: dict, modalities: Sequence[str] | None = None,
                         names: Sequence[str] | None = None, specs: Sequence[InputSpec] | None = None) -> dict:
    """Feeds for an ONNX Runtime session (numpy arrays in the graph's dtypes)."""
    if specs is not None:
        dtypes = {s.name: s.dtype for s in specs}
        names = [s.name for s in specs]
    else:
        dtypes = {}
        names = list(names or [IMAGE_PREFIX + m for m in modalities or batch["images"]] + ["image_present"])
    feeds = {}
    for name in names:
        t = _batch_tensor(batch, name)
        dt = dtypes.get(name) or ("bool" if name.endswith("present") else "int64" if name == "categorical"
                                  else "float32")
        feeds[name] = np.ascontiguousarray(t.detach().cpu().to(_DTYPES[dt][1]).numpy())
    return feeds


def _example_args(batch: dict, specs: Sequence[InputSpec]) -> tuple:
    return tuple(_batch_tensor(batch, s.name).to(_DTYPES[s.dtype][1]) for s in specs)
