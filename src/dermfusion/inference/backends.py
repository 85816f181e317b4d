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
  compile   ``torch.compile`` (inductor, frozen weights) of the float32 model under bf16 autocast: bf16
            GEMMs, float32 residual stream (plain float32 on a CPU without bf16 units). The first call per batch shape compiles (~25 s for a ViT-B
            pair on 2 cores), later calls are fast.

Why ``nn.MultiheadAttention`` is replaced (``fast_attention_``): open_clip's ViT and our fusion
layers use ``nn.MultiheadAttention(batch_first=True)``. Off its fused inference kernel — which
it leaves under autocast, in training mode, for cross-attention, or when weights are wanted — it
transposes its inputs to (L, B, E) and calls ``F.linear`` on that non-contiguous view.
``aten::matmul`` folds such an input into one GEMM only when an operand requires grad; otherwise
(``torch.inference_mode``, EMA copies, frozen blocks, an autocast-cast weight under inference mode)
it runs ``bmm`` with the weight broadcast to L copies, and a bf16 ``bmm`` on CPU first
*materialises* that broadcast (an L×E×3E ``copy_`` per layer: 197 copies of every QKV weight).
That is the ~20× CPU slow-down seen with open_clip under bf16 autocast. ``FastMultiheadAttention``
computes the same thing on contiguous batch-first tensors with ``scaled_dot_product_attention``
(numerically equal to nn.MultiheadAttention in fp32) and exposes its projections as ``nn.Linear``,
so int8 quantisation reaches them too.
"""
from __future__ import annotations

import contextlib
import copy
import math
import time
from dataclasses import dataclass, field
from typing import Callable, Iterable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

BackendFactory = Callable[..., "BackendRunner"]
BACKENDS: dict[str, BackendFactory] = {}
CPU_ONLY = {"int8", "onnx", "onnx-int8"}


class BackendError(RuntimeError):
    """A backend cannot run this model here (missing library, unsupported device, export failure)."""


def register_backend(name: str):
    def deco(fn: BackendFactory) -> BackendFactory:
        BACKENDS[name] = fn
        return fn
    return deco


def list_backends() -> list[str]:
    return list(BACKENDS)


# ------------------------------------------------------------------------------------------ attention
class FastMultiheadAttention(nn.Module):
    """Drop-in for ``nn.MultiheadAttention(batch_first=True)``: projections on contiguous B×L×E tensors
    as ``nn.Linear`` layers (``in_proj`` packs q, k, v), attention through SDPA.

    Same call signature and outputs ``(out, weights | None)``. ``need_weights=True`` computes the
    softmax explicitly (head-averaged unless ``average_attn_weights=False``).
    """

    def __init__(self, embed_dim: int, num_heads: int, bias: bool = True):
        super().__init__()
        if embed_dim % num_heads:
            raise ValueError(f"embed_dim {embed_dim} is not divisible by num_heads {num_heads}")
        self.embed_dim, self.num_heads, self.head_dim = embed_dim, num_heads, embed_dim // num_heads
        self.batch_first = True
        self.in_proj = nn.Linear(embed_dim, 3 * embed_dim, bias=bias)
        self.out_proj = nn.Linear(embed_dim, embed_dim, bias=bias)

    @classmethod
    def from_mha(cls, mha: nn.MultiheadAttention) -> "FastMultiheadAttention":
        if not supports_fast_attention(mha):
            raise ValueError("only batch_first nn.MultiheadAttention with packed q/k/v weights, no bias_k/v, "
                             "no add_zero_attn and no dropout can be converted")
        new = cls(mha.embed_dim, mha.num_heads, bias=mha.in_proj_bias is not None)
        new = new.to(device=mha.in_proj_weight.device, dtype=mha.in_proj_weight.dtype)
        with torch.no_grad():
            new.in_proj.weight.copy_(mha.in_proj_weight)
            new.out_proj.weight.copy_(mha.out_proj.weight)
            if mha.in_proj_bias is not None:
                new.in_proj.bias.copy_(mha.in_proj_bias)
                new.out_proj.bias.copy_(mha.out_proj.bias)
        new.train(mha.training)
        return new

    def _project(self, query, key, value):
        w, b = self.in_proj.weight, self.in_proj.bias
        e = self.embed_dim
        if query is key and key is value:
            return self.in_proj(query).chunk(3, dim=-1)
        bq, bk, bv = (None, None, None) if b is None else b.split(e)
        q = F.linear(query, w[:e], bq)
        if key is value:
            k, v = F.linear(key, w[e:], None if b is None else b[e:]).chunk(2, dim=-1)
        else:
            k, v = F.linear(key, w[e:2 * e], bk), F.linear(value, w[2 * e:], bv)
        return q, k, v

    def _mask(self, key_padding_mask, attn_mask, b, lq, lk, dtype):
        """One additive float mask (B×1|H×Lq×Lk) or None; True in torch's bool masks = ignore."""
        mask = None
        if key_padding_mask is not None:
            kpm = key_padding_mask
            kpm = torch.zeros(kpm.shape, dtype=dtype, device=kpm.device).masked_fill(kpm, float("-inf")) \
                if kpm.dtype == torch.bool else kpm.to(dtype)
            mask = kpm.view(b, 1, 1, lk)
        if attn_mask is not None:
            am = attn_mask
            am = torch.zeros(am.shape, dtype=dtype, device=am.device).masked_fill(am, float("-inf")) \
                if am.dtype == torch.bool else am.to(dtype)
            am = am.view(1, 1, lq, lk) if am.dim() == 2 else am.view(b, self.num_heads, lq, lk)
            mask = am if mask is None else mask + am
        return mask

    def forward(self, query, key, value, key_padding_mask=None, need_weights: bool = True, attn_mask=None,
                average_attn_weights: bool = True, is_causal: bool = False):
        unbatched = query.dim() == 2
        if unbatched:
            query, key, value = query[None], key[None], value[None]
            key_padding_mask = None if key_padding_mask is None else key_padding_mask[None]
        b, lq, _ = query.shape
        lk = key.shape[1]
        h, hd = self.num_heads, self.head_dim
        q, k, v = self._project(query, key, value)
        q, k, v = (t.reshape(b, -1, h, hd).transpose(1, 2) for t in (q, k, v))  # B×H×L×hd
        mask = self._mask(key_padding_mask, attn_mask, b, lq, lk, q.dtype)
        weights = None
        if need_weights:
            scores = (q @ k.transpose(-2, -1)) / math.sqrt(hd)
            if mask is not None:
                scores = scores + mask
            elif is_causal:
                scores = scores.masked_fill(torch.ones(lq, lk, dtype=torch.bool, device=q.device).triu(1),
                                            float("-inf"))
            attn = scores.softmax(-1)
            out = attn @ v
            weights = attn.mean(1) if average_attn_weights else attn
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal and mask is None)
        out = self.out_proj(out.transpose(1, 2).reshape(b, lq, self.embed_dim))
        if unbatched:
            out = out[0]
            weights = None if weights is None else weights[0]
        return out, weights


