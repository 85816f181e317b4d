"""Benchmark one network across inference backends and batch sizes.

``bench_model`` measures, per backend: latency p50/p95 per batch size, lesions/s, peak memory,
the encoders' and the fusion's share of each call, the floor (FLOPs at the machine's measured
matmul rate for that backend's precision) and the agreement of its probabilities with fp32 eager on
real (or, lacking them, synthetic) lesions. Preprocessing (decode + resize + normalise) is timed
separately per lesion. The result is a JSON-able dict; ``report`` renders it.
"""
from __future__ import annotations

import gc
import time
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd
import torch
from torch import nn

from ..clinical.lesion import METADATA_FIELDS, lesions_from_manifest
from ..data.dataset import batch_from_lesions
from ..data.images import load_rgb_array
from ..data.transforms import eval_transform
from ..export.onnx import synthetic_batch
from ..inference.backends import BackendError, compare_probs, prepare_backend
from ..runtime.device import move_batch, native_bf16
from .core import BACKEND_PRECISION, count_flops, floor_ms, machine_info, matmul_rates
from .timing import PartTimer, PeakMemory, latency_stats, timed_calls


# ------------------------------------------------------------------------------------------ inputs
def lesion_frame(image_paths: Sequence[str | Path], modalities: Sequence[str], metadata: pd.DataFrame | None = None
                 ) -> pd.DataFrame:
    """A manifest-like frame: every modality gets the same image (single-image datasets such as HAM10000
    stand in for both views — speed is identical, and agreement is still checked on real pixels)."""
    rows = []
    meta = metadata.reset_index(drop=True) if metadata is not None else None
    for i, p in enumerate(image_paths):
        row = {"lesion_id": Path(p).stem, "age": np.nan, "sex": "", "skin_tone": "", "site": ""}
        if meta is not None and i < len(meta):
            row.update({k: meta.loc[i, k] for k in ("age", "sex", "skin_tone", "site") if k in meta.columns})
        for m in ("clinical", "dermoscopic"):
            row[f"image_{m}"] = str(p) if m in modalities else ""
        rows.append(row)
    return pd.DataFrame(rows)


def real_batches(model: nn.Module, frame: pd.DataFrame, preprocess: dict, batch_size: int,
                 task: str = "isic2018", drop_last: bool = True) -> list[dict]:
    """Batches through the clinical engine's input path (``clinical.lesion``: the safe decoder; ``data.dataset
    .batch_from_lesions``: the one evaluation transform, presence masks) — what ``predict`` and the service feed
    a network."""
    spec = model.feature_spec
    extra = [f for f in list(spec.numeric) + list(spec.categorical) if f not in METADATA_FIELDS]
    out = []
    for lesions in lesions_from_manifest(frame, spec.modalities, batch_size, extra):
        if drop_last and len(lesions) < batch_size:
            break
        out.append(batch_from_lesions([les.images for les in lesions], [les.metadata for les in lesions], spec,
                                      preprocess, [les.lesion_id for les in lesions]))
    return out


def time_preprocessing(image_paths: Sequence[str | Path], preprocess: dict, n: int = 16) -> dict:
    """Milliseconds per image for decode + resize + normalise (one process, no workers), per modality."""
    paths = list(image_paths)[:n]
    out = {}
    for m, pre in preprocess.items():
        tf = eval_transform(pre)
        t0 = time.perf_counter()
        for p in paths:
            arr = np.array(load_rgb_array(str(p), None, size=pre.eval_resize, interpolation=pre.interpolation))
            tf(torch.from_numpy(arr).permute(2, 0, 1))
        out[m] = (time.perf_counter() - t0) * 1000 / max(1, len(paths))
    return {"per_modality_ms": out, "per_lesion_ms": float(sum(out.values())), "n_images": len(paths)}


def _slice(batches: list[dict], n: int) -> dict | None:
    """The first ``n`` lesions of ``batches`` as one batch (None if there are fewer)."""
    rows, out = 0, []
    for b in batches:
        out.append(b)
        rows += int(b["image_present"].shape[0])
        if rows >= n:
            break
    if rows < n:
        return None
    def cat(key_vals):
        return torch.cat(key_vals)[:n]

    first = out[0]
    merged = {"images": {m: cat([b["images"][m] for b in out]) for m in first["images"]},
              "lesion_id": sum((list(b["lesion_id"]) for b in out), [])[:n]}
    for k, v in first.items():
        if k not in merged and isinstance(v, torch.Tensor):
            merged[k] = cat([b[k] for b in out])
    return merged


def _to_device(batch: dict, device: torch.device) -> dict:
    return move_batch(batch, device)


