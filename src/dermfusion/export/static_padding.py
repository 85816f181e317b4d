"""TensorFlow-style "same" padding made static for a fixed input size, before an export.

timm's ``tf_*`` ports (EfficientNet-Lite among them) pad each strided convolution by an amount computed from the
input's height and width at run time (``Conv2dSame``, ``MaxPool2dSame``). Traced into ONNX that is ~60 small shape
operators (Shape, Gather, Ceil, Sub, Pad …) that ONNX Runtime evaluates on every call — a third of a batch-1
Lite0 call on 2 cores (BENCHMARKS.md). The exported graph takes one image size (the model's ``input_size``), so
the padding is known: ``static_same_padding_(model, sizes)`` records each such layer's input size in one forward
pass and replaces it by a constant zero pad + the same layer without padding. Outputs are unchanged (tested)."""
from __future__ import annotations

import torch
from torch import nn


def _same_layers(model: nn.Module) -> list[tuple[nn.Module, str, nn.Module]]:
    out = []
    for parent in model.modules():
        for name, child in parent.named_children():
            if type(child).__name__ in {"Conv2dSame", "MaxPool2dSame"}:
                out.append((parent, name, child))
    return out


def _pads(size: int, kernel: int, stride: int, dilation: int) -> tuple[int, int]:
    total = max((-(size // -stride) - 1) * stride + (kernel - 1) * dilation + 1 - size, 0)
    return total // 2, total - total // 2


def static_same_padding_(model: nn.Module, example: dict) -> int:
    """Replace dynamic "same" padding layers in ``model`` by static ones for the input sizes of ``example`` (a
    batch the model accepts); returns how many were replaced. Modifies ``model`` in place — call it on a copy."""
    layers = _same_layers(model)
    if not layers:
        return 0
    seen: dict[int, tuple[int, int]] = {}
    def record(i: int):
        def hook(_module, args):  # returns None: the layer's input is left as it is
            seen.setdefault(i, tuple(args[0].shape[-2:]))
        return hook

    handles = [child.register_forward_pre_hook(record(i)) for i, (_, _, child) in enumerate(layers)]
    try:
        with torch.no_grad():
            model(example)
    finally:
        for h in handles:
            h.remove()
    n = 0
    for i, (parent, name, child) in enumerate(layers):
        if i not in seen:  # never ran for this input (an unused branch): keep it dynamic
            continue
        (h, w), k, s, d = seen[i], child.kernel_size, child.stride, child.dilation
        k, s, d = ((x, x) if isinstance(x, int) else tuple(x) for x in (k, s, d))
        top, bottom = _pads(h, k[0], s[0], d[0])
        left, right = _pads(w, k[1], s[1], d[1])
        if isinstance(child, nn.Conv2d):
            plain = nn.Conv2d(child.in_channels, child.out_channels, child.kernel_size, child.stride, 0, child.dilation,
                              child.groups, child.bias is not None)
            plain.weight, plain.bias = child.weight, child.bias
            pad = nn.ZeroPad2d((left, right, top, bottom))
        else:  # MaxPool2dSame pads with -inf
            plain = nn.MaxPool2d(child.kernel_size, child.stride, 0, child.dilation, ceil_mode=child.ceil_mode)
            pad = nn.ConstantPad2d((left, right, top, bottom), float("-inf"))
        setattr(parent, name, nn.Sequential(pad, plain))
        n += 1
    return n