def supports_fast_attention(mha: nn.Module) -> bool:
    return (type(mha) is nn.MultiheadAttention and mha.batch_first and mha._qkv_same_embed_dim
            and mha.bias_k is None and not mha.add_zero_attn and mha.in_proj_weight is not None
            and (mha.dropout == 0 or not mha.training))


def fast_attention_(module: nn.Module) -> int:
    """Replace every convertible ``nn.MultiheadAttention`` inside ``module`` in place; returns the count."""
    n = 0
    for name, child in list(module.named_children()):
        if supports_fast_attention(child):
            setattr(module, name, FastMultiheadAttention.from_mha(child))
            n += 1
        else:
            n += fast_attention_(child)
    return n


# ------------------------------------------------------------------------------------------ runners
@dataclass
class BackendRunner:
    """A prepared backend: ``runner(batch) -> {"logits": float32 B×C}``.

    ``module`` is the torch module actually run (None for ONNX Runtime), so benchmarks can time its
    encoders separately; ``info`` holds backend details (compile time, quantised layers …).
    """

    name: str
    fn: Callable[[dict], dict]
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    module: nn.Module | None = None
    info: dict = field(default_factory=dict)

    def __call__(self, batch: dict) -> dict:
        return self.fn(batch)

    def eval(self) -> "BackendRunner":
        """No-op, so a runner can stand in for the model in ``predict_probs``."""
        return self

    def predict_proba(self, batch: dict) -> torch.Tensor:
        return torch.softmax(self(batch)["logits"].float(), dim=-1)


