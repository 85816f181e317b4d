"""One forward pass that yields the prediction *and* a heat map per image modality.

How each encoder is explained:

- **ViT encoders** (timm ViT / BEiT / EVA, PanDerm): *attention rollout* (Abnar & Zuidema 2020).
  Every block's attention probabilities are captured with a forward hook on ``attn.attn_drop``
  (the fused SDPA kernel is switched off on those modules so the probabilities exist; the maths is
  identical). Rollout multiplies the head-averaged, residual-corrected attention of all blocks.
  The rollout row used is the one that mattered *for this model*: when the fusion model reports
  which image tokens its pooled representation attended to, those weights select the rows
  ("fusion-weighted rollout"); otherwise the CLS row (token pooling) or the mean over patches.
- **CNN encoders** (timm ResNet, ConvNeXt, EfficientNet …): *Grad-CAM* (Selvaraju et al. 2017)
  on the output of the last stage (``feature_info[-1]``), for the predicted class' logit.
- **Anything else** (open_clip towers, unknown encoders): input-gradient saliency.

The hooks are installed once and record into thread-local storage, so one model can be explained
from several worker threads at once. Gradients are taken with ``torch.autograd.grad`` (never
``.backward()``), so parameters' ``.grad`` stay untouched.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from .fusion import fusion_contributions
from .windows import tile_windows


@dataclass
class ExplainResult:
    """Outputs of one explained forward pass (batch of B lesions)."""

    logits: torch.Tensor                          # B×C
    probs: np.ndarray                             # B×C softmax (uncalibrated)
    target: np.ndarray                            # B, the class each map explains
    maps: dict[str, list[np.ndarray | None]]      # modality -> per row a grid (h×w, 0..1), None if absent
    methods: dict[str, str]                       # modality -> method name
    contributions: list[dict] = field(default_factory=list)  # per row: fusion attention shares
    attention: dict | None = None
    criteria: dict | None = None                  # a multi-task network's criteria logits {criterion: B×L}


def _criteria_logits(out: dict) -> dict | None:
    crit = out.get("criteria") if isinstance(out, dict) else None
    return {k: v.detach().float() for k, v in crit.items()} if crit else None


class _Probe:
    """Finds what to explain inside one encoder (a dermfusion Backbone or any nn.Module)."""

    method = "input_gradient"
    needs_grad = True

    def __init__(self, key: str, module: nn.Module, recorder: "_Recorder"):
        self.key, self.module, self.recorder = key, module, recorder
        self.handles: list = []  # forward-hook handles; a deep copy's handles point at the copy's hooks

    def per_pass(self) -> int:
        return 0

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []


class _ViTProbe(_Probe):
    method = "attention_rollout"
    needs_grad = False

    def __init__(self, key, module, recorder, vit: nn.Module, attn_modules: list[nn.Module]):
        super().__init__(key, module, recorder)
        self.vit = vit
        self.attn_modules = attn_modules
        self.num_prefix = int(getattr(vit, "num_prefix_tokens", 1 if getattr(vit, "cls_token", None) is not None else 0))
        grid = getattr(getattr(vit, "patch_embed", None), "grid_size", None)
        self.grid = tuple(int(g) for g in grid) if grid is not None else None
        self.global_pool = str(getattr(vit, "global_pool", "token") or "")
        self.fused_before = [(mod, mod.fused_attn) for mod in attn_modules]
        for mod in attn_modules:
            mod.fused_attn = False  # the explicit path materialises the attention probabilities
            self.handles.append(mod.attn_drop.register_forward_hook(self._hook))

    def remove(self) -> None:
        super().remove()
        for mod, fused in self.fused_before:
            mod.fused_attn = fused

    def _hook(self, _mod, _inp, out):
        self.recorder.record(self.key, out.detach())

    def per_pass(self) -> int:
        return len(self.attn_modules)

    def grid_for(self, n_tokens: int) -> tuple[int, int]:
        n = n_tokens - self.num_prefix
        if self.grid is not None and self.grid[0] * self.grid[1] == n:
            return self.grid
        side = int(round(n ** 0.5))  # dynamic image size: assume a square grid
        return (side, max(1, n // max(side, 1)))

    def maps(self, attns: list[torch.Tensor], token_weights: torch.Tensor | None) -> torch.Tensor:
        """B×h×w rollout maps from one pass' L attention tensors (B×H×N×N)."""
        rollout = None
        for a in attns:
            a = a.float().mean(1)  # average heads
            n = a.shape[-1]
            a = 0.5 * a + 0.5 * torch.eye(n, device=a.device)[None]
            a = a / a.sum(-1, keepdim=True).clamp_min(1e-12)
            rollout = a if rollout is None else a @ rollout
        b, n = rollout.shape[0], rollout.shape[-1]
        if token_weights is not None and token_weights.shape[-1] >= n and float(token_weights[:, :n].sum()) > 0:
            w = token_weights[:, :n].float()
        elif self.global_pool == "token" and self.num_prefix > 0:
            w = torch.zeros(b, n, device=rollout.device)
            w[:, 0] = 1.0
        elif self.global_pool == "avg":
            w = torch.zeros(b, n, device=rollout.device)
            w[:, self.num_prefix:] = 1.0
        else:
            w = torch.ones(b, n, device=rollout.device)
        w = w / w.sum(-1, keepdim=True).clamp_min(1e-12)
        rel = (w[:, None, :] @ rollout)[:, 0, self.num_prefix:]
        h, wd = self.grid_for(n)
        return rel[:, : h * wd].reshape(b, h, wd)


