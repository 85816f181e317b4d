"""Inference backends: equal attention, accuracy vs fp32, and selection with an fp32 fallback."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from dermfusion.inference.backends import (BackendRunner, compare_probs, prepare_backend, select_backend,
                                           selection_text)
from dermfusion.models.fast_attention import FastMultiheadAttention, fast_attention_
from perf_helpers import tiny_batch, tiny_trimodal


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.mark.parametrize("need_weights", [False, True])
def test_fast_attention_equals_multihead_attention(need_weights):
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(32, 4, batch_first=True).eval()
    fast = FastMultiheadAttention.from_mha(mha).eval()
    x, kv = torch.randn(3, 7, 32), torch.randn(3, 5, 32)
    pad = torch.tensor([[False] * 5, [False, False, True, True, True], [False, True, False, True, False]])
    with torch.no_grad():
        for args, kw in (((x, x, x), {}), ((x, kv, kv), {"key_padding_mask": pad})):
            a, wa = mha(*args, need_weights=need_weights, **kw)
            b, wb = fast(*args, need_weights=need_weights, **kw)
            torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-5)
            if need_weights:
                torch.testing.assert_close(wb, wa, atol=1e-5, rtol=1e-5)


def _tiny_open_clip():
    from open_clip.transformer import VisionTransformer

    torch.manual_seed(0)
    m = VisionTransformer(image_size=32, patch_size=8, width=64, layers=2, heads=2, mlp_ratio=2.0, output_dim=16)
    m.output_tokens = True
    return m.eval()


def test_open_clip_fast_attention_is_exact_and_avoids_broadcast_bmm():
    """The open_clip slow path: under inference_mode + bf16 autocast nn.MultiheadAttention's QKV projection
    becomes a bmm over a broadcast weight. After fast_attention_ it is one GEMM, outputs unchanged."""
    from torch.profiler import profile

    ref = _tiny_open_clip()
    fast = copy.deepcopy(ref)
    assert fast_attention_(fast) == 2
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        for a, b in zip(ref(x), fast(x)):
            torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-5)

    def ops(model):
        with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16), profile() as prof:
            model(x)
        return {e.key for e in prof.key_averages()}

    assert "aten::bmm" in ops(ref)          # the slow path this module works around
    assert "aten::bmm" not in ops(fast)


@pytest.mark.parametrize("name", ["bf16", "autocast", "int8", "onnx"])
def test_backend_agrees_with_fp32(name):
    model = tiny_trimodal()
    batch = tiny_batch(model, 4, seed=1)
    ref = prepare_backend(model, "fp32").predict_proba(batch)
    runner = prepare_backend(model, name, **({"exporter": "torchscript"} if name == "onnx" else {}))
    got = runner.predict_proba(batch)
    cmp = compare_probs(ref, got)
    assert cmp["max_prob_diff"] < (1e-4 if name == "onnx" else 0.02), cmp
    assert cmp["argmax_agreement"] == 1.0
    # the backends work on a copy: the fp32 model is untouched
    assert all(p.dtype == torch.float32 for p in model.parameters())


@pytest.mark.slow
def test_compile_backend_agrees_with_fp32_and_keeps_masking():
    model = tiny_trimodal()
    batch = tiny_batch(model, 4, seed=3)
    runner = prepare_backend(model, "compile", sample_batch=batch)
    assert runner.info["compile_s"] > 0
    cmp = compare_probs(prepare_backend(model, "fp32").predict_proba(batch), runner.predict_proba(batch))
    assert cmp["max_prob_diff"] < 0.02 and cmp["argmax_agreement"] == 1.0, cmp
    first = model.feature_spec.modalities[0]
    masked = {**batch, "images": dict(batch["images"]), "image_present": batch["image_present"].clone()}
    masked["image_present"][:, 0] = False
    before = runner.predict_proba(masked)
    masked["images"][first] = torch.rand_like(batch["images"][first])  # the missing image's pixels must not matter
    assert torch.allclose(before, runner.predict_proba(masked), atol=1e-6)


@pytest.mark.parametrize("name", ["onnx", "onnx-int8"])
def test_onnx_backends_leave_no_export_behind(name, tmp_path, monkeypatch):
    """A ViT-B pair's export is ~0.7 GB: the temporary graph files go once ONNX Runtime has loaded them."""
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    model = tiny_trimodal()
    batch = tiny_batch(model, 3, seed=2)
    runner = prepare_backend(model, name, exporter="torchscript")
    assert list(tmp_path.iterdir()) == []
    got = runner.predict_proba(batch)  # the session still runs from memory
    cmp = compare_probs(prepare_backend(model, "fp32").predict_proba(batch), got)
    assert cmp["max_prob_diff"] < (1e-4 if name == "onnx" else 0.05), cmp
    if name == "onnx-int8":  # 7-bit weights where u8×s8 sums would saturate (no VNNI / AMX)
        from dermfusion.runtime.device import cpu_int8_dot_product

        assert runner.info["weight_bits"] == (8 if cpu_int8_dot_product() else 7)


def test_bf16_backend_keeps_masking():
    model = tiny_trimodal()
    runner = prepare_backend(model, "bf16")
    batch = tiny_batch(model, 3, seed=2)
    a = runner(batch)["logits"]
    batch["images"]["clinical"][0] = torch.randn_like(batch["images"]["clinical"][0]) * 10
    torch.testing.assert_close(runner(batch)["logits"][0], a[0], atol=0, rtol=0)


def _broken(model, device="cpu", **_):
    """A backend that runs but predicts something else (e.g. a bad quantisation)."""
    def fn(batch):
        with torch.no_grad():
            logits = model(batch)["logits"]
        return {"logits": -logits * 5}
    return BackendRunner("broken", fn)


def _crashing(model, device="cpu", **_):
    raise RuntimeError("no kernel for this op")


def _cached(model, device="cpu", sample_batch=None, **_):
    """Correct and (trivially) faster than fp32: replays the answer."""
    with torch.no_grad():
        out = model(sample_batch)["logits"].clone()
    return BackendRunner("cached", lambda batch: {"logits": out})


def test_select_backend_falls_back_to_fp32_when_candidates_fail():
    model = tiny_trimodal()
    batch = tiny_batch(model, 4)
    sel = select_backend(model, batch, ["broken", "crashing"], factories={"broken": _broken, "crashing": _crashing})
    assert sel.name == "fp32"
    report = {r["name"]: r for r in sel.candidates}
    assert not report["broken"]["ok"] and "accuracy check failed" in report["broken"]["reason"]
    assert not report["crashing"]["ok"] and "no kernel" in report["crashing"]["reason"]
    text = selection_text(sel.candidates, sel.name)  # what predict prints and the service logs
    assert text.startswith("fp32 ") and "fp32 " in text and " ms ✓" in text
    assert "broken ✗ accuracy check failed" in text and "crashing ✗ RuntimeError: no kernel for this op" in text
    ref = prepare_backend(model, "fp32").predict_proba(batch)
    torch.testing.assert_close(sel.runner.predict_proba(batch), ref)


def test_select_backend_picks_fastest_passing():
    model = tiny_trimodal()
    batch = tiny_batch(model, 4)
    sel = select_backend(model, batch, ["broken", "cached"], factories={"broken": _broken, "cached": _cached})
    assert sel.name == "cached"
    with pytest.raises(KeyError):
        prepare_backend(model, "no_such_backend")