def _as_device(device) -> torch.device:
    return device if isinstance(device, torch.device) else torch.device(device)


def _eager_runner(name: str, module: nn.Module, device: torch.device, ctx=contextlib.nullcontext, info=None):
    module.eval()

    def fn(batch: dict) -> dict:
        with torch.no_grad(), ctx():
            out = module(batch)
        return {**out, "logits": out["logits"].float()}

    return BackendRunner(name, fn, device, module, info or {})


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
    for p in m.parameters():  # inference copies never train; makes the matmul layouts independent of autograd
        p.requires_grad_(False)
    return m


def _encoders(model: nn.Module) -> nn.ModuleDict | None:
    enc = getattr(model, "encoders", None)
    return enc if isinstance(enc, nn.ModuleDict) else None


def bf16_model(model: nn.Module, device="cpu") -> nn.Module:
    """A copy whose image encoders run wholly in bfloat16 (fast attention), fusion + heads in float32."""
    device = _as_device(device)
    m = _copy_for_inference(model, device)
    fast_attention_(m)
    enc = _encoders(m)
    if enc is None:
        raise BackendError("bf16 needs a dermfusion network with an `encoders` ModuleDict")
    for k in list(enc.keys()):
        enc[k] = CastEncoder(enc[k], torch.bfloat16)
    return m


@register_backend("fp32")
def _fp32(model: nn.Module, device="cpu", **_) -> BackendRunner:
    device = _as_device(device)
    return _eager_runner("fp32", model.to(device), device)


def _bf16_autocast(device: torch.device):
    return lambda: torch.autocast(device.type, dtype=torch.bfloat16)


@register_backend("bf16")
def _bf16(model: nn.Module, device="cpu", **_) -> BackendRunner:
    device = _as_device(device)
    # encoders hold bf16 weights; the small fusion part keeps fp32 weights and runs under autocast
    # (it reads float metadata and concept scores, which a whole-model cast would break)
    return _eager_runner("bf16", bf16_model(model, device), device, _bf16_autocast(device))


@register_backend("autocast")
def _autocast(model: nn.Module, device="cpu", **_) -> BackendRunner:
    device = _as_device(device)
    m = _copy_for_inference(model, device)
    n = fast_attention_(m)
    return _eager_runner("autocast", m, device, lambda: torch.autocast(device.type, dtype=torch.bfloat16),
                         info={"fast_attention_layers": n})


@register_backend("int8")
def _int8(model: nn.Module, device="cpu", **_) -> BackendRunner:
    device = _as_device(device)
    if device.type != "cpu":
        raise BackendError("int8 dynamic quantisation runs on CPU only")
    import warnings

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
    return _eager_runner("int8", m, device, info={"quantized_linear_layers": n})


@register_backend("compile")
def _compile(model: nn.Module, device="cpu", sample_batch: dict | None = None, **_) -> BackendRunner:
    device = _as_device(device)
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
    from ..training.runtime import native_bf16

    bf16 = native_bf16(device)  # without bf16 units (AVX2-only CPUs) bf16 is emulated, far slower than fp32
    runner = _eager_runner("compile", compiled, device, _bf16_autocast(device) if bf16 else contextlib.nullcontext,
                           info={"precision": "bf16 GEMMs" if bf16 else "fp32"})
    runner.module = m
    if sample_batch is not None:  # compile now, so the cost is visible and not charged to the first request
        t0 = time.perf_counter()
        runner(sample_batch)
        runner.info["compile_s"] = round(time.perf_counter() - t0, 2)
    return runner


