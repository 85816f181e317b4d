"""Guards around one analysis request, both decided before the answer is committed:

- **request id used once**: a client-supplied ``X-Request-ID`` names one audit row, so an id that is in flight or
  already audited is refused with 409 *before* any work (never a 503 after the model ran);
- **time budget** (``workers.request_timeout_s``, counted from the request's first byte): an answer not ready in
  time is a 503 + Retry-After, and then nothing is recorded — the worker checks the ticket before it writes the
  audit row, so a client is never told "failed" for an analysis that was recorded (or the other way round).
"""
from __future__ import annotations

import asyncio
import threading
from contextlib import asynccontextmanager

from .inputs import InputError
from .state import AuditUnavailable, ServiceState


@asynccontextmanager
async def request_id_claim(state: ServiceState, rid: str, supplied: bool):
    """Hold ``rid`` for the request; 409 ``duplicate_request_id`` when another request holds it or the audit
    trail has it already. Ids the service generated are unique and not looked up."""
    if not supplied:
        yield
        return
    if rid in state.request_ids:
        raise InputError(409, "duplicate_request_id", "this X-Request-ID is in use by a request still running; "
                         "send a new id per request (or none: the service makes one)")
    state.request_ids.add(rid)  # claimed before the lookup's await, so a twin request sees it
    try:
        if await asyncio.to_thread(_audited, state, rid):
            raise InputError(409, "duplicate_request_id", "this X-Request-ID was already used for an analysis that "
                             "is recorded in the audit trail; send a new id per request (or none)")
        yield
    finally:
        state.request_ids.discard(rid)


def _audited(state: ServiceState, rid: str) -> bool:
    store = state.audit
    if store is None:
        return False  # no store: the audit write decides (before the answer, per audit.required)
    try:
        return store.get(rid) is not None
    except Exception:  # noqa: BLE001 — the store is failing: say so now, before any work
        if state.config.audit.required:
            raise AuditUnavailable("the audit store cannot be read; retry shortly") from None
        return False


class Ticket:
    """Shared by the event loop and the worker thread of one request: whichever comes first wins — the worker
    ``commit``s (records and answers) or the loop ``abandon``s (budget spent: 503, nothing recorded)."""

    def __init__(self):
        self._lock = threading.Lock()
        self.abandoned = self.committed = False

    def commit(self) -> bool:
        with self._lock:
            self.committed = not self.abandoned
            return self.committed

    def abandon(self) -> bool:
        with self._lock:
            self.abandoned = not self.committed
            return self.abandoned


async def run_within(pool, fn, ticket: Ticket, seconds: float, budget: float):
    """``pool.run(fn)`` if it answers within ``seconds``; else the ticket is abandoned and 503 ``timeout`` — unless
    the worker had already committed, whose answer (being recorded) is then awaited and returned."""
    task = asyncio.ensure_future(pool.run(fn))
    try:
        return await asyncio.wait_for(asyncio.shield(task), timeout=max(0.0, seconds))
    except asyncio.TimeoutError:
        if not ticket.abandon():
            return await task
        task.cancel()  # frees its queue place; a running analysis finishes in its thread and records nothing
        raise InputError(503, "timeout", f"no answer within the request's time budget of {budget:g} s (server "
                         "busy or the analysis too slow); nothing was recorded — retry later") from None
