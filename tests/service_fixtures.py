"""Shared fixtures for the service / explain / audit / web tests (import them into a test module).

    from service_fixtures import tiny_bundle, tiny_predictor, fixture_image_bytes  # noqa: F401
"""
from __future__ import annotations

import io
import os
import shutil
import socket
import subprocess
import tempfile
import threading
import time
import warnings
from pathlib import Path

import pytest
from PIL import Image

FIXTURE = Path(__file__).resolve().parents[1] / "src" / "dermfusion" / "fixtures" / "ham10000_sample"
PG_BIN = Path("/usr/lib/postgresql/15/bin")


def build_tiny_bundle(out: Path, df, overrides: list[str] | tuple[str, ...] = ()) -> Path:
    """A tiny_cpu bundle for the fixture manifest: train_cv (1 epoch, fold 0) when the training stack is
    complete, else the untrained model written with write_bundle exactly as FoldTrainer does."""
    import torch
    from safetensors.torch import save_file

    from dermfusion.config import load_config
    from dermfusion.bundle import write_bundle
    from dermfusion.tasks import get_task
    from dermfusion.models.factory import build_model, feature_spec_for, preprocess_of

    cfg = load_config("tiny_cpu", ["train.epochs=1", "train.device=cpu", *overrides])
    try:
        from dermfusion.evaluation import calibration, metrics  # noqa: F401
        from dermfusion.training.cv import train_cv

        train_cv(cfg, df, out, folds="0")
        bundle = out / "fold_0" / "bundle"
        if (bundle / "HASH").exists():
            return bundle
    except Exception as e:  # noqa: BLE001 — training stack still in progress: fall back
        warnings.warn(f"train_cv unavailable ({type(e).__name__}: {e}); using an untrained tiny bundle")
    task = get_task(cfg.task)
    spec = feature_spec_for(cfg, task, df)
    torch.manual_seed(0)
    model = build_model(cfg, task, spec).eval()
    pre = preprocess_of(model, spec)
    config = {"kind": "network", "task": task.name, "name": f"{cfg.name}_test",
              "model": {"name": cfg.model.name, **cfg.model_kwargs()}, "feature_spec": spec.to_dict(),
              "preprocess": {m: p.to_dict() for m, p in pre.items()}, "experiment": cfg.model_dump(), "fold": 0}
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    return write_bundle(out / "bundle", config=config, metrics={},
                        write_model=lambda d: save_file(state, str(d / "model.safetensors"))).path


def build_concept_bundle(out: Path, df, columns) -> Path:
    """A tiny_cpu bundle trained with supplied MILK10k-style concept scores (uniform at random, seed 0) in
    ``columns``; checks that the model really reads exactly those columns."""
    import numpy as np
    import yaml

    df = df.copy()
    rng = np.random.default_rng(0)
    for c in columns:
        df[c] = rng.uniform(0, 1, len(df))
    bundle = build_tiny_bundle(out, df)
    spec = yaml.safe_load((bundle / "config.yaml").read_text())["feature_spec"]
    assert sorted(spec["concepts"]) == sorted(columns), spec  # the model uses the supplied scores
    return bundle


# Fixtures imported into several test modules become one fixture *per module*; this memo makes the
# expensive ones (bundle, loaded model) really once per session.
_SHARED: dict = {}


@pytest.fixture(scope="session")
def tiny_bundle(tmp_path_factory, ham_sample) -> Path:
    if "bundle" not in _SHARED:
        from dermfusion.inference import load_predictor
        from dermfusion.evaluation.drift_reference import compute_reference_stats, write_reference_stats

        bundle = build_tiny_bundle(tmp_path_factory.mktemp("svc_bundle"), ham_sample)
        write_reference_stats(bundle, compute_reference_stats(load_predictor(bundle), ham_sample))
        _SHARED["bundle"] = bundle
    return _SHARED["bundle"]


@pytest.fixture(scope="session")
def tiny_predictor(tiny_bundle):
    if "predictor" not in _SHARED:
        from dermfusion.inference import load_predictor

        _SHARED["predictor"] = load_predictor(tiny_bundle)
    return _SHARED["predictor"]