@register_backend("onnx")
def _onnx(model: nn.Module, device="cpu", sample_batch: dict | None = None, onnx_path=None,
          threads: int | None = None, exporter: str = "auto", **_) -> BackendRunner:
    """ONNX Runtime (float32) on ``onnx_path``, or on a fresh export of ``model`` to a temporary folder,
    deleted once the session holds the graph in memory."""
    device = _as_device(device)
    if device.type != "cpu":
        raise BackendError("the onnx backend runs ONNX Runtime on CPU here")
    try:
        import onnxruntime  # noqa: F401 — a clear error before the export
    except ImportError as e:  # pragma: no cover
        raise BackendError(f"onnxruntime is not installed: {e}") from e
    import shutil
    import tempfile
    from pathlib import Path

    from ..export.onnx import batch_to_onnx_inputs, cpu_session, export_onnx

    info, cleanup_dir = {}, None
    if onnx_path is None:
        cleanup_dir = Path(tempfile.mkdtemp(prefix="dermfusion_onnx_"))
        onnx_path = cleanup_dir / "model.onnx"
        t0 = time.perf_counter()
        try:
            export_onnx(model, onnx_path, check=False, exporter=exporter)
        except BaseException:
            shutil.rmtree(cleanup_dir, ignore_errors=True)
            raise
        info["export_s"] = round(time.perf_counter() - t0, 2)
    try:
        sess = cpu_session(onnx_path, threads)
    finally:  # a ViT-B pair's export is ~0.7 GB: never leave it behind in the temp folder
        if cleanup_dir is not None:
            shutil.rmtree(cleanup_dir, ignore_errors=True)
    names = [i.name for i in sess.get_inputs()]
    modalities = list(getattr(model, "modalities", []))

    def fn(batch: dict) -> dict:
        feeds = batch_to_onnx_inputs(batch, modalities, names)
        probs, logits = sess.run(["probabilities", "logits"], feeds)
        return {"logits": torch.from_numpy(logits), "probabilities": torch.from_numpy(probs)}

    if cleanup_dir is None:
        info["onnx_path"] = str(onnx_path)
    return BackendRunner("onnx", fn, device, None, info)


