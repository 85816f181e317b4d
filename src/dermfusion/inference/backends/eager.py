"""The eager PyTorch backends: fp32 (the reference), bf16, autocast, int8 and compile (see the package doc)."""
from __future__ import annotations

import contextlib
import copy
import time
import warnings

import torch
from torch import nn

from ...explain.explainer import Explainer
from ...models.fast_attention import fast_attention_
from ...runtime.device import native_bf16
from .base import BackendError, BackendRunner, as_device, eager_runner


class CastEncoder(nn.Module):
    """An encoder run in another dtype: input cast in, (tokens, pooled) cast back to float32.

    Keeps the :class:`~dermfusion.models.backbones.Backbone` attributes fusion models read.
    """

    def __init__(self, encoder: nn.Module, dtype: torch.dtype):
        super().__init__()
        self.inner, self.dtype = encoder.to(dtype), dtype
        for attr in ("name", "dim", "token_dim", "data_config", "num_blocks"):
            if hasattr(encoder, attr):
                setattr(self, attr, getattr(encoder, attr))

    def forward_tokens(self, x: torch.Tensor):
        tokens, pooled = self.inner.forward_tokens(x.to(self.dtype))
        return tokens.float(), pooled.float()

    def forward(self, x):
        return self.forward_tokens(x)


def _copy_for_inference(model: nn.Module, device: torch.device) -> nn.Module:
    m = copy.deepcopy(model).to(device).eval()
    Explainer.remove_from(m)  # a copy of an explained model (the service's first member): no hooks, fused attention
    for p in m.parameters():  # inference copies never train; makes the matmul layouts independent of autograd
        p.requires_grad_(False)
    return m


def _encoders(model: nn.Module) -> nn.ModuleDict | None:
    enc = getattr(model, "encoders", None)
    return enc if isinstance(enc, nn.ModuleDict) else None


def bf16_model(model: nn.Module, device="cpu") -> nn.Module:
    """A copy whose image encoders run wholly in bfloat16 (fast attention), fusion + heads in float32."""
    device = as_device(device)
    m = _copy_for_inference(model, device)
    fast_attention_(m)
    enc = _encoders(m)
    if enc is None:
        raise BackendError("bf16 needs a dermfusion network with an `encoders` ModuleDict")
    for k in list(enc.keys()):
        enc[k] = CastEncoder(enc[k], torch.bfloat16)
    return m


def fp32_backend(model: nn.Module, device="cpu", **_) -> BackendRunner:
    device = as_device(device)
    return eager_runner("fp32", model.to(device), device)


def _bf16_autocast(device: torch.device):
    return lambda: torch.autocast(device.type, dtype=torch.bfloat16)


def bf16_backend(model: nn.Module, device="cpu", **_) -> BackendRunner:
    device = as_device(device)
    # encoders hold bf16 weights; the small fusion part keeps fp32 weights and runs under autocast
    # (it reads float metadata and concept scores, which a whole-model cast would break)
    return eager_runner("bf16", bf16_model(model, device), device, _bf16_autocast(device))


def autocast_backend(model: nn.Module, device="cpu", **_) -> BackendRunner:
    device = as_device(device)
    m = _copy_for_inference(model, device)
    n = fast_attention_(m)
    return eager_runner("autocast", m, device, lambda: torch.autocast(device.type, dtype=torch.bfloat16),
                         info={"fast_attention_layers": n})


def int8_backend(model: nn.Module, device="cpu", **_) -> BackendRunner:
    device = as_device(device)
    if device.type != "cpu":
        raise BackendError("int8 dynamic quantisation runs on CPU only")

    m = _copy_for_inference(model, device)
    fast_attention_(m)  # exposes the attention projections as nn.Linear, so they are quantised too
    enc = _encoders(m)
    targets = enc if enc is not None else m
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.ao.quantization's deprecation notice
        from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic

        for k in (list(targets.keys()) if enc is not None else [None]):
            sub = targets[k] if k is not None else targets
            # per-output-channel weight scales: ViT weights vary a lot between channels
            q = quantize_dynamic(sub, {nn.Linear: per_channel_dynamic_qconfig}, dtype=torch.qint8, inplace=False)
            if k is None:
                m = q
            else:
                targets[k] = q
    from torch.ao.nn.quantized.dynamic import Linear as DynamicQuantLinear

    n = sum(1 for mod in m.modules() if isinstance(mod, DynamicQuantLinear))
    return eager_runner("int8", m, device, info={"quantized_linear_layers": n})


def compile_backend(model: nn.Module, device="cpu", sample_batch: dict | None = None, **_) -> BackendRunner:
    device = as_device(device)
    # The float32 model under bf16 autocast, not the whole-bf16 copy: with frozen weights inductor folds the
    # weight casts into constants, so the GEMMs run in bf16 at the same speed, while the residual stream,
    # norms and softmax stay float32 (timm ViT-B/16: feature error 0.8 % vs 1.1 % for the bf16 copy).
    m = _copy_for_inference(model, device)
    fast_attention_(m)
    try:
        import torch._inductor.config as inductor_config

        inductor_config.freezing = True  # constant-fold and pre-pack the (frozen) weights for oneDNN
    except Exception:  # noqa: BLE001
        pass
    compiled = torch.compile(m, dynamic=False)

    bf16 = native_bf16(device)  # without bf16 units (AVX2-only CPUs) bf16 is emulated, far slower than fp32
    runner = eager_runner("compile", compiled, device, _bf16_autocast(device) if bf16 else contextlib.nullcontext,
                           info={"precision": "bf16 GEMMs" if bf16 else "fp32"})
    runner.module = m
    if sample_batch is not None:  # compile now, so the cost is visible and not charged to the first request
        t0 = time.perf_counter()
        runner(sample_batch)
        runner.info["compile_s"] = round(time.perf_counter() - t0, 2)
    return runner


