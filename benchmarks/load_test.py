"""Bounded load test of the triage API: N requests at each concurrency level, against a local server.

    python benchmarks/load_test.py                       # tiny bundle, server started here
    python benchmarks/load_test.py --bundle runs/x/fold_0/bundle --requests 300 --concurrency 8,32
    python benchmarks/load_test.py --url http://127.0.0.1:8000 --api-key KEY   # an already running server

The server runs in a separate process (``uvicorn --factory dermfusion.service.app:app_from_env``) so the
client does not compete with it for the GIL. Each request uploads one of the committed fixture images
(dermoscopic) with random valid metadata; ``--explain`` keeps heat maps on (the default, as the web
page uses them). Reported per level: status counts, timeouts, latency p50/p95/p99 (all answers and
200s only), throughput, and the server's own analysis time.

Pass criteria (exit 1 otherwise): no client timeouts, no connection errors, no 5xx other than 503 —
i.e. overload must be answered quickly with 503 + Retry-After, never by letting requests hang.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import httpx
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
FIXTURE = ROOT / "src" / "dermfusion" / "fixtures" / "ham10000_sample"
SITES = ["head_neck_face", "trunk", "upper_extremity", "lower_extremity", "hand", "foot", "acral", "genital"]


def tiny_bundle(workdir: Path) -> Path:
    """Build the tiny_cpu test bundle (same helper as the tests)."""
    sys.path.insert(0, str(ROOT / "tests"))
    from service_fixtures import build_tiny_bundle  # noqa: E402

    from dermfusion.data.folds import assign_folds
    from dermfusion.data.importers import import_isic
    from dermfusion.tasks import ISIC2018

    df = assign_folds(import_isic(FIXTURE / "train.csv", FIXTURE / "images", ISIC2018, dataset="bench"), ISIC2018,
                      k=2, seed=0)
    return build_tiny_bundle(workdir, df)


def start_server(bundle: Path, port: int, config: Path, log: Path) -> subprocess.Popen:
    env = {**os.environ, "DERMFUSION_BUNDLE": str(bundle), "DERMFUSION_SERVICE_CONFIG": str(config)}
    cmd = [sys.executable, "-m", "uvicorn", "dermfusion.service.app:app_from_env", "--factory", "--host", "127.0.0.1",
           "--port", str(port), "--log-level", "warning", "--no-access-log", "--timeout-keep-alive", "5",
           "--limit-concurrency", "512"]
    return subprocess.Popen(cmd, env=env, stdout=open(log, "w"), stderr=subprocess.STDOUT)


def wait_ready(url: str, proc: subprocess.Popen | None, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"server exited with code {proc.returncode}")
        try:
            if httpx.get(url + "/readyz", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise RuntimeError("server not ready in time")


def pct(values, q) -> float | None:
    return float(np.percentile(values, q)) if len(values) else None


async def run_level(url: str, n: int, concurrency: int, images: list[bytes], api_key: str | None, explain: bool,
                    timeout: float, seed: int, retry: bool = False, max_retries: int = 5, max_wait: float = 1.0) -> dict:
    rng = random.Random(seed)
    jobs = []
    for i in range(n):
        meta = {"age": rng.randint(18, 90), "sex": rng.choice(["female", "male"]), "site": rng.choice(SITES)}
        if rng.random() < 0.5:
            meta["skin_tone"] = rng.randint(0, 5)
        jobs.append((images[i % len(images)], meta))
    headers = {"X-API-Key": api_key} if api_key else {}
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    results: list[dict] = []
    queue: asyncio.Queue = asyncio.Queue()
    for j in jobs:
        queue.put_nowait(j)

    async def worker(client: httpx.AsyncClient):
        while True:
            try:
                data, meta = queue.get_nowait()
            except asyncio.QueueEmpty:
                return
            t = time.perf_counter()
            rec = {"status": None, "error": None, "retries": 0}
            try:
                r = await post(client, data, meta)
                while retry and r.status_code == 503 and rec["retries"] < max_retries:
                    rec["retries"] += 1
                    await asyncio.sleep(min(float(r.headers.get("retry-after", "1")), max_wait))
                    r = await post(client, data, meta)
                rec["status"] = r.status_code
                if r.status_code == 200:
                    rec["timings"] = r.json()["timings_ms"]
                    rec["server_ms"] = rec["timings"].get("analysis_ms")
                    rec["queue_ms"] = rec["timings"].get("queue_ms")
                elif r.status_code == 503:
                    rec["retry_after"] = r.headers.get("retry-after")
            except httpx.TimeoutException:
                rec["error"] = "timeout"
            except httpx.HTTPError as e:
                rec["error"] = type(e).__name__
            rec["latency_s"] = time.perf_counter() - t
            results.append(rec)

    async def post(client, data, meta):
        return await client.post(f"{url}/v1/analyze?explain={'true' if explain else 'false'}", headers=headers,
                                 files={"dermoscopic": ("lesion.jpg", data, "image/jpeg")},
                                 data={"metadata": json.dumps(meta)})

    async with httpx.AsyncClient(timeout=timeout, limits=limits) as client:
        t0 = time.perf_counter()
        await asyncio.gather(*(worker(client) for _ in range(concurrency)))
        wall = time.perf_counter() - t0
    statuses = Counter(r["status"] for r in results if r["status"] is not None)
    errors = Counter(r["error"] for r in results if r["error"])
    lat_all = [r["latency_s"] * 1000 for r in results if r["status"] is not None]
    lat_ok = [r["latency_s"] * 1000 for r in results if r["status"] == 200]
    lat_503 = [r["latency_s"] * 1000 for r in results if r["status"] == 503]
    server = [r["server_ms"] for r in results if r.get("server_ms") is not None]
    ok = statuses.get(200, 0)
    return {
        "concurrency": concurrency, "requests": n, "wall_s": round(wall, 2), "retry_503": retry,
        "retries": sum(r["retries"] for r in results),
        "status_counts": {str(k): v for k, v in sorted(statuses.items())}, "client_errors": dict(errors),
        "ok": ok, "rejected_503": statuses.get(503, 0),
        "other_4xx": sum(v for k, v in statuses.items() if 400 <= k < 500),
        "other_5xx": sum(v for k, v in statuses.items() if k >= 500 and k != 503),
        "timeouts": errors.get("timeout", 0),
        "throughput_ok_per_s": round(ok / wall, 2) if wall else None,
        "throughput_all_per_s": round(len(results) / wall, 2) if wall else None,
        "latency_ms_all": {f"p{q}": _r(pct(lat_all, q)) for q in (50, 95, 99)},
        "latency_ms_ok": {f"p{q}": _r(pct(lat_ok, q)) for q in (50, 95, 99)},
        "latency_ms_503": {f"p{q}": _r(pct(lat_503, q)) for q in (50, 99)},
        "server_analysis_ms_p50": _r(pct(server, 50)),
        "server_steps_ms_p50": {k: _r(pct([r["timings"][k] for r in results if k in r.get("timings", {})], 50))
                                for k in sorted({k for r in results for k in r.get("timings", {})})},
    }


def _r(x):
    return None if x is None else round(x, 1)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bundle", type=Path, help="bundle to serve (default: build the tiny test bundle)")
    ap.add_argument("--url", help="test an already running server instead of starting one")
    ap.add_argument("--api-key")
    ap.add_argument("--requests", type=int, default=300)
    ap.add_argument("--concurrency", default="8,32", help="comma-separated levels")
    ap.add_argument("--workers", type=int, default=2, help="server workers (when started here)")
    ap.add_argument("--queue", type=int, default=16, help="server queue size (when started here)")
    ap.add_argument("--torch-threads", type=int, default=1, help="torch threads per analysis (server started here)")
    ap.add_argument("--explain", action=argparse.BooleanOptionalAction, default=True)
    ap.add_argument("--timeout", type=float, default=30.0, help="client timeout per request (s)")
    ap.add_argument("--warmup", type=int, default=10, help="sequential requests before measuring")
    ap.add_argument("--retry", action="store_true",
                    help="clients honour 503 Retry-After (sleep ≤ --max-wait s, ≤ 5 retries) instead of counting it")
    ap.add_argument("--max-wait", type=float, default=1.0)
    ap.add_argument("--json", type=Path, help="write the results here")
    ap.add_argument("--images", type=Path, help="folder of .jpg images to upload (default: the committed 96 px "
                    "fixture images; use real full-size dermoscopic images for a realistic decode / gate cost)")
    ap.add_argument("--backend", default="auto", help="server inference backend (when started here)")
    args = ap.parse_args(argv)

    images = [p.read_bytes() for p in sorted((args.images or FIXTURE / "images").glob("*.jpg"))][:200]
    tmp = Path(tempfile.mkdtemp(prefix="dermfusion-load-"))
    proc = None
    url = args.url
    setup = {}
    try:
        if url is None:
            bundle = args.bundle or tiny_bundle(tmp)
            cfg = tmp / "service.yaml"
            cfg.write_text(json.dumps({
                "workers": {"workers": args.workers, "queue_size": args.queue, "queue_timeout_s": 20,
                            **({"torch_threads": args.torch_threads} if args.torch_threads else {})},
                "audit": {"db_url": f"sqlite:///{tmp}/audit.db"}, "backend": args.backend}))
            from socket import socket
            with socket() as s:
                s.bind(("127.0.0.1", 0))
                port = s.getsockname()[1]
            proc = start_server(bundle, port, cfg, tmp / "server.log")
            url = f"http://127.0.0.1:{port}"
            setup = {"bundle": str(bundle), "workers": args.workers, "queue_size": args.queue,
                     "torch_threads": args.torch_threads, "backend": args.backend,
                     "images": str(args.images or "fixture")}
        wait_ready(url, proc)
        headers = {"X-API-Key": args.api_key} if args.api_key else {}
        for i in range(args.warmup):
            httpx.post(url + "/v1/analyze", headers=headers, timeout=args.timeout,
                       files={"dermoscopic": ("w.jpg", images[i % len(images)], "image/jpeg")})
        levels = [int(c) for c in args.concurrency.split(",") if c.strip()]
        report = {"setup": {**setup, "url": url, "requests_per_level": args.requests, "explain": args.explain,
                            "cpus": os.cpu_count(), "python": sys.version.split()[0]}, "levels": []}
        for i, c in enumerate(levels):
            res = asyncio.run(run_level(url, args.requests, c, images, args.api_key, args.explain, args.timeout,
                                        seed=i, retry=args.retry, max_wait=args.max_wait))
            report["levels"].append(res)
            print(f"concurrency {c:>3}{' (retrying 503s)' if args.retry else ''}: {res['ok']}/{res['requests']} ok, "
                  f"{res['rejected_503']} × 503 ({res['retries']} retries), "
                  f"{res['other_4xx']} other 4xx, {res['other_5xx']} other 5xx, {res['timeouts']} timeouts · "
                  f"latency p50/p95/p99 {res['latency_ms_all']['p50']}/{res['latency_ms_all']['p95']}/"
                  f"{res['latency_ms_all']['p99']} ms (200s: {res['latency_ms_ok']['p50']}/"
                  f"{res['latency_ms_ok']['p95']}/{res['latency_ms_ok']['p99']}) · "
                  f"{res['throughput_ok_per_s']} analyses/s · server analysis p50 {res['server_analysis_ms_p50']} ms\n"
                  f"    server steps p50 (ms): " + ", ".join(f"{k} {v}" for k, v in res["server_steps_ms_p50"].items()),
                  flush=True)
        metrics = httpx.get(url + "/metrics", timeout=10).text
        report["server_rejections"] = {line.split("{")[1].split("}")[0]: float(line.split()[-1])
                                       for line in metrics.splitlines() if line.startswith("dermfusion_rejected_total{")}
        ok = all(r["timeouts"] == 0 and r["other_5xx"] == 0 and not r["client_errors"] for r in report["levels"])
        report["passed"] = ok
        if args.json:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps(report, indent=2))
        print("PASS: no timeouts, no 5xx other than 503" if ok else "FAIL: timeouts or unexpected errors", flush=True)
        return 0 if ok else 1
    finally:
        if proc is not None:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()


if __name__ == "__main__":
    sys.exit(main())