# ------------------------------------------------------------------------------------------ bench
DEFAULT_BACKENDS = ("fp32", "bf16", "autocast", "int8", "onnx", "onnx-int8")  # what predict / the service choose from
EMULATED_BF16 = {"bf16", "autocast"}  # skipped on a CPU without bf16 units: a ViT-B pair call would take minutes


def bench_model(model: nn.Module, *, backends: Sequence[str] = DEFAULT_BACKENDS, batch_sizes: Sequence[int] = (1, 8, 32),
                device: str | torch.device = "cpu", eval_batches: list[dict] | None = None,
                repeats: int | dict = 10, budget_s: float = 20.0, image_paths: Sequence[str | Path] | None = None,
                preprocess: dict | None = None, name: str | None = None, rates: dict | None = None,
                backend_options: dict | None = None, eval_limit: dict | None = None, log=None) -> dict:
    """Benchmark ``model`` (fp32, eval) on each backend. See the module doc for what is measured.

    ``eval_batches``: batches (ideally real lesions) for the accuracy check vs fp32; when their size
    equals a benchmarked batch size, the accuracy pass doubles as that size's latency samples.
    ``repeats``: calls per batch size (int, or {batch_size: n}); each measurement also stops after
    ``budget_s`` seconds. ``rates``: precomputed matmul rates (measured here when None).
    ``eval_limit``: {backend: number of eval batches} to check slow backends on fewer lesions.
    """
    device = torch.device(device)
    log = log or (lambda *a: None)
    backends = ["fp32", *[b for b in backends if b != "fp32"]]  # fp32 eager first: the reference
    model = model.float().eval().to(device)

    result = {"name": name or getattr(model, "model_name", type(model).__name__), "machine": machine_info(device),
              "batch_sizes": list(batch_sizes), "backends": {}}
    result["encoders"] = {k: getattr(e, "name", type(e).__name__) for k, e in getattr(model, "encoders", {}).items()}
    result["params_m"] = sum(p.numel() for p in model.parameters()) / 1e6
    log("measuring matmul rates")
    result["matmul_gflops"] = rates if rates is not None else matmul_rates(device)
    flops = count_flops(model, _to_device(synthetic_batch(model, 1, seed=0, missing_image=False), device))
    result["flops"] = flops
    if image_paths and preprocess:
        result["preprocess"] = time_preprocessing(image_paths, preprocess)

    eval_batches = [_to_device(b, device) for b in (eval_batches or [])]
    eval_size = int(eval_batches[0]["image_present"].shape[0]) if eval_batches else None
    if eval_batches and any(int(b["image_present"].shape[0]) != eval_size for b in eval_batches):
        raise ValueError("eval_batches must all have the same size")
    timing = {}
    for bs in batch_sizes:
        batch = _slice(eval_batches, bs) if eval_batches else None
        timing[bs] = batch if batch is not None else _to_device(synthetic_batch(model, bs, seed=bs, missing_image=False),
                                                                device)
    n_rep = (lambda bs: repeats.get(bs, 3)) if isinstance(repeats, dict) else (lambda bs: repeats)

    reference = None
    for backend in backends:
        rec: dict = {"ok": False}
        result["backends"][backend] = rec
        if backend in EMULATED_BF16 and device.type == "cpu" and not native_bf16(device):
            rec["error"] = ("skipped: this CPU has no bf16 units (AMX / AVX-512 BF16); emulated bf16 ran at "
                            f"{result['matmul_gflops'].get('bf16') or 0:.1f} GFLOP/s vs fp32 "
                            f"{result['matmul_gflops'].get('fp32') or 0:.0f}")
            log(f"{backend}: {rec['error']}")
            continue
        log(f"{backend}: preparing")
        try:
            t0 = time.perf_counter()
            opts = dict((backend_options or {}).get(backend, {}))
            sample = timing[batch_sizes[0]] if backend == "compile" else \
                eval_batches[0] if backend == "onnx-qdq" and eval_batches else None  # qdq: calibration fallback
            runner = prepare_backend(model, backend, device=device, sample_batch=sample, **opts)
            rec["prepare_s"] = round(time.perf_counter() - t0, 2)
            rec["info"] = {k: v for k, v in runner.info.items() if k != "onnx_path"}
            timer = PartTimer(runner.module if backend not in {"compile", "onnx", "onnx-qdq"} else None, device)
            rec["batches"] = {}
            eval_times: list[float] = []
            eval_encs: list[float] = []
            mine = eval_batches[: (eval_limit or {}).get(backend, len(eval_batches))] if eval_batches else []
            if mine:
                log(f"{backend}: accuracy pass over {len(mine) * eval_size} lesions")
                runner(mine[0])  # warm-up (and compile, for shape-specialised backends)
                probs = []
                with timer, PeakMemory(device) as mem:
                    for b in mine:
                        tt, ee = timed_calls(lambda b=b: probs.append(runner.predict_proba(b).cpu().numpy()), 1,
                                             device, part_timer=timer)
                        eval_times += tt
                        eval_encs += ee
                probs = np.concatenate(probs)
                if backend == "fp32":
                    reference = probs
                    top2 = np.sort(probs, 1)[:, -2:]
                    # how close the model's own decisions are: near-ties flip on any rounding
                    result["fp32_top1_top2_gap"] = {q: float(np.quantile(top2[:, 1] - top2[:, 0], float(q)))
                                                    for q in ("0.05", "0.5")}
                rec["accuracy"] = compare_probs(reference[: len(probs)], probs) if reference is not None else None
                rec["eval_peak_mem_mb"] = mem.peak_mb
            for bs in batch_sizes:
                if mine and bs == eval_size and len(eval_times) >= min(3, n_rep(bs)):
                    totals, encs, peak = eval_times, eval_encs, rec["eval_peak_mem_mb"]
                else:
                    log(f"{backend}: batch {bs}")
                    batch = timing[bs]
                    runner(batch)  # warm-up
                    with timer, PeakMemory(device) as mem:
                        totals, encs = timed_calls(lambda batch=batch: runner(batch), n_rep(bs), device, budget_s,
                                                   part_timer=timer)
                    peak = mem.peak_mb
                st = latency_stats(totals)
                st["lesions_per_s"] = bs / (st["p50_ms"] / 1000)
                st["peak_mem_mb"] = peak
                if encs:
                    st["encoders_ms"] = float(np.median(encs))
                    st["fusion_ms"] = float(np.median(np.asarray(totals) - np.asarray(encs)))
                fl = floor_ms(flops, result["matmul_gflops"],  # compile runs fp32 where bf16 is emulated
                              "fp32" if rec["info"].get("precision") == "fp32" else backend, bs)
                st["floor_ms"] = fl
                st["x_floor"] = st["p50_ms"] / fl if fl else None
                rec["batches"][str(bs)] = st
            rec["ok"] = True
            del runner
        except (BackendError, Exception) as e:  # noqa: BLE001 — one failing backend must not end the benchmark
            rec["error"] = f"{type(e).__name__}: {str(e)[:400]}"
            log(f"{backend}: failed: {rec['error']}")
        gc.collect()

    base = result["backends"].get("fp32", {}).get("batches", {})
    for backend, rec in result["backends"].items():
        for bs, st in rec.get("batches", {}).items():
            if bs in base:
                st["speedup"] = base[bs]["p50_ms"] / st["p50_ms"]
    if eval_batches:
        result["accuracy_lesions"] = len(eval_batches) * eval_size
    result["ceiling"] = speedup_ceiling(result)
    return result


