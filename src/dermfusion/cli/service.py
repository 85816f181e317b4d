"""The serving stage's verbs: ``serve``, ``explain``, ``drift``."""
from __future__ import annotations

import base64
import json
from datetime import datetime
from pathlib import Path
from typing import Optional

import typer

from ..console import console, err_console
from .common import fail


def _service_config(path: Optional[Path], **overrides):
    from ..service.config import ServiceConfigError, load_service_config

    try:
        return load_service_config(path, **overrides)
    except ServiceConfigError as e:
        fail(str(e))


def serve_cmd(
    bundle: Optional[Path] = typer.Argument(None, help="bundle directory or training run directory (network: its fold "
                                          "bundles, averaged; tabular: its calibrated refit)"),
    host: str = typer.Option("127.0.0.1", help="interface to listen on (0.0.0.0 for all)"),
    port: int = typer.Option(8000),
    config: Optional[Path] = typer.Option(None, "--config", help="service.yaml (thresholds, limits, auth, audit …)"),
    workers: Optional[int] = typer.Option(None, help="override workers.workers (concurrent analyses)"),
    device: Optional[str] = typer.Option(None, help="override device (cpu, cuda)"),
    log_level: str = typer.Option("info"),
    print_config: bool = typer.Option(False, "--print-config", help="print the default service.yaml and exit"),
    registry: Optional[Path] = typer.Option(None, "--registry", help="serve a model registry's promoted version "
                                            "(and its shadow) instead of one bundle; overrides registry.dir"),
    ssl_certfile: Optional[Path] = typer.Option(None, help="TLS certificate (PEM) to serve HTTPS directly"),
    ssl_keyfile: Optional[Path] = typer.Option(None, help="TLS private key (PEM) for --ssl-certfile"),
    forwarded_allow_ips: Optional[str] = typer.Option(None, help="addresses of a TLS reverse proxy whose "
                                                      "X-Forwarded-* headers are trusted (e.g. 10.0.0.5)"),
):
    """Serve the triage API and the clinician web page (FastAPI + uvicorn)."""
    from ..service.config import default_config_yaml

    if print_config:
        console.print(default_config_yaml(), markup=False, highlight=False, soft_wrap=True)
        return
    if registry is not None:
        over_registry = {"dir": str(registry)}
    else:
        over_registry = None
    if bundle is not None and registry is not None:
        fail("serve either a bundle (BUNDLE_OR_RUN) or a registry (--registry DIR), not both")
    import logging

    import uvicorn

    from ..bundle import resolve_run
    from ..service.app import create_app, server_options
    from ..service.audit import describe_url

    over = {}
    if workers is not None:
        over["workers"] = {"workers": workers}
    if device is not None:
        over["device"] = device
    if over_registry:
        over["registry"] = over_registry
    cfg = _service_config(config, **over)
    if bundle is None and not cfg.registry.dir:
        fail("give a bundle or a training run directory (dermfusion serve BUNDLE_OR_RUN), or --registry DIR")
    if bundle is not None and cfg.registry.dir:
        fail(f"serve either a bundle or the registry {cfg.registry.dir} (registry.dir in the config), not both")
    if bundle is not None:
        resolve_run(bundle)  # a wrong path fails here, in one line, not later in the background loader
    else:
        from ..bundle.registry import Registry

        st = Registry(cfg.registry.dir).read()  # no registry / nothing promoted: one line now, not in the loader
        if not st.get("promoted"):
            fail(f"registry {cfg.registry.dir} has no promoted version: dermfusion registry promote VERSION")
    logging.basicConfig(level=getattr(logging, log_level.upper(), logging.INFO),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if (ssl_certfile is None) != (ssl_keyfile is None):
        fail("give both --ssl-certfile and --ssl-keyfile (or neither, behind a TLS reverse proxy)")
    from ..service.exposure import network_warnings

    tls = ssl_certfile is not None
    for w in network_warnings(cfg, host, tls=tls, proxy=bool(forwarded_allow_ips)):  # beyond loopback, no TLS / keys
        err_console.print(f"warning: {w}", style="bold yellow", highlight=False, soft_wrap=True, markup=False)
    web_app = create_app(bundle, cfg, warm_in_background=True)
    keys = cfg.auth.keys
    auth = (f"{len(keys)} API key(s): " + ", ".join(f"{k.id} ({'+'.join(k.scopes)})" for k in keys)) if keys \
        else "no authentication (analysis only; feedback and admin off)"
    err_console.print(f"[bold]dermfusion serve[/]: {bundle or 'registry ' + str(cfg.registry.dir)} on "
                      f"{'https' if tls else 'http'}://{host}:{port} — {auth}; "
                      f"{cfg.workers.workers} worker(s), queue {cfg.workers.queue_size}", highlight=False,
                      soft_wrap=True)
    err_console.print(f"audit trail: {describe_url(cfg.audit.db_url)}"
                      + ("" if cfg.audit.required else " (not required)"), markup=False, highlight=False,
                      soft_wrap=True)
    # uvicorn's own cap sits far above ours, so our 503 (with Retry-After) is what clients see (server_options)
    extra = {"ssl_certfile": str(ssl_certfile), "ssl_keyfile": str(ssl_keyfile)} if tls else {}
    if forwarded_allow_ips:
        extra["forwarded_allow_ips"] = forwarded_allow_ips
    uvicorn.run(web_app, host=host, port=port, log_level=log_level, **server_options(cfg), **extra)


def explain_cmd(
    bundle: Path = typer.Argument(..., help="bundle or training run directory"),
    manifest: Path = typer.Option(..., help="manifest holding the lesions"),
    ids: str = typer.Option(..., help="comma-separated lesion ids"),
    out: Path = typer.Option(..., help="folder for <id>_<modality>.png overlays and <id>.json"),
    config: Optional[Path] = typer.Option(None, "--config", help="service.yaml (clinical settings: operating-point "
                                                                 "override, deployment prior, heat-map size)"),
    device: str = typer.Option("cpu"),
):
    """Heat maps (attention rollout / Grad-CAM) over the original images, plus the differential, prediction set,
    triage and the fusion model's concept / metadata attention, one JSON per lesion — through the clinical engine,
    the same path as the service's /v1/analyze."""
    from ..clinical import Engine
    from ..clinical.explanation import fusion_explanation, render_heatmaps
    from ..clinical.settings import load_clinical_settings
    from ..data.manifest import load_manifest
    from ..inference import load_run

    settings = load_clinical_settings(config)
    df = load_manifest(manifest)
    wanted = [i.strip() for i in ids.split(",") if i.strip()]
    df = df.set_index(df["lesion_id"].astype(str), drop=False)
    missing = [i for i in wanted if i not in df.index]
    if missing:
        fail(f"lesion id(s) not in {manifest}: {', '.join(missing)}")
    engine = Engine(load_run(bundle, device=device), settings)
    out.mkdir(parents=True, exist_ok=True)
    failures = 0
    for lid in wanted:
        row = df.loc[lid]
        row = row.iloc[0] if hasattr(row, "iloc") and getattr(row, "ndim", 1) == 2 else row
        lesion = engine.lesion_from_row(row.to_dict())
        for m, why in lesion.errors.items():
            err_console.print(f"[yellow]{lid}: {m} image unreadable ({why}); skipped[/]")
        if engine.modalities and not lesion.images:
            err_console.print(f"[red]{lid}: no readable image of the kind this model analyses[/]")
            failures += 1
            continue
        a = engine.assess([lesion], explain=True)[0]
        resp = {"lesion_id": lid, **engine.clinical_payload(a),
                "explanations": {"heatmaps": render_heatmaps(lesion.images, a.maps, a.methods, engine.crop_pct,
                                                             settings.explain),
                                 "fusion": fusion_explanation(a.contributions)},
                "inputs": {"modalities_used": sorted(lesion.images), "metadata_used": lesion.metadata,
                           "modalities_missing": a.missing_images, "metadata_missing": a.missing_metadata}}
        safe = _file_stem(lid)
        for h in resp["explanations"]["heatmaps"]:
            f = out / f"{safe}_{h['modality']}.png"
            f.write_bytes(base64.b64decode(h.pop("overlay_png_base64")))
            h["overlay_file"] = f.name
        (out / f"{safe}.json").write_text(json.dumps(resp, indent=2, default=_json_default))
        top = resp["primary_diagnosis"]
        pset = resp["prediction_set"]
        console.print(f"{lid}: {top['code']} ({top['probability']:.2f}) · risk {resp['risk_score']:.0f} · "
                      f"{resp['action']}{' · review' if resp['review_recommended'] else ''}"
                      + (f" · {pset['text']}" if pset else "")
                      + f" · {len(resp['explanations']['heatmaps'])} heat map(s)")
    console.print(f"[green]wrote[/] {out}")
    if failures:
        raise typer.Exit(1)


def _file_stem(lesion_id: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in lesion_id)[:120] or "lesion"


def _json_default(o):
    if isinstance(o, datetime):
        return o.isoformat()
    return float(o)


def drift_cmd(
    db: Optional[str] = typer.Option(None, "--db", help="audit database URL (default: the service's — "
                                     "DERMFUSION_AUDIT_DB_URL, else sqlite:///~/.local/share/dermfusion/audit.db)"),
    bundle: Path = typer.Option(..., "--bundle", help="the served bundle or run (a run: its first bundle) whose "
                                 "drift_reference.json is the baseline"),
    limit: int = typer.Option(500, help="most recent analyses to compare"),
    since: Optional[str] = typer.Option(None, help="only analyses at or after this ISO date/time"),
    json_out: Optional[Path] = typer.Option(None, "--json", help="also write the report as JSON"),
    fail_above: Optional[float] = typer.Option(None, help="exit 1 when any signal's PSI exceeds this (e.g. 0.25)"),
):
    """Input / prediction drift from the audit trail: PSI per signal against the bundle's reference."""
    from rich.table import Table

    from ..bundle import resolve_run
    from ..service.drift import drift_report

    since_dt = None
    if since:
        try:
            since_dt = datetime.fromisoformat(since)
        except ValueError:
            fail(f"--since {since!r} is not an ISO date/time (e.g. 2025-01-31 or 2025-01-31T12:00)")
    # a run stands for its first bundle: the one whose hash and drift reference the service reports
    db = db or _service_config(None).audit.db_url  # what `dermfusion serve` writes (DERMFUSION_AUDIT_DB_URL too)
    rep = drift_report(db, resolve_run(bundle)[0], limit=limit, since=since_dt)
    t = Table(title=f"drift: {rep['analyses']} audited analyses vs {bundle} reference")
    for c in ("signal", "PSI", "n", "level"):
        t.add_column(c, justify="right" if c in ("PSI", "n") else "left")
    colour = {"stable": "green", "moderate": "yellow", "major": "red"}
    for name, s in sorted(rep["signals"].items(), key=lambda kv: -kv[1]["psi"]):
        t.add_row(name, f"{s['psi']:.3f}", str(s["n"]), f"[{colour[s['level']]}]{s['level']}[/]")
    if not rep["signals"]:
        t.add_row("—", "—", "0", "no audited analyses of this model yet")
    console.print(t)
    if json_out:
        json_out.parent.mkdir(parents=True, exist_ok=True)
        json_out.write_text(json.dumps(rep, indent=2, default=_json_default))
        console.print(f"[green]wrote[/] {json_out}")
    if fail_above is not None and rep["max_psi"] > fail_above:
        err_console.print(f"[bold red]drift[/]: max PSI {rep['max_psi']:.3f} > {fail_above}")
        raise typer.Exit(1)
