"""Health that tells the truth about the audit store: opened at start-up and, while it cannot be, reopened in the
background with exponential backoff (the model loads meanwhile; ``/readyz`` says why it is not ready); once open,
``/readyz`` asks it for a committed write (``AuditStore.probe_write``), at most once per ``probe_interval_s``, so a
store that stopped accepting writes turns the service not-ready instead of failing only the requests."""
from __future__ import annotations

import logging
import threading
import time

from .audit import AuditStore, describe_url

log = logging.getLogger("dermfusion.service")


def _why(e: BaseException) -> str:
    first = (str(e).strip().splitlines() or [""])[0][:200]
    return f"{type(e).__name__}: {first}" if first else type(e).__name__


class AuditKeeper:
    """Owns ``state.audit``: ``start()`` once, ``check()`` from /readyz, ``failed()`` after a write error,
    ``close()`` at shutdown. ``opener`` builds the store (tests inject failures)."""

    def __init__(self, state, *, first_delay_s: float = 0.5, max_delay_s: float = 30.0,
                 probe_interval_s: float = 1.0, opener=AuditStore):
        self.state, self.opener = state, opener
        self.first_delay_s, self.max_delay_s, self.probe_interval_s = first_delay_s, max_delay_s, probe_interval_s
        self.attempts = 0
        self.error: str | None = None       # why the store is not open / not writable (logged in full)
        self._checked: tuple[float, bool, str | None] | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    @property
    def url(self) -> str:
        return self.state.config.audit.db_url

    def start(self) -> bool:
        """Open the store now; on failure keep retrying in the background. True when it is open."""
        if self._open():
            return True
        if self._thread is None:
            self._thread = threading.Thread(target=self._retry, name="dermfusion-audit-retry", daemon=True)
            self._thread.start()
        return False

    def _open(self) -> bool:
        self.attempts += 1
        store = None
        try:
            store = self.opener(self.url)
            store.probe_write()  # a store that cannot write is not open
        except Exception as e:  # noqa: BLE001 — reported by /readyz and retried, never fatal
            self.error = _why(e)
            log.error("audit store %s unavailable (attempt %d): %s", describe_url(self.url), self.attempts, self.error)
            if store is not None:
                store.close()
            return False
        with self._lock:
            self.state.audit, self.error, self._checked = store, None, None
        log.info("audit store: %s", store.describe())
        return True

    def _retry(self) -> None:
        delay = self.first_delay_s
        while not self._stop.wait(delay):
            if self.state.audit is not None or self._open():
                return
            delay = min(delay * 2, self.max_delay_s)

    def check(self) -> tuple[bool, str | None]:
        """(can write, why not) — a committed probe write, cached for ``probe_interval_s``."""
        store = self.state.audit
        if store is None:
            return False, "audit store unavailable; retrying" + (f" ({self.error.split(':')[0]})" if self.error else "")
        now = time.monotonic()
        cached = self._checked
        if cached is not None and now - cached[0] < self.probe_interval_s:
            return cached[1], cached[2]
        try:
            store.probe_write()
            ok, detail, self.error = True, None, None
        except Exception as e:  # noqa: BLE001
            self.error = _why(e)
            log.error("audit store cannot write: %s", self.error)
            ok, detail = False, f"audit store cannot write ({type(e).__name__})"
        self._checked = (now, ok, detail)
        return ok, detail

    def failed(self) -> None:
        """A real audit write failed: the next check probes again instead of trusting its cache."""
        self._checked = None

    def close(self) -> None:
        self._stop.set()
        if self.state.audit is not None:
            self.state.audit.close()
