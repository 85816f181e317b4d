"""Who may use the service and what it keeps: ``keys new`` (a named API key with scopes: the secret printed once,
only its salted hash for service.yaml) and ``audit purge`` (stored images past ``audit.retention_days``)."""
from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from ..console import console, err_console
from .common import fail


def keys_new_cmd(
    key_id: str = typer.Argument(..., metavar="ID", help="the key's name, recorded in audit / feedback / history rows "
                                                         "(lower case, digits, . _ -)"),
    scope: List[str] = typer.Option(..., "--scope", help="analyze | feedback | admin | metrics (repeat for several)"),
):
    """Make a named API key: prints the secret once (give it to its holder) and the auth.keys entry for service.yaml
    (a salted hash — the service never stores the secret)."""
    import yaml

    from ..service.auth import KEY_ID, SCOPES, hash_key, new_key

    if not KEY_ID.match(key_id):
        fail("a key id is 1–32 characters: lower-case letters, digits, '.', '_' or '-'")
    bad = [s for s in scope if s not in SCOPES]
    if bad:
        fail(f"unknown scope(s) {', '.join(bad)}: use {', '.join(SCOPES)}")
    secret = new_key()
    entry = {"id": key_id, "scopes": sorted(set(scope), key=SCOPES.index), "hash": hash_key(secret)}
    err_console.print(f"secret for key '{key_id}' (shown once; send it as the X-API-Key header):", highlight=False)
    console.print(secret, highlight=False, markup=False, soft_wrap=True)
    err_console.print("add to service.yaml under auth.keys:", highlight=False)
    console.print(yaml.safe_dump([entry], sort_keys=False).rstrip(), highlight=False, markup=False, soft_wrap=True)
    err_console.print(f"or in the environment: DERMFUSION_API_KEYS={key_id}:{'+'.join(entry['scopes'])}:<secret>",
                      highlight=False, markup=False, soft_wrap=True)


def audit_purge_cmd(
    config: Optional[Path] = typer.Option(None, "--config", help="service.yaml (audit.db_url, audit.image_dir, "
                                                                 "audit.retention_days)"),
    days: Optional[int] = typer.Option(None, "--days", help="override audit.retention_days"),
    dry_run: bool = typer.Option(False, "--dry-run", help="count what would be deleted; delete nothing"),
):
    """Delete stored images older than the retention period and record in each audit row when they were purged
    (run it daily, e.g. from a systemd timer or cron). The audit rows stay: they hold no image."""
    from ..service.audit import AuditStore, describe_url
    from ..service.config import ServiceConfigError, load_service_config
    from ..service.retention import purge_images

    try:
        cfg = load_service_config(config)
    except ServiceConfigError as e:
        fail(str(e))
    keep = days if days is not None else cfg.audit.retention_days
    if keep is None:
        fail("no retention period: set audit.retention_days in service.yaml (or pass --days N)")
    if keep < 1:
        fail("--days must be at least 1")
    store = AuditStore(cfg.audit.db_url)
    try:
        out = purge_images(store, cfg.audit.image_dir, keep, dry_run=dry_run)
    finally:
        store.close()
    verb = "would delete" if dry_run else "deleted"
    console.print(f"{verb} the images of {out['rows']} audited analyses ({out['files']} file(s)) and "
                  f"{out['unaudited_files']} unaudited file(s) stored before {out['cutoff']} "
                  f"({describe_url(cfg.audit.db_url)}, {cfg.audit.image_dir})", highlight=False, soft_wrap=True,
                  markup=False)
