"""The model's life in the clinic: ``registry register | list | promote | shadow | rollback``, ``feedback`` and
``performance``. The registry is a directory (``--registry``, else ``$DERMFUSION_REGISTRY``, else the user's data
folder's ``registry/``); a running ``dermfusion serve --registry DIR`` picks up changes within ``registry.poll_s``."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Optional

import typer

from ..console import console
from .common import fail

REGISTRY_HELP = "registry directory (default: $DERMFUSION_REGISTRY, else the user's data folder's registry/)"


def _registry(path: Optional[Path], create: bool = False):
    from ..bundle.registry import Registry
    from ..service.config import user_data_dir

    root = path or (Path(os.environ["DERMFUSION_REGISTRY"]) if os.environ.get("DERMFUSION_REGISTRY")
                    else user_data_dir() / "registry")
    return Registry(root, create=create)


def _state_line(s: dict) -> str:
    sh = s.get("shadow") or {}
    shadow = (f"; {sh['version']} as {'canary (share %.2f)' % sh['share'] if sh.get('share') else 'shadow'}"
              if sh.get("version") else "")
    return f"promoted: {s.get('promoted') or 'none'}{shadow}"


OPERATOR_HELP = "who does this (recorded in the history; default: the operating-system user)"
REASON_HELP = "why the release gate is overridden (required with --force; recorded with the operator)"


def register_cmd(
    bundle: Path = typer.Argument(..., help="bundle or training run directory (its gate/gate.json is recorded)"),
    version: str = typer.Option(..., help="semantic version, e.g. 1.2.0 (never reused)"),
    registry: Optional[Path] = typer.Option(None, help=REGISTRY_HELP),
    note: Optional[str] = typer.Option(None, help="a short note kept with the version"),
):
    """Register a bundle as a version: its verified content hash and its release-gate verdict are recorded. A
    gate/gate.json that does not name this bundle's verified hash and the criteria it judged is refused."""
    e = _registry(registry, create=True).register(bundle, version, note=note)
    gate = e["gate"]
    verdict = "no gate record" if gate is None else ("gate PASSED" if gate["passed"] else
                                                     f"gate FAILED ({', '.join(gate['failed'])})")
    console.print(f"registered {version}: {e['bundle']} (hash {e['hash'][:16]}…, {verdict})", soft_wrap=True)


def list_cmd(registry: Optional[Path] = typer.Option(None, help=REGISTRY_HELP),
             as_json: bool = typer.Option(False, "--json", help="print the registry state as JSON")):
    """Every registered version with its hash, gate verdict and role; then the last changes."""
    reg = _registry(registry)
    if as_json:
        console.print_json(json.dumps(reg.read()))
        return
    from rich.table import Table

    t = Table("version", "role", "gate", "hash", "registered", "by", "bundle")
    for e in reg.listing():
        g = e.get("gate")
        role = e["role"] + (f" {e['share']:.2f}" if e.get("share") else "")
        t.add_row(e["version"], role, "—" if g is None else ("PASS" if g["passed"] else "FAIL"), e["hash"][:12],
                  e["registered_at"], e["registered_by"], e["bundle"])
    console.print(t)
    s = reg.read()
    console.print(_state_line(s))
    for h in s["history"][-5:]:
        forced = f" (forced: {h.get('reason')})" if h.get("forced") else ""
        console.print(f"  {h['at']} {h['by']}: {h['action']} {h.get('version') or ''}{forced}", highlight=False,
                      markup=False)


def _operator(name: Optional[str]) -> str:
    from ..bundle.registry import whoami

    return f"cli:{(name or whoami()).strip()[:60]}"


def promote_cmd(version: str = typer.Argument(...), registry: Optional[Path] = typer.Option(None, help=REGISTRY_HELP),
                force: bool = typer.Option(False, "--force", help="promote despite a failed or missing gate "
                                                                  "(needs --reason; recorded in the history)"),
                reason: Optional[str] = typer.Option(None, help=REASON_HELP),
                operator: Optional[str] = typer.Option(None, help=OPERATOR_HELP)):
    """Make VERSION the one that answers (its release gate must have passed)."""
    console.print(_state_line(_registry(registry).promote(version, by=_operator(operator), force=force,
                                                          reason=reason)))


