"""Benchmark instruments and the `bench` command on tiny models."""
from __future__ import annotations

import json

import pytest
import torch

from dermfusion.bench import bench_model, count_flops, floor_ms, markdown, save_json
from dermfusion.bench.timing import PeakMemory
from dermfusion.bench.report import COLUMNS
from dermfusion.export.onnx import synthetic_batch
from perf_helpers import tiny_batch, tiny_trimodal


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_count_flops_splits_encoders_and_fusion():
    model = tiny_trimodal()
    f = count_flops(model, synthetic_batch(model, 2, missing_image=False))
    assert set(f["encoders"]) == {"clinical", "dermoscopic"}
    assert f["encoders"]["clinical"] == pytest.approx(f["encoders"]["dermoscopic"])
    assert f["total"] == pytest.approx(sum(f["encoders"].values()) + f["fusion"])
    assert f["fusion"] > 0 and f["by_part"]["encoders"]["attention"] > 0  # CPU SDPA is counted
    # ViT encoder: 2 blocks of (qkv 3d² + proj d² + mlp 8d²)·T·2 FLOPs + patch embedding
    d, t = 32, 17
    linear = 2 * (12 * d * d * t * 2)
    assert f["by_part"]["encoders"]["linear"] / 2 == pytest.approx(linear, rel=0.01)
    rates = {"fp32": 100.0, "bf16": 400.0, "int8": 800.0}
    assert floor_ms(f, rates, "bf16") < floor_ms(f, rates, "fp32")
    assert floor_ms(f, rates, "fp32", batch_size=4) == pytest.approx(4 * floor_ms(f, rates, "fp32"))