class _CNNProbe(_Probe):
    method = "grad_cam"
    needs_grad = True

    def __init__(self, key, module, recorder, target: nn.Module):
        super().__init__(key, module, recorder)
        self.handles.append(target.register_forward_hook(self._hook))

    def _hook(self, _mod, _inp, out):
        if isinstance(out, (tuple, list)):
            out = out[-1]
        if isinstance(out, torch.Tensor) and out.ndim == 4:
            self.recorder.record(self.key, out)

    def per_pass(self) -> int:
        return 1


class _Recorder:
    """Thread-local capture buffers, so concurrent requests never see each other's activations."""

    def __init__(self):
        self._local = threading.local()

    def __deepcopy__(self, memo) -> "_Recorder":  # a thread-local cannot be copied ("cannot pickle '_thread._local'")
        return _Recorder()                           # a copy of an explained model gets fresh buffers of its own

    def start(self) -> None:
        self._local.records = {}

    def stop(self) -> dict[str, list[torch.Tensor]]:
        rec = getattr(self._local, "records", None) or {}
        self._local.records = None
        return rec

    def record(self, key: str, t: torch.Tensor) -> None:
        rec = getattr(self._local, "records", None)
        if rec is not None:
            rec.setdefault(key, []).append(t)


def _inner_model(enc: nn.Module) -> nn.Module:
    inner = getattr(enc, "model", enc)
    return getattr(inner, "trunk", inner)  # an open_clip timm tower (DermLIP PanDerm-base): the timm network inside


def _make_probe(key: str, enc: nn.Module, recorder: _Recorder) -> _Probe:
    inner = _inner_model(enc)
    attn = [m for m in inner.modules() if hasattr(m, "fused_attn") and isinstance(getattr(m, "attn_drop", None), nn.Module)]
    if attn and hasattr(inner, "patch_embed"):
        return _ViTProbe(key, enc, recorder, inner, attn)
    info = getattr(inner, "feature_info", None)
    if info:
        try:
            name = info[-1]["module"] if isinstance(info, list) else info.module_name()[-1]
            name = name if _has(inner, name) else name.replace("_", ".")
            return _CNNProbe(key, enc, recorder, inner.get_submodule(name))
        except Exception:  # noqa: BLE001 — an unusual feature_info: fall back to input gradients
            pass
    return _Probe(key, enc, recorder)


def _has(module: nn.Module, name: str) -> bool:
    try:
        module.get_submodule(name)
        return True
    except AttributeError:
        return False


def _normalise(grid: torch.Tensor) -> np.ndarray:
    g = grid.detach().float().cpu().numpy()
    g = np.nan_to_num(g, nan=0.0, posinf=0.0, neginf=0.0)
    lo, hi = float(g.min()), float(g.max())
    return ((g - lo) / (hi - lo)).astype(np.float32) if hi - lo > 1e-12 else np.zeros_like(g, dtype=np.float32)