@register_backend("onnx-int8")
def _onnx_int8(model: nn.Module, device="cpu", sample_batch: dict | None = None, threads: int | None = None,
               exporter: str = "torchscript", quantize_fusion: bool = False, reduce_range: bool | None = None,
               **_) -> BackendRunner:
    """ONNX Runtime with the encoders' MatMul weights quantised to int8 (per channel, dynamic activations).

    Fusion and head MatMuls stay float32 (excluded by module scope); 2-D linears export as Gemm and
    are not quantised at all. ``reduce_range`` (default: on CPUs without an int8 dot-product instruction)
    quantises weights to 7 bits: there MLAS sums u8×s8 products in saturating 16-bit pairs, and full-range
    weights lose up to ~20 % of a product (tests/test_bench.py).
    """
    import logging
    import shutil
    import tempfile
    from pathlib import Path

    from ..training.runtime import cpu_int8_dot_product

    if reduce_range is None:
        reduce_range = not cpu_int8_dot_product()

    try:
        import onnx
        from onnxruntime.quantization import QuantType, quantize_dynamic
    except ImportError as e:  # pragma: no cover
        raise BackendError(f"onnxruntime quantisation is unavailable: {e}") from e
    from ..export.onnx import export_onnx

    tmp = Path(tempfile.mkdtemp(prefix="dermfusion_onnx_int8_"))
    try:  # the session holds the quantised graph in memory: the files (fp32 + int8) go afterwards
        t0 = time.perf_counter()
        export_onnx(model, tmp / "fp32.onnx", check=False, exporter=exporter)
        exclude = []
        if not quantize_fusion:  # keep fusion + heads in float32: few FLOPs, most of the decision
            # TorchScript node names carry the module scope, "/model/<child of the network>/…"; encoders are
            # entered through forward_tokens, so their nodes show the encoder's own children instead.
            fusion = set()
            for name, child in model.named_children():
                if name != "encoders":
                    fusion.add(name)
                    if isinstance(child, nn.ModuleDict):  # ModuleDict members get their own scope (token_proj.<m>)
                        fusion.update(child.keys())
            graph = onnx.load(str(tmp / "fp32.onnx"), load_external_data=False).graph
            exclude = [n.name for n in graph.node if n.op_type in {"MatMul", "Gemm"}
                       and len(n.name.split("/")) > 2 and n.name.split("/")[2] in fusion]
            exclude += [f"{n}_MatMul" for n in exclude]  # the quantiser rewrites Gemm as <name>_MatMul + Add
        level = logging.getLogger().level
        logging.getLogger().setLevel(logging.ERROR)  # the quantiser logs every skipped node
        try:
            quantize_dynamic(str(tmp / "fp32.onnx"), str(tmp / "model.onnx"), weight_type=QuantType.QInt8,
                             op_types_to_quantize=["MatMul"], nodes_to_exclude=exclude, per_channel=True,
                             reduce_range=reduce_range)
        finally:
            logging.getLogger().setLevel(level)
        runner = _onnx(model, device, onnx_path=tmp / "model.onnx", threads=threads)
        runner.name = "onnx-int8"
        runner.info.pop("onnx_path", None)  # deleted below, once the session is built
        runner.info.update({"export_quantize_s": round(time.perf_counter() - t0, 2), "float_nodes": len(exclude),
                            "weight_bits": 7 if reduce_range else 8})
        return runner
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def prepare_backend(model: nn.Module, name: str, *, device="cpu", sample_batch: dict | None = None,
                    **options) -> BackendRunner:
    """Build backend ``name`` for ``model`` (left unchanged; backends other than fp32 work on a copy)."""
    if name not in BACKENDS:
        raise KeyError(f"unknown backend {name!r}; known: {', '.join(BACKENDS)}")
    device = _as_device(device)
    if name in CPU_ONLY and device.type != "cpu":
        raise BackendError(f"backend {name!r} runs on CPU only")
    return BACKENDS[name](model, device=device, sample_batch=sample_batch, **options)


# ------------------------------------------------------------------------------------------ agreement + selection
def compare_probs(reference: np.ndarray | torch.Tensor, probs: np.ndarray | torch.Tensor) -> dict:
    """Max absolute probability difference and argmax agreement between two N×C arrays."""
    ref = np.asarray(reference.detach().cpu() if isinstance(reference, torch.Tensor) else reference, np.float64)
    p = np.asarray(probs.detach().cpu() if isinstance(probs, torch.Tensor) else probs, np.float64)
    if ref.shape != p.shape:
        raise ValueError(f"shape mismatch {ref.shape} vs {p.shape}")
    finite = bool(np.isfinite(p).all())
    diff = float(np.abs(ref - p).max()) if finite and ref.size else (0.0 if finite else float("inf"))
    agree = float((ref.argmax(1) == p.argmax(1)).mean()) if len(ref) else 1.0
    return {"max_prob_diff": diff, "mean_prob_diff": float(np.abs(ref - p).mean()) if finite and ref.size else diff,
            "argmax_agreement": agree if finite else 0.0, "n": int(len(ref))}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_runner(runner: Callable[[dict], dict], batch: dict, repeats: int = 3, warmup: int = 1,
                device: torch.device | str = "cpu") -> list[float]:
    """Wall-clock milliseconds per call (after ``warmup`` calls)."""
    device = _as_device(device)
    for _ in range(warmup):
        runner(batch)
    _sync(device)
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        runner(batch)
        _sync(device)
        out.append((time.perf_counter() - t0) * 1000)
    return out