def test_count_flops_sees_into_multihead_attention():
    """nn.MultiheadAttention's fused kernel (open_clip ViTs) must count like the same attention in linears."""
    d, t, b = 32, 10, 2
    mha = torch.nn.MultiheadAttention(d, 4, batch_first=True)

    class Wrap(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.mha = mha

        def forward(self, batch):
            x = batch["x"]
            return self.mha(x, x, x, need_weights=False)[0]

    f = count_flops(Wrap(), {"x": torch.randn(b, t, d), "image_present": torch.ones(b, 1)})
    projections = 4 * d * d * t * 2          # q, k, v and out projections
    attention = 2 * t * t * d * 2            # QKᵀ and AV
    assert f["total"] == pytest.approx(projections + attention, rel=0.02)


@pytest.mark.parametrize("dtype, tol", [("fp32", 1e-5), ("int8", 0.03)])
def test_onnx_runtime_matmul_probe_computes_the_product_it_times(dtype, tol):
    # the machine's int8 / fp32 rate (the floor's denominator) includes this kernel: it must be a real x @ w
    import numpy as np

    from dermfusion.bench.core import matmul_rate, ort_matmul_session

    rng = np.random.default_rng(0)
    w, x = rng.standard_normal((96, 64), dtype=np.float32), rng.standard_normal((5, 96), dtype=np.float32)
    y = ort_matmul_session(w, dtype).run(None, {"x": x})[0]
    assert y.shape == (5, 64)
    assert np.abs(y - x @ w).max() <= tol * np.abs(x @ w).max()
    assert matmul_rate(dtype, n=128, repeats=1) > 0


def test_onnx_int8_weights_are_7_bit_where_the_cpu_has_no_int8_dot_product(monkeypatch):
    # without VNNI / AMX, MLAS sums u8×s8 products in saturating 16-bit pairs: full-range int8 weights
    # lost ~20 % of this product on an AVX2-only EPYC, 7-bit weights ~1.5 %
    import numpy as np

    from dermfusion.bench.core import ort_matmul_session
    from dermfusion.runtime import device as runtime

    rng = np.random.default_rng(0)
    w, x = rng.standard_normal((96, 64), dtype=np.float32), rng.standard_normal((5, 96), dtype=np.float32)
    err = {bits: np.abs(ort_matmul_session(w, "int8", reduce_range=bits == 7).run(None, {"x": x})[0] - x @ w).max()
           / np.abs(x @ w).max() for bits in (7, 8)}
    assert err[7] < 0.03
    if not runtime.cpu_int8_dot_product():
        assert err[8] > 2 * err[7]  # the saturation the default avoids
    monkeypatch.setattr(runtime, "cpu_flags", lambda: {"avx2"})
    assert not runtime.cpu_int8_dot_product()
    monkeypatch.setattr(runtime, "cpu_flags", lambda: {"avx2", "avx512_vnni"})
    assert runtime.cpu_int8_dot_product()


def test_peak_memory_sees_an_allocation():
    with PeakMemory() as mem:
        x = torch.ones(64 * 2**20 // 4)  # 64 MiB
        x += 1
        import time
        time.sleep(0.05)
    del x
    assert mem.peak_mb > 32


def test_bench_model_reports_everything(monkeypatch):
    monkeypatch.setattr("dermfusion.bench.runner.native_bf16", lambda device: True)  # run bf16 even where emulated
    model = tiny_trimodal()
    batches = [tiny_batch(model, 2, seed=s) for s in range(3)]
    res = bench_model(model, backends=["bf16", "int8", "no_such_backend"], batch_sizes=[1, 2], eval_batches=batches,
                      repeats=3, rates={"fp32": 100.0, "bf16": 200.0, "int8": 400.0})
    assert list(res["backends"]) == ["fp32", "bf16", "int8", "no_such_backend"]  # fp32 first: the reference
    assert not res["backends"]["no_such_backend"]["ok"]
    for name in ("fp32", "bf16", "int8"):
        rec = res["backends"][name]
        assert rec["ok"], rec
        assert rec["accuracy"]["n"] == 6 and rec["accuracy"]["argmax_agreement"] >= 0.8
        for bs in ("1", "2"):
            st = rec["batches"][bs]
            for key in ("p50_ms", "p95_ms", "lesions_per_s", "peak_mem_mb", "encoders_ms", "fusion_ms", "floor_ms",
                        "x_floor", "speedup"):
                assert key in st, (name, bs, key)
            assert st["encoders_ms"] <= st["p50_ms"] * 1.5
    assert res["backends"]["fp32"]["batches"]["1"]["speedup"] == pytest.approx(1.0)
    from dermfusion.bench.core import BACKEND_PRECISION, floor_ms

    for bs in ("1", "2"):  # the lowest floor of every known backend's precision mix, run or not, bounds the speed-up
        ceiling, floors = res["ceiling"][bs], [res["backends"][b]["batches"][bs]["floor_ms"] for b in ("fp32", "bf16", "int8")]
        every = [floor_ms(res["flops"], res["matmul_gflops"], b, int(bs)) for b in BACKEND_PRECISION]
        assert ceiling["floor_ms"] == pytest.approx(min(f for f in every if f))
        assert ceiling["floor_ms"] <= min(floors) * 1.0001
        assert ceiling["floor_ms"] < floors[0]
        assert ceiling["max_speedup"] == pytest.approx(res["backends"]["fp32"]["batches"][bs]["p50_ms"] / ceiling["floor_ms"])
    md = markdown(res)
    assert "| bf16 | 2 |" in md and "failed" in md and "speed-up ceiling over fp32 eager" in md


def test_bench_skips_emulated_bf16_with_a_reason(monkeypatch):
    monkeypatch.setattr("dermfusion.bench.runner.native_bf16", lambda device: False)
    model = tiny_trimodal()
    res = bench_model(model, backends=["bf16", "autocast", "int8"], batch_sizes=[1], repeats=2,
                      rates={"fp32": 100.0, "bf16": 0.9, "int8": 150.0})
    for name in ("bf16", "autocast"):
        rec = res["backends"][name]
        assert not rec["ok"] and rec["error"].startswith("skipped: this CPU has no bf16 units") and "batches" not in rec
    assert res["backends"]["int8"]["ok"] and res["backends"]["fp32"]["ok"]
    assert "| bf16 | — | skipped: this CPU has no bf16 units" in markdown(res)
    import io

    from rich.console import Console

    from dermfusion.bench import print_result

    buf = io.StringIO()  # not a terminal (a pipe, a log file): the table keeps its columns readable
    print_result(res, Console(file=buf, width=80))
    out = buf.getvalue()
    assert "argmax agree" in out and "lesions/s" in out and "speed-up" in out
    assert "\nbf16: skipped: this CPU has no bf16 units" in out  # the reason below the table, not in a cell


@pytest.mark.parametrize("bf16_units", [True, False])
def test_compile_uses_bf16_only_where_the_cpu_has_bf16_units(monkeypatch, bf16_units):
    from dermfusion.inference.backends import prepare_backend

    seen = []

    class Eager(torch.nn.Module):  # stand-in for the inductor-compiled module: records the precision it runs under
        def __init__(self, module):
            super().__init__()
            self.module = module

        def forward(self, batch):
            seen.append(torch.is_autocast_enabled("cpu"))
            return self.module(batch)

    def fake_compile(module, **kw):
        return Eager(module)

    monkeypatch.setattr("dermfusion.inference.backends.eager.native_bf16", lambda device: bf16_units)
    monkeypatch.setattr(torch, "compile", fake_compile)
    model = tiny_trimodal()
    runner = prepare_backend(model, "compile", sample_batch=tiny_batch(model, 2, seed=0))
    assert runner.info["precision"] == ("bf16 GEMMs" if bf16_units else "fp32")
    assert seen == [bf16_units]


@pytest.mark.slow
def test_bench_cli_on_config(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    monkeypatch.setattr("dermfusion.bench.runner.native_bf16", lambda device: True)
    from dermfusion.cli import app

    out = tmp_path / "bench.json"
    res = CliRunner().invoke(app, ["bench", "tiny_cpu", "--batch-sizes", "1,2", "--backends", "fp32,bf16",
                                   "--accuracy-n", "4", "--repeats", "2", "--threads", "1", "--json", str(out),
                                   "--markdown"])
    assert res.exit_code == 0, res.output
    data = json.loads(out.read_text())
    assert data["backends"]["bf16"]["ok"] and data["accuracy_lesions"] == 4
    assert data["matmul_gflops"]["fp32"] > 0 and data["preprocess"]["per_lesion_ms"] > 0
    assert "| backend | batch |" in res.output
    rows = [ln for ln in res.output.splitlines() if ln.startswith("| fp32 |")]  # unwrapped: one line per row
    assert len(rows) == 2 and all(ln.count("|") == len(COLUMNS) + 1 for ln in rows), rows
    save_json(data, tmp_path / "again.json")
