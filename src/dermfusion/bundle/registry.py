"""The local model registry: which bundle is each released version, which one answers patients (promoted), which
one runs beside it (shadow, or a canary answering a share of the requests), and who changed that when.

A registry is a directory holding ``registry.json`` — no server. Registering a version records the bundle's path,
its *verified* content hash (every bundle behind it: ``verify_tree``) and its release-gate record
(``BUNDLE/gate/gate.json``, written by ``dermfusion gate``) with its verdict. The file is rewritten atomically (a
temporary file in the same directory, fsync, ``os.replace``) under an exclusive lock (``.lock``, ``fcntl`` where
available), so a reader — the service polls it — never sees half a file and two writers never lose an update.

Rules: versions are semantic (``1.2.0``, ``1.3.0-rc.1``) and never re-registered; a gate record is believed only
when it names the verified hash of every bundle registered and the criteria it judged, each criterion's recorded
bound agreeing with its verdict (else registration is refused); promotion needs a passed gate (``force`` overrides
only with a ``reason``, and both are recorded with the operator); a canary (a shadow with ``share`` > 0, i.e.
returned to patients) too, and a canary of share 1 *is* a promotion (recorded as one, with its rules); ``rollback``
returns to the version promoted before the current one and stops any shadow or canary (the history says which).
"""
from __future__ import annotations

import contextlib
import getpass
import hashlib
import json
import math
import os
import re
import tempfile
from datetime import datetime, timezone
from pathlib import Path

from ..errors import DermfusionError
from .resolve import resolve_run
from .store import verify_tree

STATE_FILE = "registry.json"
FORMAT = 1
SEMVER = re.compile(r"^(0|[1-9]\d*)\.(0|[1-9]\d*)\.(0|[1-9]\d*)(?:-[0-9A-Za-z.-]+)?(?:\+[0-9A-Za-z.-]+)?$")


class RegistryError(DermfusionError, ValueError):
    """A refused registry change. ``code`` says which rule refused it (the HTTP API answers with the code and a
    fixed message, never this message: it names versions and paths)."""

    def __init__(self, message: str, code: str = "registry_refused"):
        super().__init__(message)
        self.code = code


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def whoami() -> str:
    try:
        return getpass.getuser()
    except Exception:  # noqa: BLE001 — no user name in a container: say so rather than fail
        return "unknown"


def _semver_key(v: str) -> tuple:
    core, _, pre = v.split("+", 1)[0].partition("-")
    return tuple(int(x) for x in core.split(".")) + ((1,) if not pre else (0, pre))


