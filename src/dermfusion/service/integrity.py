"""What is served is what was written: every bundle behind the served model — the target's bundles and,
recursively, their members — has its content hash recomputed at start (``bundle.verify_tree``) before anything
is loaded; a mismatch is a ``BundleIntegrityError`` naming the file that differs, and the service refuses to start.
Once the predictor is loaded, ``verify_predictor`` checks that every bundle in it (the hashes ``/v1/model`` shows
and every audit row records, ``model_pass.members_of``) carries exactly the verified hash."""
from __future__ import annotations

import logging
from pathlib import Path

from ..bundle import BundleError, BundleIntegrityError, Integrity, resolve_run, verify_bundle, verify_tree

log = logging.getLogger("dermfusion.service")

__all__ = ["BundleIntegrityError", "verify_predictor", "verify_served"]


def verify_served(target: str | Path | None) -> dict[Path, Integrity]:
    """{resolved directory: Integrity} of every bundle ``dermfusion serve TARGET`` loads. A target that is not a
    bundle or run gives {} (the loader reports that through /readyz); tampering raises ``BundleIntegrityError``."""
    if target is None:
        return {}
    try:
        tops = resolve_run(target)
    except BundleIntegrityError:
        raise
    except BundleError:
        return {}
    out: dict[Path, Integrity] = {}
    for top in tops:
        for v in verify_tree(top):
            out[v.path.resolve()] = v
    return out


def verify_predictor(predictor, verified: dict[Path, Integrity]) -> list[Integrity]:
    """Every bundle of a loaded predictor (itself, then its members, each once), verified — at start-up already
    (``verified``) or now (a predictor handed to ``create_app``) — and its loaded hash checked against it."""
    out: list[Integrity] = []
    seen: set[Path] = set()

    def walk(p) -> None:
        b = getattr(p, "bundle", None)
        path = getattr(b, "path", None)
        if path is not None and Path(path).is_dir() and Path(path).resolve() not in seen:
            key = Path(path).resolve()
            seen.add(key)
            v = verified.get(key) or verify_bundle(key)
            if b.content_hash != v.hash:
                raise BundleIntegrityError(f"{path}: HASH changed while the model was loading; restart the service")
            out.append(v)
        for m in getattr(p, "members", None) or []:
            walk(m)

    walk(predictor)
    for v in out:
        log.info("bundle %s: content hash %s verified", v.path, v.hash[:16])
        if v.legacy:
            log.warning("bundle %s is of format 1: its hash does not cover calibration.json; re-run "
                        "`dermfusion calibrate RUN --manifest M` to re-seal it", v.path)
    return out