def speedup_ceiling(result: dict) -> dict:
    """Per batch size, the most any backend could gain over fp32 eager on this machine: fp32 eager's time
    over the lowest floor among the known backends' precision mixes (``BACKEND_PRECISION``), whether or not
    they were run. A floor puts every FLOP at the measured matmul rate of its precision, a lower bound on time
    as far as the probe finds the machine's fastest kernels; so this bounds the speed-up from above, and a
    target above it is out of reach for every backend on this machine."""
    base = result["backends"].get("fp32", {}).get("batches", {})
    out = {}
    for bs, st in base.items():
        floors = {b: floor_ms(result["flops"], result["matmul_gflops"], b, int(bs)) for b in BACKEND_PRECISION}
        floors = {b: f for b, f in floors.items() if f}
        if not floors:
            continue
        best = min(floors, key=floors.get)
        out[bs] = {"max_speedup": st["p50_ms"] / floors[best], "floor_ms": floors[best], "backend": best}
    return out


def best_backend(result: dict, batch_size: int, min_agreement: float = 0.99, max_prob_diff: float | None = None
                 ) -> str | None:
    """The fastest backend at ``batch_size`` that passed the accuracy check."""
    best, best_ms = None, float("inf")
    for name, rec in result["backends"].items():
        st = rec.get("batches", {}).get(str(batch_size))
        acc = rec.get("accuracy")
        if not st:
            continue
        if acc is not None and (acc["argmax_agreement"] < min_agreement
                                or (max_prob_diff is not None and acc["max_prob_diff"] > max_prob_diff)):
            continue
        if st["p50_ms"] < best_ms:
            best, best_ms = name, st["p50_ms"]
    return best
