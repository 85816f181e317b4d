"""Losses: soft-F1 equals 1 − F1 on hard inputs, focal reduces to CE, aux heads respect masks."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from dermfusion.training.losses import (FocalLoss, alpha_from_counts, build_loss, logit_adjustment,
                                         soft_f1_from_probs, soft_f1_loss)


def _macro_f1(pred: torch.Tensor, truth: torch.Tensor) -> float:
    scores = []
    for c in range(truth.shape[1]):
        tp = int((pred[:, c] * truth[:, c]).sum())
        fp = int((pred[:, c] * (1 - truth[:, c])).sum())
        fn = int(((1 - pred[:, c]) * truth[:, c]).sum())
        scores.append(1.0 if tp + fp + fn == 0 else 2 * tp / (2 * tp + fp + fn))
    return sum(scores) / len(scores)


def test_soft_f1_is_one_minus_f1_on_hard_inputs():
    g = torch.Generator().manual_seed(0)
    truth = F.one_hot(torch.randint(0, 5, (40,), generator=g), 5).float()
    pred = F.one_hot(torch.randint(0, 5, (40,), generator=g), 5).float()
    pred[:, 4] = 0
    truth[:, 4] = 0  # a class absent from both scores 1, as in the MILK10k Dice
    assert soft_f1_from_probs(pred, truth).item() == pytest.approx(1 - _macro_f1(pred, truth), abs=1e-6)
    assert soft_f1_from_probs(truth, truth).item() == pytest.approx(0.0, abs=1e-7)


def test_soft_f1_loss_is_differentiable_and_decreases_toward_truth():
    target = F.one_hot(torch.tensor([0, 1, 2, 1]), 3).float()
    logits = torch.zeros(4, 3, requires_grad=True)
    loss = soft_f1_loss(logits, target)
    loss.backward()
    assert logits.grad.abs().sum() > 0
    assert soft_f1_loss(target * 10, target) < loss


def test_focal_with_gamma_zero_is_cross_entropy():
    g = torch.Generator().manual_seed(0)
    logits, y = torch.randn(16, 4, generator=g), torch.randint(0, 4, (16,), generator=g)
    assert torch.allclose(FocalLoss(gamma=0)(logits, y), F.cross_entropy(logits, y), atol=1e-6)
    alpha = torch.tensor([0.5, 2.0, 1.0, 0.5])
    weighted = F.cross_entropy(logits, y, weight=alpha, reduction="none").mean()
    assert torch.allclose(FocalLoss(gamma=0, alpha=alpha)(logits, F.one_hot(y, 4).float()), weighted, atol=1e-6)
    # gamma > 0 down-weights easy (confident, correct) examples
    easy = F.one_hot(y, 4).float() * 8
    assert FocalLoss(gamma=2)(easy, y) < 0.01 * F.cross_entropy(easy, y)


def test_alpha_from_counts_is_inverse_frequency_with_mean_one():
    a = alpha_from_counts([100, 10, 1, 0])
    assert a.mean().item() == pytest.approx(1.0)
    assert a[1] / a[0] == pytest.approx(10.0) and a[2] == a[3]


def test_build_loss_parts_and_aux_mask():
    counts = [10, 5, 1]
    fn = build_loss({"name": "focal+soft_f1", "gamma": 2.0, "alpha": "inverse_frequency", "soft_f1_weight": 0.5,
                     "aux_weight": 0.3}, counts)
    target = F.one_hot(torch.tensor([0, 1, 2, 0]), 3).float()
    logits = torch.randn(4, 3)
    aux = torch.randn(4, 3)
    mask = torch.tensor([True, True, False, False])
    loss, parts = fn({"logits": logits, "aux": {"clinical": aux}, "aux_mask": {"clinical": mask}}, target)
    assert set(parts) == {"main", "soft_f1", "aux_clinical", "total"}
    expected = parts["main"] + 0.5 * parts["soft_f1"] + 0.3 * parts["aux_clinical"]
    assert torch.allclose(loss, expected)
    aux2 = aux.clone()
    aux2[~mask] = 100.0  # rows whose view is absent do not enter the auxiliary loss
    loss2, _ = fn({"logits": logits, "aux": {"clinical": aux2}, "aux_mask": {"clinical": mask}}, target)
    assert torch.allclose(loss, loss2)


def test_build_loss_ce_with_label_smoothing_and_errors():
    target = F.one_hot(torch.tensor([0, 1, 2]), 3).float()
    logits = torch.randn(3, 3)
    loss, parts = build_loss({"name": "ce", "label_smoothing": 0.1, "alpha": "none"})({"logits": logits}, target)
    assert torch.allclose(loss, F.cross_entropy(logits, torch.tensor([0, 1, 2]), label_smoothing=0.1))
    with pytest.raises(ValueError, match="unknown loss"):
        build_loss("hinge")


def test_logit_adjustment_removes_the_prior():
    adj = logit_adjustment([0.7, 0.2, 0.1], tau=1.0)
    assert torch.allclose(adj, -torch.log(torch.tensor([0.7, 0.2, 0.1])))
    # with uninformative logits the adjusted prediction favours the rare class
    assert int(torch.argmax(torch.zeros(3) + adj)) == 2


def test_one_vs_rest_term_is_the_binary_cross_entropy_of_the_softmax_probability():
    from dermfusion.training.losses import one_vs_rest_loss

    torch.manual_seed(0)
    logits = torch.randn(16, 7) * 3
    target = torch.randint(0, 7, (16,))
    target[:4] = 4  # some rows of the class
    p = torch.softmax(logits, 1)[:, 4]
    y = (target == 4).float()
    expected = -(y * torch.log(p) + (1 - y) * torch.log(1 - p)).mean()
    assert torch.allclose(one_vs_rest_loss(logits, target, 4), expected, atol=1e-5)
    # in the training loss: its own logged part, added with its weight; off without a weight
    base = build_loss({"name": "ce", "alpha": "none"})({"logits": logits}, target)[0]
    loss, parts = build_loss({"name": "ce", "alpha": "none", "vs_rest_class": "MEL", "vs_rest_weight": 0.5},
                             classes=["AKIEC", "BCC", "BKL", "DF", "MEL", "NV", "VASC"])({"logits": logits}, target)
    assert torch.allclose(parts["vs_rest"], expected, atol=1e-5)
    assert torch.allclose(loss, base + 0.5 * expected, atol=1e-5)


def test_one_vs_rest_needs_a_class_of_the_task():
    with pytest.raises(ValueError, match="needs loss.vs_rest_class"):
        build_loss({"name": "ce", "vs_rest_weight": 0.5}, classes=["A", "B"])
    with pytest.raises(ValueError, match="'MEL' is not one of the task's classes"):
        build_loss({"name": "ce", "vs_rest_class": "MEL", "vs_rest_weight": 0.5}, classes=["A", "B"])
