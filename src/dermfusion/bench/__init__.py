"""Inference benchmarks: latency, throughput, memory, the FLOP floor and accuracy per backend."""
from .core import count_flops, floor_ms, machine_info, matmul_rate, matmul_rates
from .report import markdown, print_result, save_json
from .runner import best_backend, bench_model, lesion_frame, real_batches, time_preprocessing

__all__ = ["count_flops", "floor_ms", "machine_info", "matmul_rate", "matmul_rates", "markdown", "print_result",
           "save_json", "best_backend", "bench_model", "lesion_frame", "real_batches", "time_preprocessing"]
