"""Experiment tracking with MLflow — optional (``pip install 'dermfusion[tracking]'``), off by default.

With ``tracking: {mlflow: true}`` in the experiment config, ``dermfusion train`` logs one MLflow run per training
run, after ``summary.json`` is written: the config as flat dotted parameters, every fold's validation metrics
(``fold_<k>.<metric>``) and the out-of-fold metrics (``oof.<metric>``), the out-of-fold figures (confusion matrix,
ROC, precision-recall, reliability, F1 per class — the evaluate report's), ``summary.json`` / ``oof*.csv`` and
every bundle directory as artifacts. The store is a local file store under the run directory
(``file:RUN/mlruns``) unless ``tracking.uri`` names another (``http://…``, ``sqlite:///…``): no network call unless
the user asks for one — MLflow's own usage telemetry is switched off unless the environment already decides.
"""
from __future__ import annotations

import json
import math
import os
import tempfile
from pathlib import Path

from .. import __version__
from ..config import ConfigError, ExperimentConfig
from ..data.manifest import targets
from ..evaluation.metrics import compute_metrics, reliability_bins

PARAM_MAX = 500  # MLflow caps a parameter value's length; longer values are cut with a marker


def check_tracking(cfg: ExperimentConfig) -> None:
    """Before training: tracking asked for but MLflow missing is a one-line error, not a crash after the run."""
    if not cfg.tracking.mlflow:
        return
    try:
        _mlflow()
    except ImportError:
        raise ConfigError("tracking.mlflow is true but mlflow is not installed: pip install 'dermfusion[tracking]' "
                          "(or set tracking.mlflow: false)") from None


def _mlflow():
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")  # no usage telemetry leaves the machine by default
    os.environ.setdefault("DO_NOT_TRACK", "true")
    import mlflow  # optional dependency (the [tracking] extra)
    return mlflow


def tracking_uri(cfg: ExperimentConfig, out: Path) -> str:
    return cfg.tracking.uri or (Path(out).resolve() / "mlruns").as_uri()


def flat(d, prefix: str = "") -> dict:
    """Nested dicts → {"a.b": value}; lists kept whole (as their JSON)."""
    out = {}
    for k, v in (d or {}).items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flat(v, key + "."))
        else:
            out[key] = v
    return out


def _params(cfg: ExperimentConfig) -> dict[str, str]:
    out = {}
    for k, v in flat(cfg.model_dump()).items():
        s = v if isinstance(v, str) else json.dumps(v, default=str)
        out[k] = s if len(s) <= PARAM_MAX else s[:PARAM_MAX - 1] + "…"
    return out


def _metrics(summary: dict) -> dict[str, float]:
    out = {}
    for fold, m in (summary.get("per_fold") or {}).items():
        out.update({f"fold_{fold}.{k}": v for k, v in flat(m).items()})
    out.update({f"oof.{k}": v for k, v in flat(summary.get("oof") or {}).items()})
    return {k.replace(" ", "_"): float(v) for k, v in out.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(float(v))}


def _figures(task, df, out: Path, into: Path) -> list[Path]:
    """The out-of-fold figures of the run (calibrated probabilities when written), as PNG files."""
    import base64

    import pandas as pd

    from ..evaluation.figures import all_figures  # matplotlib: loaded only when a run is tracked

    src = out / "oof_calibrated.csv" if (out / "oof_calibrated.csv").exists() else out / "oof.csv"
    if not src.exists():
        return []
    oof = pd.read_csv(src)
    lab = df.set_index("lesion_id").loc[oof["lesion_id"]].reset_index()
    y, p = targets(lab, task), oof[list(task.classes)].to_numpy()
    paths = []
    metrics = {**compute_metrics(task, y, p), "reliability": reliability_bins(y, p)}  # as the evaluate report
    for fig in all_figures(task, y, p, metrics, {}):
        path = into / f"oof_{fig.key}.png"
        path.write_bytes(base64.b64decode(fig.png_base64))
        paths.append(path)
    return paths


def log_run(cfg: ExperimentConfig, task, df, out: Path, summary: dict) -> str | None:
    """Log a finished training run; its MLflow run id (None when tracking is off)."""
    if not cfg.tracking.mlflow:
        return None
    mlflow = _mlflow()
    out = Path(out)
    if tracking_uri(cfg, out).startswith("file:"):
        # MLflow ≥ 3.x keeps its file store in maintenance mode and refuses it unless asked: this local default is
        # asked for (a database URI — tracking.uri: sqlite:///… — is MLflow's recommended alternative)
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    client = mlflow.MlflowClient(tracking_uri=tracking_uri(cfg, out))  # no global state: the caller's uri stays
    name = cfg.tracking.experiment or cfg.name
    exp = client.get_experiment_by_name(name)
    exp_id = exp.experiment_id if exp is not None else client.create_experiment(name)
    run = client.create_run(exp_id, run_name=out.name, tags={"dermfusion.version": __version__,
                                                             "dermfusion.task": task.name,
                                                             "dermfusion.run_dir": str(out.resolve())})
    rid = run.info.run_id
    try:
        from mlflow.entities import Metric, Param

        params = [Param(k, v) for k, v in _params(cfg).items()]
        for i in range(0, len(params), 100):
            client.log_batch(rid, params=params[i:i + 100])
        metrics = [Metric(k, v, 0, 0) for k, v in _metrics(summary).items()]
        for i in range(0, len(metrics), 500):
            client.log_batch(rid, metrics=metrics[i:i + 500])
        for f in ("summary.json", "oof.csv", "oof_calibrated.csv", "config.yaml"):
            if (out / f).exists():
                client.log_artifact(rid, str(out / f))
        with tempfile.TemporaryDirectory() as tmp:
            if _figures(task, df, out, Path(tmp)):
                client.log_artifacts(rid, tmp, "figures")
        for rel in summary.get("bundles") or []:
            client.log_artifacts(rid, str(out / rel), f"bundles/{rel}")
            h = out / rel / "HASH"
            if h.exists():
                client.set_tag(rid, f"bundle_hash.{rel}", h.read_text().strip())
        client.set_terminated(rid, "FINISHED")
    except BaseException:
        client.set_terminated(rid, "FAILED")
        raise
    (out / "mlflow_run.json").write_text(json.dumps({"run_id": rid, "experiment_id": exp_id,
                                                     "tracking_uri": tracking_uri(cfg, out)}, indent=2))
    return rid