def gate_summary(bundle: Path, hashes: list[str] | None = None) -> dict | None:
    """The release-gate verdict next to a bundle or run (``TARGET/gate/gate.json``), or None when there is none.

    With ``hashes`` (the verified content hashes of the bundles being registered) the record must show that it judged
    exactly these bundles and on what: ``model.bundles[].hash`` equal to ``hashes``, a non-empty ``criteria`` list,
    each judged criterion's ``bound`` on the right side of its ``threshold`` for a pass (wrong side for a fail), and
    ``passed`` / ``failed`` agreeing with them. A record that does not is refused (``RegistryError``) — a
    hand-written ``{"passed": true}`` is not a verdict."""
    path = Path(bundle) / "gate" / "gate.json"
    if not path.is_file():
        return None
    try:
        raw = path.read_bytes()
        rec = json.loads(raw)
    except (OSError, ValueError) as e:
        raise RegistryError(f"{path}: not a readable gate record ({e})", "gate_unreadable") from None
    if not isinstance(rec, dict):
        raise RegistryError(f"{path}: not a gate record (a JSON object written by dermfusion gate)", "gate_unreadable")
    out = {"passed": bool(rec.get("passed")), "failed": list(rec.get("failed") or []), "record": str(path.resolve()),
           "n": rec.get("n")}
    if hashes is None:
        return out
    redo = "re-run `dermfusion gate` on this bundle"
    model = rec.get("model") if isinstance(rec.get("model"), dict) else {}
    named = {b.get("hash") for b in model.get("bundles") or [] if isinstance(b, dict) and b.get("hash")}
    if not named:
        raise RegistryError(f"{path} names no bundle hash, so it cannot show that it judged this bundle; {redo}",
                            "gate_unbound")
    if named != set(hashes):
        raise RegistryError(f"{path} was written for other bundle content (hash {sorted(named)[0][:16]}…, this bundle "
                            f"{sorted(hashes)[0][:16]}…); {redo}", "gate_other_bundle")
    criteria = rec.get("criteria")
    if not isinstance(criteria, list) or not criteria:
        raise RegistryError(f"{path} names no criteria it was judged on; {redo}", "gate_no_criteria")
    judged = []
    for c in criteria:
        if not isinstance(c, dict) or not isinstance(c.get("criterion"), str) or c.get("status") not in (
                "pass", "fail", "skipped") or c.get("kind") not in ("min", "max") or not _number(c.get("threshold")):
            raise RegistryError(f"{path}: a criterion without name, kind, threshold or status; {redo}",
                                "gate_no_criteria")
        if c["status"] != "skipped":
            bound = c.get("bound")
            holds = _number(bound) and (bound >= c["threshold"] if c["kind"] == "min" else bound <= c["threshold"])
            if holds != (c["status"] == "pass"):
                raise RegistryError(f"{path}: criterion {c['criterion']} is recorded as {c['status']} but its bound "
                                    f"does not say so; {redo}", "gate_inconsistent")
        judged.append({"criterion": c["criterion"], "kind": c["kind"], "threshold": c["threshold"],
                       "bound": c.get("bound"), "status": c["status"]})
    if not any(c["status"] != "skipped" for c in judged):
        raise RegistryError(f"{path}: every criterion was skipped — nothing was judged; {redo}", "gate_no_criteria")
    failed = [c["criterion"] for c in judged if c["status"] == "fail"]
    if out["passed"] != (not failed) or sorted(out["failed"]) != sorted(failed):
        raise RegistryError(f"{path}: its verdict (passed / failed) disagrees with its criteria; {redo}",
                            "gate_inconsistent")
    return {**out, "criteria": judged, "sha256": hashlib.sha256(raw).hexdigest(), "generated": rec.get("generated")}


def _number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