@dataclass
class BackendSelection:
    name: str
    runner: BackendRunner
    candidates: list[dict]

    def __call__(self, batch: dict) -> dict:
        return self.runner(batch)


def selection_text(candidates: Sequence[dict] | None, chosen: str | None = None) -> str:
    """One line a person can read: each checked backend's latency, or why it was not eligible."""
    parts = []
    for rec in candidates or []:
        if rec.get("ok"):
            parts.append(f"{rec['name']} {rec['latency_ms']:.1f} ms" + (" ✓" if rec["name"] == chosen else ""))
        else:
            reason = str(rec.get("reason", "failed")).splitlines()[0]
            parts.append(f"{rec['name']} ✗ {reason[:90]}{'…' if len(reason) > 90 else ''}")
    return " · ".join(parts)


def select_backend(model: nn.Module, sample_batch: dict, candidates: Sequence[str] | None = None,
                   max_prob_diff: float = 0.02, min_agreement: float = 0.99, *, device="cpu", repeats: int = 3,
                   backend_options: dict | None = None,
                   factories: dict[str, BackendFactory] | None = None) -> BackendSelection:
    """The fastest candidate whose probabilities on ``sample_batch`` stay within ``max_prob_diff`` of
    fp32 eager with argmax agreement ≥ ``min_agreement``; fp32 eager when none qualifies (or none is faster).

    Candidates that fail to build or run are skipped with their error recorded. ``factories``
    overrides/extends the registry (tests inject broken backends this way).
    """
    device = _as_device(device)
    registry = {**BACKENDS, **(factories or {})}
    candidates = list(candidates) if candidates is not None else [b for b in BACKENDS if b != "compile"]
    ref_runner = prepare_backend(model, "fp32", device=device)
    ref = ref_runner.predict_proba(sample_batch)
    ref_ms = float(np.median(time_runner(ref_runner, sample_batch, repeats, 1, device)))
    report = [{"name": "fp32", "ok": True, "latency_ms": ref_ms, "max_prob_diff": 0.0, "argmax_agreement": 1.0}]
    best_name, best_runner, best_ms = "fp32", ref_runner, ref_ms
    for name in candidates:
        if name == "fp32":
            continue
        rec: dict = {"name": name, "ok": False}
        try:
            if name not in registry:
                raise KeyError(f"unknown backend {name!r}")
            if name in CPU_ONLY and device.type != "cpu":
                raise BackendError(f"{name} runs on CPU only")
            runner = registry[name](model, device=device, sample_batch=sample_batch,
                                    **(backend_options or {}).get(name, {}))
            probs = runner.predict_proba(sample_batch)
            rec.update(compare_probs(ref, probs))
            if not (rec["max_prob_diff"] <= max_prob_diff and rec["argmax_agreement"] >= min_agreement):
                rec["reason"] = (f"accuracy check failed: max prob diff {rec['max_prob_diff']:.4g} "
                                 f"(limit {max_prob_diff}), argmax agreement {rec['argmax_agreement']:.3f} "
                                 f"(min {min_agreement})")
            else:
                rec["latency_ms"] = float(np.median(time_runner(runner, sample_batch, repeats, 1, device)))
                rec["ok"] = True
                if rec["latency_ms"] < best_ms:
                    best_name, best_runner, best_ms = name, runner, rec["latency_ms"]
        except Exception as e:  # noqa: BLE001 — a failing candidate must never take the service down
            rec["reason"] = f"{type(e).__name__}: {e}"
        report.append(rec)
    return BackendSelection(best_name, best_runner, report)


def probs_over(runner: Callable[[dict], dict], batches: Iterable[dict]) -> np.ndarray:
    """Concatenated softmax probabilities of ``runner`` over ``batches``."""
    out = [torch.softmax(runner(b)["logits"].float(), -1).cpu().numpy() for b in batches]
    return np.concatenate(out) if out else np.zeros((0, 0), np.float32)
