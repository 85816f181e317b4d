"""Inference backends: the same trained network, run the fastest way this hardware allows.

``prepare_backend(model, name)`` returns a :class:`BackendRunner` — a callable taking a Batch dict
and returning ``{"logits": float32 B×C, ...}`` like ``model(batch)`` — built on a *copy* of the
model, so the fp32 original stays untouched as the reference. ``select_backend`` measures the
candidates on a sample batch and keeps the fastest one whose probabilities agree with fp32 eager;
fp32 eager is always the fallback.

Backends (``BACKENDS``):

  fp32      eager PyTorch, float32 — the reference.
  bf16      image encoders cast to bfloat16 as a whole (weights *and* activations, cast once),
            fusion + heads keep float32 weights and run under bf16 autocast (they read float
            metadata, which a whole-model cast would break; they are a few % of the FLOPs).
            Uses the AVX-512-BF16 / AMX matrix units on CPU, tensor cores on GPU.
  autocast  ``torch.autocast(bfloat16)`` around the fp32 model (casts per op; slower than ``bf16``
            because every linear re-casts its weight on every call).
  int8      dynamic int8 quantisation of the encoders' ``nn.Linear`` layers (VNNI on CPU);
            activations are quantised per call, attention softmax stays float32. CPU only.
  onnx      ONNX Runtime (float32) on the exported model (``dermfusion.export``).
  onnx-int8 ONNX Runtime with the encoders' MatMul weights int8 (per channel), dynamic activations.
  onnx-qdq  ONNX Runtime static int8: convolutions + matmuls, weights per channel, activations calibrated on
            real images (``onnx_static``); first convolution and the head kept in float32.
  compile   ``torch.compile`` (inductor, frozen weights) of the float32 model under bf16 autocast: bf16
            GEMMs, float32 residual stream (plain float32 on a CPU without bf16 units). The first call per batch shape compiles (~25 s for a ViT-B
            pair on 2 cores), later calls are fast.

Modules: ``base`` (registry, ``BackendRunner``), ``eager`` (the torch backends), ``onnx_runtime`` and
``onnx_static`` (the ONNX Runtime ones), ``selection`` (prepare, compare, time, select). The attention rewrite the fast backends rely on
is ``models.fast_attention``.
"""
from .base import (BACKENDS, CPU_ONLY, BackendError, BackendFactory, BackendRunner, UnknownBackendError, as_device,
                   eager_runner, list_backends, register_backend)
from .eager import (CastEncoder, autocast_backend, bf16_backend, bf16_model, compile_backend, fp32_backend,
                    int8_backend)
from .onnx_runtime import onnx_backend, onnx_int8_backend
from .onnx_static import onnx_qdq_backend
from .selection import (BackendSelection, compare_probs, prepare_backend, probs_over, select_backend, selection_text,
                        time_runner)

# the built-in backends, registered here explicitly, in the order `select_backend` tries them
for _name, _factory in (("fp32", fp32_backend), ("bf16", bf16_backend), ("autocast", autocast_backend),
                        ("int8", int8_backend), ("compile", compile_backend), ("onnx", onnx_backend),
                        ("onnx-int8", onnx_int8_backend), ("onnx-qdq", onnx_qdq_backend)):
    register_backend(_name)(_factory)

__all__ = ["BACKENDS", "CPU_ONLY", "BackendError", "BackendFactory", "BackendRunner", "BackendSelection", "CastEncoder",
           "UnknownBackendError", "as_device", "bf16_model", "compare_probs", "eager_runner", "list_backends",
           "prepare_backend", "probs_over", "register_backend", "select_backend", "selection_text", "time_runner"]
