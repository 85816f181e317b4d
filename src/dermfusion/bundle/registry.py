"""The local model registry: which bundle is each released version, which one answers patients (promoted), which
one runs beside it (shadow, or a canary answering a share of the requests), and who changed that when.

A registry is a directory holding ``registry.json`` — no server. Registering a version records the bundle's path,
its *verified* content hash (every bundle behind it: ``verify_tree``) and its release-gate record
(``BUNDLE/gate/gate.json``, written by ``dermfusion gate``) with its verdict. The file is rewritten atomically (a
temporary file in the same directory, fsync, ``os.replace``) under an exclusive lock (``.lock``, ``fcntl`` where
available), so a reader — the service polls it — never sees half a file and two writers never lose an update.

Rules: versions are semantic (``1.2.0``, ``1.3.0-rc.1``) and never re-registered; promotion needs a passed gate
(``force`` overrides and is recorded); a canary (a shadow with ``share`` > 0, i.e. returned to patients) too;
``rollback`` returns to the version promoted before the current one (the history says which).
"""
from __future__ import annotations

import contextlib
import getpass
import json
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
    pass


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


def gate_summary(bundle: Path) -> dict | None:
    """The release-gate verdict next to a bundle or run (``TARGET/gate/gate.json``), or None when there is none."""
    path = Path(bundle) / "gate" / "gate.json"
    if not path.is_file():
        return None
    try:
        rec = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise RegistryError(f"{path}: not a readable gate record ({e})") from None
    return {"passed": bool(rec.get("passed")), "failed": list(rec.get("failed") or []), "record": str(path.resolve()),
            "n": rec.get("n")}


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
            raise RegistryError(f"version {version} is not registered in {self.root}")
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
        entry = {"bundle": str(target), "hash": bundles[0]["hash"], "bundles": bundles, "gate": gate_summary(target),
                 "registered_at": _now(), "registered_by": by or whoami()}
        if note:
            entry["note"] = note
        with self._update() as s:
            if version in s["versions"]:
                raise RegistryError(f"version {version} is already registered (bundle "
                                    f"{s['versions'][version]['bundle']}); versions are never reused — "
                                    "register a new one")
            s["versions"][version] = entry
            self._log(s, "register", version, by, hash=entry["hash"])
        return entry

    def _require_gate(self, s: dict, version: str, force: bool, what: str) -> None:
        if version not in s["versions"]:
            raise RegistryError(f"version {version} is not registered in {self.root}")
        gate = s["versions"][version].get("gate")
        if force or (gate and gate["passed"]):
            return
        why = "has no release-gate record (run dermfusion gate on it before registering)" if not gate else \
            f"failed its release gate ({', '.join(gate['failed']) or 'see ' + gate['record']})"
        raise RegistryError(f"version {version} {why}; refusing to {what} it (--force overrides, and is recorded)")

    def promote(self, version: str, by: str | None = None, force: bool = False) -> dict:
        with self._update() as s:
            self._require_gate(s, version, force, "promote")
            previous = s.get("promoted")
            if previous == version:
                raise RegistryError(f"version {version} is already promoted")
            s["promoted"] = version
            if (s.get("shadow") or {}).get("version") == version:
                s["shadow"] = None
            self._log(s, "promote", version, by, previous=previous, forced=force)
            return s

    def shadow(self, version: str | None, share: float = 0.0, by: str | None = None, force: bool = False) -> dict:
        """Run ``version`` beside the promoted one: audited, not returned (``share`` 0), or returned for that share of
        requests (a canary). ``version`` None stops the shadow."""
        if not 0.0 <= share <= 1.0:
            raise RegistryError(f"--share must lie in [0, 1] (got {share})")
        with self._update() as s:
            if version is not None:
                if share > 0:
                    self._require_gate(s, version, force, "return answers from (canary)")
                elif version not in s["versions"]:
                    raise RegistryError(f"version {version} is not registered in {self.root}")
                if version == s.get("promoted"):
                    raise RegistryError(f"version {version} is the promoted version; shadow another one")
            previous = (s.get("shadow") or {}).get("version")
            s["shadow"] = {"version": version, "share": share} if version is not None else None
            self._log(s, "shadow" if version else "shadow_off", version, by, share=share, previous=previous)
            return s

    def rollback(self, by: str | None = None) -> dict:
        """Back to the version promoted before the current one (following earlier rollbacks back in history)."""
        with self._update() as s:
            current = s.get("promoted")
            if current is None:
                raise RegistryError("nothing is promoted, so there is nothing to roll back")
            target = previous_promoted(s["history"])
            if target is None:
                raise RegistryError(f"version {current} is the first promoted version; there is none to roll back to")
            s["promoted"] = target
            if (s.get("shadow") or {}).get("version") == target:
                s["shadow"] = None
            self._log(s, "rollback", target, by, previous=current)
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