def shadow_cmd(version: Optional[str] = typer.Argument(None, help="version to run beside the promoted one"),
               share: float = typer.Option(0.0, help="0 = audited, never returned; 0 < share < 1 = a canary answering "
                                                     "that share of requests (needs a passed gate); 1 = a promotion"),
               off: bool = typer.Option(False, "--off", help="stop the shadow"),
               registry: Optional[Path] = typer.Option(None, help=REGISTRY_HELP),
               force: bool = typer.Option(False, "--force", help="a canary despite a failed or missing gate (needs "
                                                                 "--reason; recorded)"),
               reason: Optional[str] = typer.Option(None, help=REASON_HELP),
               operator: Optional[str] = typer.Option(None, help=OPERATOR_HELP)):
    """Run VERSION in shadow (predictions audited with its version, not returned) or as a canary."""
    if (version is None) != off:
        fail("give a VERSION, or --off to stop the shadow")
    console.print(_state_line(_registry(registry).shadow(version, share, by=_operator(operator), force=force,
                                                         reason=reason)))


def rollback_cmd(registry: Optional[Path] = typer.Option(None, help=REGISTRY_HELP),
                 operator: Optional[str] = typer.Option(None, help=OPERATOR_HELP)):
    """Back to the previously promoted version; any shadow or canary stops."""
    console.print(_state_line(_registry(registry).rollback(by=_operator(operator))))


def _audit_store(db_or_config: str):
    """An audit database URL (contains ://) or a service.yaml (its audit.db_url)."""
    from ..service.audit import AuditStore
    from ..service.config import load_service_config

    url = db_or_config if "://" in db_or_config else load_service_config(Path(db_or_config)).audit.db_url
    return AuditStore(url)


def feedback_cmd(
    db_or_config: str = typer.Argument(..., help="audit database URL, or the service.yaml naming it"),
    request_id: str = typer.Argument(..., help="the analysis' request id"),
    diagnosis: str = typer.Option(..., help="confirmed diagnosis: one of the task's class codes, e.g. MEL"),
    confirmation: str = typer.Option(..., help="histology | confocal | follow_up | consensus (strongest first)"),
    amend: Optional[str] = typer.Option(None, "--amend", help="replace the diagnosis that counts, giving the reason: "
                                        "entry_error | revised_report | second_review | wrong_lesion (kept beside it)"),
    operator: Optional[str] = typer.Option(None, help=OPERATOR_HELP),
):
    """Record a confirmed diagnosis for an audited analysis (enumerated values only). A weaker confirmation never
    replaces a stronger one; a disagreeing one is recorded as a conflict (and reported as an error) until
    amended with --amend."""
    from ..service.inputs import InputError
    from ..service.lifecycle import record_feedback

    store = _audit_store(db_or_config)
    try:
        rec = record_feedback(store, request_id, diagnosis, confirmation, _operator(operator)[:32], amend)
    except InputError as e:
        fail(e.message)
    finally:
        store.close()
    console.print(f"{rec['status']}: {rec['request_id']} {rec['diagnosis']} ({rec['confirmation']})")


def performance_cmd(
    audit_db: str = typer.Option(..., "--audit-db", help="audit database URL, or the service.yaml naming it"),
    registry: Optional[Path] = typer.Option(None, help="registry: compare its promoted and shadow versions"),
    a: Optional[str] = typer.Option(None, "--a", help="version A (default: the registry's promoted / most answers)"),
    b: Optional[str] = typer.Option(None, "--b", help="version B (default: the registry's shadow)"),
    delta: float = typer.Option(0.05, help="accuracy difference the sample-size caveat is computed for"),
    json_out: Optional[Path] = typer.Option(None, "--json", help="also write the report as JSON"),
):
    """Per-version sensitivity, melanoma sensitivity, AUROC and the A/B comparison (McNemar's exact test) from the
    audit trail joined with confirmed diagnoses."""
    from ..service.performance import format_report, performance_report

    if registry is not None:
        s = _registry(registry).read()
        a = a or s.get("promoted")
        b = b or (s.get("shadow") or {}).get("version") or _last_shadow(s)
    store = _audit_store(audit_db)
    try:
        report = performance_report(store, a, b, delta)
    finally:
        store.close()
    for line in format_report(report):
        console.print(line, highlight=False, soft_wrap=True, markup=False)
    if json_out:
        json_out.write_text(json.dumps(report, indent=2, default=str))


def _last_shadow(s: dict) -> str | None:
    """After a promotion the former shadow is no longer one: compare with the latest version shadowed."""
    for h in reversed(s["history"]):
        if h["action"] == "shadow" and h.get("version") and h["version"] != s.get("promoted"):
            return h["version"]
    return None