class Registry:
    """One registry directory. Every method re-reads ``registry.json``; changes are written atomically."""

    def __init__(self, root: str | Path, create: bool = False):
        self.root = Path(root).expanduser()
        if create:
            self.root.mkdir(parents=True, exist_ok=True)
        elif not self.root.is_dir():
            raise RegistryError(f"no model registry at {self.root} (register a version first: "
                                "dermfusion registry register BUNDLE --version 1.0.0 --registry DIR)")

    @property
    def path(self) -> Path:
        return self.root / STATE_FILE

    # ------------------------------------------------------------------------------------------- reading
    def read(self) -> dict:
        if not self.path.exists():
            return {"format": FORMAT, "revision": 0, "versions": {}, "promoted": None, "shadow": None,
                    "history": []}
        try:
            state = json.loads(self.path.read_text())
        except (OSError, ValueError) as e:
            raise RegistryError(f"{self.path}: not a readable registry file ({e})") from None
        if state.get("format") != FORMAT:
            raise RegistryError(f"{self.path}: registry format {state.get('format')!r} is not {FORMAT}")
        return state

    def revision(self) -> tuple[int, int] | None:
        """A cheap change marker (mtime in ns, size) for pollers; None when there is no file yet."""
        try:
            st = self.path.stat()
        except FileNotFoundError:
            return None
        return st.st_mtime_ns, st.st_size

    def version(self, version: str) -> dict:
        entry = self.read()["versions"].get(version)
        if entry is None:
            raise RegistryError(f"version {version} is not registered in {self.root}", "unknown_version")
        return entry

    def listing(self) -> list[dict]:
        """Every version, oldest first, with its role (promoted / shadow / canary) — for ``registry list``."""
        s = self.read()
        shadow = s.get("shadow") or {}
        out = []
        for v in sorted(s["versions"], key=_semver_key):
            e = s["versions"][v]
            role = "promoted" if v == s.get("promoted") else (
                ("canary" if shadow.get("share", 0) > 0 else "shadow") if v == shadow.get("version") else "")
            out.append({"version": v, "role": role, "share": shadow.get("share") if role == "canary" else None, **e})
        return out

    def public_view(self) -> dict:
        """What the HTTP API shows: versions with role, short hash and gate verdict (criteria named), and the last
        changes — no bundle paths, no operating-system user names, no gate-record paths."""
        s = self.read()
        versions = []
        for e in self.listing():
            g = e.get("gate")
            versions.append({"version": e["version"], "role": e["role"], "share": e.get("share"),
                             "hash": e["hash"][:16], "registered_at": e.get("registered_at"),
                             "gate": None if g is None else {
                                 "passed": g["passed"], "failed": g["failed"],
                                 "criteria": [c["criterion"] for c in g.get("criteria", [])]}})
        history = []
        for h in s["history"][-20:]:
            by = h.get("by") or ""
            history.append({"at": h.get("at"), "action": h.get("action"), "version": h.get("version"),
                            "previous": h.get("previous"), "share": h.get("share"), "forced": h.get("forced", False),
                            "by": by if by.startswith("api:") else "operator"})
        return {"versions": versions, "history": history}

    # ------------------------------------------------------------------------------------------- writing
    @contextlib.contextmanager
    def _update(self):
        """Read-modify-write under the lock; the new state is written atomically with revision + 1."""
        self.root.mkdir(parents=True, exist_ok=True)
        with open(self.root / ".lock", "a+") as lock:
            try:
                import fcntl  # POSIX only: elsewhere one writer at a time is the operator's job
                fcntl.flock(lock, fcntl.LOCK_EX)
            except ImportError:
                pass
            state = self.read()
            yield state
            state["revision"] = int(state.get("revision", 0)) + 1
            fd, tmp = tempfile.mkstemp(prefix=".registry-", suffix=".json", dir=self.root)
            try:
                with os.fdopen(fd, "w") as f:
                    json.dump(state, f, indent=2, sort_keys=True)
                    f.flush()
                    os.fsync(f.fileno())
                os.replace(tmp, self.path)
            except BaseException:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(tmp)
                raise

    @staticmethod
    def _log(state: dict, action: str, version: str | None, by: str | None, **extra) -> None:
        state["history"].append({"at": _now(), "by": by or whoami(), "action": action, "version": version,
                                 **extra})

    def register(self, bundle: str | Path, version: str, by: str | None = None, note: str | None = None) -> dict:
        if not SEMVER.match(version):
            raise RegistryError(f"version {version!r} is not a semantic version (MAJOR.MINOR.PATCH, e.g. 1.2.0)")
        target = Path(bundle).expanduser().resolve()
        bundles = [{"path": str(i.path.resolve()), "hash": i.hash} for b in resolve_run(target) for i in verify_tree(b)]
        gate = gate_summary(target, [b["hash"] for b in bundles])  # a record that does not prove itself is refused
        entry = {"bundle": str(target), "hash": bundles[0]["hash"], "bundles": bundles, "gate": gate,
                 "registered_at": _now(), "registered_by": by or whoami()}
        if note:
            entry["note"] = note
        with self._update() as s:
            if version in s["versions"]:
                raise RegistryError(f"version {version} is already registered (bundle "
                                    f"{s['versions'][version]['bundle']}); versions are never reused — "
                                    "register a new one", "version_exists")
            s["versions"][version] = entry
            self._log(s, "register", version, by, hash=entry["hash"])
        return entry

    def _require_gate(self, s: dict, version: str, force: bool, what: str) -> bool:
        """Refuse unless ``version``'s gate passed; True when ``force`` overrode a refusal (to be recorded)."""
        if version not in s["versions"]:
            raise RegistryError(f"version {version} is not registered in {self.root}", "unknown_version")
        gate = s["versions"][version].get("gate")
        if gate and gate["passed"]:
            return False
        if force:
            return True
        why = "has no release-gate record (run dermfusion gate on it before registering)" if not gate else \
            f"failed its release gate ({', '.join(gate['failed']) or 'see ' + gate['record']})"
        raise RegistryError(f"version {version} {why}; refusing to {what} it (--force with --reason overrides, and "
                            "is recorded)", "gate_missing" if not gate else "gate_failed")

    @staticmethod
    def _check_force(force: bool, reason: str | None) -> str | None:
        reason = (reason or "").strip() or None
        if force and not reason:
            raise RegistryError("--force needs a --reason: an override of the release gate is recorded with who and "
                                "why", "reason_required")
        return reason

    def promote(self, version: str, by: str | None = None, force: bool = False, reason: str | None = None) -> dict:
        reason = self._check_force(force, reason)
        with self._update() as s:
            self._promote(s, version, by, force, reason)
            return s

    def _promote(self, s: dict, version: str, by: str | None, force: bool, reason: str | None, **extra) -> None:
        forced = self._require_gate(s, version, force, "promote")
        previous = s.get("promoted")
        if previous == version:
            raise RegistryError(f"version {version} is already promoted", "already_promoted")
        s["promoted"] = version
        if (s.get("shadow") or {}).get("version") == version:
            s["shadow"] = None
        self._log(s, "promote", version, by, previous=previous, forced=forced,
                  **({"reason": reason} if forced else {}), **extra)

    def shadow(self, version: str | None, share: float = 0.0, by: str | None = None, force: bool = False,
               reason: str | None = None) -> dict:
        """Run ``version`` beside the promoted one: audited, not returned (``share`` 0), or returned for that share of
        requests (a canary, which needs a passed gate like a promotion). ``share`` 1 answers every request: that is
        a promotion and is done as one (recorded ``promote``, ``via`` canary; rollback returns to the version promoted
        before). ``version`` None stops the shadow."""
        if not (isinstance(share, (int, float)) and 0.0 <= share <= 1.0):
            raise RegistryError(f"--share must lie in [0, 1] (got {share})", "invalid_share")
        reason = self._check_force(force, reason)
        with self._update() as s:
            if version is not None and share >= 1.0:
                self._promote(s, version, by, force, reason, via="canary share 1.0")
                return s
            forced = False
            if version is not None:
                if share > 0:
                    forced = self._require_gate(s, version, force, "return answers from (canary)")
                elif version not in s["versions"]:
                    raise RegistryError(f"version {version} is not registered in {self.root}", "unknown_version")
                if version == s.get("promoted"):
                    raise RegistryError(f"version {version} is the promoted version; shadow another one",
                                        "is_promoted")
            previous = (s.get("shadow") or {}).get("version")
            s["shadow"] = {"version": version, "share": share} if version is not None else None
            self._log(s, "shadow" if version else "shadow_off", version, by, share=share, previous=previous,
                      forced=forced, **({"reason": reason} if forced else {}))
            return s

    def rollback(self, by: str | None = None) -> dict:
        """Back to the version promoted before the current one (following earlier rollbacks back in history). Any
        shadow or canary stops: it was set up beside the version now withdrawn, and after a rollback only the
        version that was trusted before answers."""
        with self._update() as s:
            current = s.get("promoted")
            if current is None:
                raise RegistryError("nothing is promoted, so there is nothing to roll back", "nothing_promoted")
            target = previous_promoted(s["history"])
            if target is None:
                raise RegistryError(f"version {current} is the first promoted version; there is none to roll back to",
                                    "no_previous")
            stopped = (s.get("shadow") or {}).get("version")
            s["promoted"] = target
            s["shadow"] = None
            self._log(s, "rollback", target, by, previous=current, shadow_stopped=stopped)
            return s


def previous_promoted(history: list[dict]) -> str | None:
    """The version promoted before the current one: replay promote / rollback events on a stack."""
    stack: list[str] = []
    for e in history:
        if e["action"] == "promote":
            stack.append(e["version"])
        elif e["action"] == "rollback" and stack:
            stack.pop()
    return stack[-2] if len(stack) >= 2 else None
