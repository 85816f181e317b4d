"""Losses for long-tailed skin-lesion classification.

MILK10k is scored by mean per-class Dice (= F1), so a macro soft-F1 term can be added to a focal
or cross-entropy loss. Targets are B×C probability vectors (one-hot or smoothed). Auxiliary heads
(per-view, tabular) are trained with the same base loss, only on rows where their input exists.

A model may add its own loss terms (a regulariser, a segmentation loss, 7-point criteria heads): it computes
them in ``forward`` while training, from what the batch carries, and returns them already weighted under
``outputs["losses"]`` ({name: scalar}); they are added to the total and logged by name.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn


def alpha_from_counts(counts: Sequence[float] | torch.Tensor) -> torch.Tensor:
    """Inverse-frequency class weights normalised to mean 1 (so the loss scale stays CE-like).

    A class with zero examples gets the weight of a class with one.
    """
    c = torch.as_tensor(counts, dtype=torch.float32).clamp_min(1.0)
    w = 1.0 / c
    return w * (len(w) / w.sum())


class FocalLoss(nn.Module):
    """Focal loss on softmax probabilities with soft targets: −Σ_c t_c α_c (1 − p_c)^γ log p_c, batch mean.

    γ = 0 gives (α-weighted) cross-entropy.
    """

    def __init__(self, gamma: float = 2.0, alpha: torch.Tensor | Sequence[float] | None = None):
        super().__init__()
        self.gamma = gamma
        self.register_buffer("alpha", None if alpha is None else torch.as_tensor(alpha, dtype=torch.float32))

    def forward(self, logits: torch.Tensor, target: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
        target = _as_probs(target, logits.shape[-1]).to(logits.dtype)
        logp = F.log_softmax(logits.float(), dim=-1)
        w = (1.0 - logp.exp()).clamp_min(0).pow(self.gamma) if self.gamma else 1.0
        loss = -(target * w * logp)
        if self.alpha is not None:
            loss = loss * self.alpha.to(loss.device)
        loss = loss.sum(-1)
        return loss.mean() if reduction == "mean" else loss


def soft_f1_from_probs(probs: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """1 − mean over classes of 2·Σpt / (Σp + Σt); a class with Σp + Σt = 0 scores 1 (as MILK10k's Dice does).

    On hard 0/1 inputs this is exactly 1 − macro-F1.
    """
    target = target.to(probs.dtype)
    tp = (probs * target).sum(0)
    denom = probs.sum(0) + target.sum(0)
    dice = torch.where(denom > 0, 2 * tp / denom.clamp_min(1e-8), torch.ones_like(denom))
    return 1.0 - dice.mean()


def soft_f1_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Macro soft-F1 loss on softmax probabilities."""
    return soft_f1_from_probs(F.softmax(logits.float(), dim=-1), _as_probs(target, logits.shape[-1]))


def logit_adjustment(class_priors: Sequence[float] | torch.Tensor, tau: float = 1.0) -> torch.Tensor:
    """Post-hoc logit adjustment (Menon et al. 2021): returns −τ·log π, to be *added* to logits.

    Removes the training prior so rare classes are not under-predicted; fits
    ``Calibration(prior_adjustment=...)`` directly.
    """
    pi = torch.as_tensor(class_priors, dtype=torch.float32)
    pi = pi.clamp_min(1e-12) / pi.clamp_min(1e-12).sum()
    return -tau * pi.log()


def _as_probs(target: torch.Tensor, num_classes: int) -> torch.Tensor:
    if target.ndim == 1:  # class indices
        return F.one_hot(target.long(), num_classes).float()
    return target.float()


@dataclass
class LossConfig:
    name: str = "ce"                 # "ce" | "focal" | "focal+soft_f1" | "ce+soft_f1"
    label_smoothing: float = 0.0     # ce only
    gamma: float = 2.0               # focal only
    alpha: str | Sequence[float] | None = None  # None | "inverse_frequency" | per-class weights
    soft_f1_weight: float = 1.0
    aux_weight: float = 0.0
    vs_rest_class: str | None = None  # a class name (needs the task's classes in build_loss)
    vs_rest_weight: float = 0.0

    @classmethod
    def from_any(cls, cfg) -> "LossConfig":
        if isinstance(cfg, cls):
            return cfg
        if cfg is None:
            return cls()
        if isinstance(cfg, str):
            return cls(name=cfg)
        if isinstance(cfg, Mapping):
            unknown = set(cfg) - set(cls.__dataclass_fields__)
            if unknown:
                raise ValueError(f"unknown loss option(s) {sorted(unknown)}; known: {sorted(cls.__dataclass_fields__)}")
            return cls(**cfg)
        return cls(**{k: getattr(cfg, k) for k in cls.__dataclass_fields__ if hasattr(cfg, k)})


class TrainingLoss(nn.Module):
    """``(outputs, target) -> (loss, parts)``; parts are detached tensors for logging."""

    def __init__(self, base: Callable, soft_f1_weight: float, aux_weight: float, vs_rest: tuple[int, float] | None = None):
        super().__init__()
        self.base, self.soft_f1_weight, self.aux_weight = base, soft_f1_weight, aux_weight  # a Module base moves with .to()
        self.vs_rest = vs_rest  # (class index, weight) or None

    def forward(self, outputs: dict, target: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        logits = outputs["logits"]
        main = self.base(logits, target)
        parts = {"main": main.detach()}
        loss = main
        if self.soft_f1_weight:
            sf1 = soft_f1_loss(logits, target)
            parts["soft_f1"] = sf1.detach()
            loss = loss + self.soft_f1_weight * sf1
        if self.vs_rest:
            k, weight = self.vs_rest
            vr = one_vs_rest_loss(logits, target, k)
            parts["vs_rest"] = vr.detach()
            loss = loss + weight * vr
        if self.aux_weight:
            masks = outputs.get("aux_mask", {})
            for name, aux_logits in outputs.get("aux", {}).items():
                per_row = self.base(aux_logits, target, reduction="none")
                m = masks.get(name)
                if m is not None:  # only rows where the auxiliary head's input exists
                    m = m.to(per_row.dtype)
                    aux = (per_row * m).sum() / m.sum().clamp_min(1.0)
                else:
                    aux = per_row.mean()
                parts[f"aux_{name}"] = aux.detach()
                loss = loss + self.aux_weight * aux
        for name, term in (outputs.get("losses") or {}).items():  # the model's own terms, already weighted
            parts[name] = term.detach()
            loss = loss + term
        parts["total"] = loss.detach()
        return loss, parts


def one_vs_rest_loss(logits: torch.Tensor, target: torch.Tensor, k: int) -> torch.Tensor:
    """Binary cross-entropy of class ``k`` against the rest, from the softmax of the same logits: the binary logit
    is log P(k) − log(1 − P(k)) = z_k − logsumexp(z_j, j ≠ k); the target is the (soft) probability of ``k``."""
    z = logits.float()
    rest = torch.cat([z[:, :k], z[:, k + 1:]], dim=1)
    binary = z[:, k] - torch.logsumexp(rest, dim=1)
    y = _as_probs(target, logits.shape[-1])[:, k]
    return F.binary_cross_entropy_with_logits(binary, y)


def _ce(label_smoothing: float, weight: torch.Tensor | None):
    def ce(logits, target, reduction="mean"):
        target = _as_probs(target, logits.shape[-1])
        w = None if weight is None else weight.to(logits.device)
        return F.cross_entropy(logits.float(), target, weight=w, label_smoothing=label_smoothing, reduction=reduction)

    return ce


def build_loss(cfg=None, class_counts: Sequence[float] | None = None,
               classes: Sequence[str] | None = None) -> TrainingLoss:
    """Build the training loss from a config (dict, LossConfig, or loss name); ``classes`` names the logits (for
    ``vs_rest_class``)."""
    cfg = LossConfig.from_any(cfg)
    vs_rest = None
    if cfg.vs_rest_weight:
        if cfg.vs_rest_class is None:
            raise ValueError("loss.vs_rest_weight needs loss.vs_rest_class (e.g. MEL)")
        if classes is None or cfg.vs_rest_class not in classes:
            raise ValueError(f"loss.vs_rest_class={cfg.vs_rest_class!r} is not one of the task's classes "
                             f"({', '.join(classes or [])})")
        vs_rest = (list(classes).index(cfg.vs_rest_class), float(cfg.vs_rest_weight))
    alpha, spec = None, cfg.alpha
    if isinstance(spec, str) and spec.strip().lower() in {"", "none", "null"}:
        spec = None
    if isinstance(spec, str):
        if spec not in {"inverse_frequency", "inverse_freq"}:
            raise ValueError(f"alpha={spec!r}: use None, 'inverse_frequency' or a list of per-class weights")
        if class_counts is None:
            raise ValueError("alpha='inverse_frequency' needs class_counts")
        alpha = alpha_from_counts(class_counts)
    elif spec is not None:
        alpha = torch.as_tensor(spec, dtype=torch.float32)
    base_name, _, extra = cfg.name.partition("+")
    if extra not in {"", "soft_f1"}:
        raise ValueError(f"unknown loss {cfg.name!r}; use ce, focal, ce+soft_f1 or focal+soft_f1")
    if base_name == "ce":
        base = _ce(cfg.label_smoothing, alpha)
    elif base_name == "focal":
        base = FocalLoss(cfg.gamma, alpha)
    else:
        raise ValueError(f"unknown loss {cfg.name!r}; use ce, focal, ce+soft_f1 or focal+soft_f1")
    return TrainingLoss(base, cfg.soft_f1_weight if extra else 0.0, cfg.aux_weight, vs_rest)