@pytest.fixture(scope="session")
def fixture_images() -> list[Path]:
    return sorted((FIXTURE / "images").glob("*.jpg"))


@pytest.fixture(scope="session")
def fixture_image_bytes(fixture_images) -> bytes:
    return fixture_images[0].read_bytes()


def jpeg_bytes(img: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    img.convert("RGB").save(buf, format="JPEG", **kw)
    return buf.getvalue()


def png_bytes(img: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG", **kw)
    return buf.getvalue()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerThread:
    """A real uvicorn server on a free loopback port, in a background thread (``options``: uvicorn settings, e.g.
    ``service.app.server_options(config)`` — what ``dermfusion serve`` uses)."""

    def __init__(self, app, port: int | None = None, **options):
        import uvicorn

        self.port = port or free_port()
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning",
                                                    lifespan="on", **{"timeout_keep_alive": 5, **options}))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self):
        import httpx

        self.thread.start()
        deadline = time.time() + 60
        while time.time() < deadline:
            try:
                if httpx.get(self.url + "/readyz", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            if not self.thread.is_alive():
                raise RuntimeError("uvicorn server thread died during startup")
            time.sleep(0.1)
        raise RuntimeError("server did not become ready in 60 s")

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(timeout=10)


# -------------------------------------------------------------------------------------- PostgreSQL
def _as_postgres(cmd: list[str]) -> list[str]:
    if os.geteuid() != 0:
        return cmd
    if shutil.which("runuser"):
        return ["runuser", "-u", "postgres", "--", *cmd]
    import shlex
    return ["su", "postgres", "-c", shlex.join(cmd)]


@pytest.fixture(scope="session")
def postgres_url():
    """A throwaway PostgreSQL cluster (initdb + pg_ctl on a temp dir, free loopback port)."""
    initdb, pg_ctl = PG_BIN / "initdb", PG_BIN / "pg_ctl"
    if not initdb.exists() or not pg_ctl.exists():
        found = shutil.which("initdb"), shutil.which("pg_ctl")
        if not all(found):
            pytest.skip("PostgreSQL server binaries (initdb, pg_ctl) not installed "
                        "(Debian: apt-get install postgresql)")
        initdb, pg_ctl = Path(found[0]), Path(found[1])
    try:
        import psycopg2  # noqa: F401
    except ImportError:
        pytest.skip("psycopg2 not installed (pip install psycopg2-binary)")
    if os.geteuid() == 0:
        try:
            import pwd
            pw = pwd.getpwnam("postgres")
        except KeyError:
            pytest.skip("running as root but there is no 'postgres' user to run the server as")
    root = Path(tempfile.mkdtemp(prefix="dermfusion-pg-"))
    data, sock = root / "data", root / "sock"
    sock.mkdir()
    if os.geteuid() == 0:
        for p in (root, sock):
            os.chown(p, pw.pw_uid, pw.pw_gid)
    port = free_port()
    env = {**os.environ, "LC_ALL": "C"}
    subprocess.run(_as_postgres([str(initdb), "-D", str(data), "-U", "postgres", "--auth=trust", "-E", "UTF8",
                                 "--no-sync"]), check=True, capture_output=True, env=env, timeout=120)
    opts = f"-p {port} -k {sock} -c listen_addresses=127.0.0.1 -c fsync=off -c full_page_writes=off"
    subprocess.run(_as_postgres([str(pg_ctl), "-D", str(data), "-o", opts, "-l", str(root / "log.txt"), "-w",
                                 "-t", "60", "start"]), check=True, capture_output=True, env=env, timeout=90)
    try:
        yield f"postgresql+psycopg2://postgres@127.0.0.1:{port}/postgres"
    finally:
        subprocess.run(_as_postgres([str(pg_ctl), "-D", str(data), "-m", "immediate", "-w", "stop"]),
                       capture_output=True, env=env, timeout=60)
        shutil.rmtree(root, ignore_errors=True)