class Explainer:
    """Install on an eval-mode dermfusion network once; call :meth:`run` per batch (thread-safe).

    ``Explainer.for_model(model)`` returns the explainer already attached to a model (hooks must be
    installed only once per model, or every attention map would be recorded twice).
    """

    @classmethod
    def for_model(cls, model: nn.Module) -> "Explainer":
        ex = getattr(model, "_dermfusion_explainer", None)
        if ex is None:
            ex = cls(model)
        return ex

    @staticmethod
    def remove_from(model: nn.Module) -> None:
        """Uninstall the explainer, if any, from ``model`` — a *copy* of an explained model (a fast backend's, an
        export's), which must run as the plain model does: no hooks, fused attention back on."""
        ex = model.__dict__.pop("_dermfusion_explainer", None)
        for probe in (ex.probes.values() if ex is not None else ()):
            probe.remove()

    def __init__(self, model: nn.Module):
        if getattr(model, "_dermfusion_explainer", None) is not None:
            raise ValueError("this model already has an Explainer; use Explainer.for_model(model)")
        self.model = model
        object.__setattr__(model, "_dermfusion_explainer", self)  # not a submodule, not in state_dict
        self.recorder = _Recorder()
        self.modalities: list[str] = list(getattr(model, "modalities", None) or model.feature_spec.modalities)
        encoders = getattr(model, "encoders", None)
        self.probes: dict[str, _Probe] = {}
        if isinstance(encoders, nn.ModuleDict):
            for key, enc in encoders.items():
                self.probes[key] = _make_probe(key, enc, self.recorder)
        keys = getattr(model, "encoder_keys", None)
        self._joint = keys is None and len(self.probes) == 1 and next(iter(self.probes)) not in self.modalities
        self.encoder_keys: dict[str, str | None] = {}
        for m in self.modalities:
            if keys and m in keys:
                self.encoder_keys[m] = keys[m]
            elif m in self.probes:
                self.encoder_keys[m] = m
            elif len(self.probes) == 1:  # one joint encoder over all views (early fusion)
                self.encoder_keys[m] = next(iter(self.probes))
            else:
                self.encoder_keys[m] = None
        self.needs_grad = any(p.needs_grad for p in self.probes.values()) or any(
            k is None or k not in self.probes for k in self.encoder_keys.values())

    def method(self, modality: str) -> str:
        key = self.encoder_keys.get(modality)
        probe = self.probes.get(key) if key is not None else None
        return probe.method if probe is not None else "input_gradient"

    def _pass_index(self, modality: str) -> int:
        """Which call of its encoder saw this modality: shared encoders run once per modality, in order."""
        if self._joint:
            return 0
        key = self.encoder_keys[modality]
        same = [m for m in self.modalities if self.encoder_keys.get(m) == key]
        return same.index(modality)

    def run(self, batch: dict, explain: bool = True) -> ExplainResult:
        model = self.model
        if not explain:
            with torch.no_grad():
                out = self._forward(batch)
            logits = out["logits"].float()
            probs = torch.softmax(logits, -1)
            return ExplainResult(logits, probs.cpu().numpy(), probs.argmax(-1).cpu().numpy(), {}, {},
                                 fusion_contributions(out.get("attention"), model, batch), out.get("attention"),
                                 _criteria_logits(out))
        batch = dict(batch)
        if self.needs_grad:
            batch["images"] = {m: x.detach().clone().requires_grad_(True) for m, x in batch["images"].items()}
        self.recorder.start()
        try:
            with torch.set_grad_enabled(self.needs_grad):
                out = self._forward(batch)
        finally:
            records = self.recorder.stop()
        logits = out["logits"].float()
        probs = torch.softmax(logits.detach(), -1)
        target = probs.argmax(-1)
        attention = out.get("attention")
        present = batch["image_present"].bool()
        spec_mods = list(model.feature_spec.modalities) if hasattr(model, "feature_spec") else self.modalities

        grads: dict[int, torch.Tensor | None] = {}
        if self.needs_grad:
            wanted = []
            for key, probe in self.probes.items():
                if isinstance(probe, _CNNProbe):
                    wanted += records.get(key, [])
            inputs = [batch["images"][m] for m in self.modalities if self.method(m) == "input_gradient"]
            tensors = [t for t in wanted + inputs if t.requires_grad]
            if tensors:
                score = logits.gather(1, target[:, None]).sum()
                gs = torch.autograd.grad(score, tensors, allow_unused=True)
                grads = {id(t): g for t, g in zip(tensors, gs)}

        maps: dict[str, list[np.ndarray | None]] = {}
        methods: dict[str, str] = {}
        b = logits.shape[0]
        for m in self.modalities:
            col = spec_mods.index(m) if m in spec_mods else self.modalities.index(m)
            method = self.method(m)
            key = self.encoder_keys.get(m)
            grid = None
            if method == "attention_rollout":
                probe = self.probes[key]
                n = probe.per_pass()
                i = self._pass_index(m)
                attns = records.get(key, [])[i * n:(i + 1) * n]
                if len(attns) == n and n > 0:
                    tw = attention["image"].get(m) if attention and "image" in attention else None
                    grid = probe.maps(attns, tw.detach() if tw is not None else None)
                    if tw is not None:
                        method = "fusion_weighted_attention_rollout"
            elif method == "grad_cam":
                acts = records.get(key, [])
                i = self._pass_index(m)
                if i < len(acts):
                    a = acts[i]
                    g = grads.get(id(a))
                    if g is not None:
                        w = g.mean((2, 3), keepdim=True)
                        grid = torch.relu((w * a.detach()).sum(1))
            if grid is not None:
                grid = tile_windows(model, m, grid, b, attention)  # windowed encoders: one map per image
            if grid is None and method != "attention_rollout":
                x = batch["images"][m]
                g = grads.get(id(x))
                if g is not None:
                    sal = (g * x.detach()).abs().sum(1, keepdim=True)
                    grid = nn.functional.avg_pool2d(sal, 5, stride=1, padding=2)[:, 0]
                    method = "input_gradient"
            methods[m] = method
            rows: list[np.ndarray | None] = []
            for r in range(b):
                rows.append(_normalise(grid[r]) if grid is not None and bool(present[r, col]) else None)
            maps[m] = rows
        return ExplainResult(logits.detach(), probs.cpu().numpy(), target.cpu().numpy(), maps, methods,
                             fusion_contributions(attention, model, batch), attention, _criteria_logits(out))

    def _forward(self, batch: dict) -> dict:
        try:
            return self.model(batch, return_attention=True)
        except TypeError:  # a model without the keyword
            return self.model(batch)
