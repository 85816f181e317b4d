"""Per-key rate limits and a daily quota, in memory (``rate_limits`` in service.yaml).

A token bucket per (key, kind) — ``analyze`` for ``POST /v1/analyze``, ``other`` for every other keyed route —
refills at the configured rate up to its burst; a request that finds it empty is refused with 429 and the seconds
until a token is back. The quota counts analyses per key per UTC day. Decided in the middleware, before the body
is read. The state is per process (several processes each count their own: put a global limit in the reverse
proxy); keys are few, so the tables stay small.
"""
from __future__ import annotations

import math
import threading
import time
from datetime import datetime, timedelta, timezone


class TokenBucket:
    """``rate`` tokens per second up to ``capacity``; ``take()`` → (allowed, seconds until the next token)."""

    def __init__(self, rate: float, capacity: int, now: float):
        self.rate, self.capacity = rate, capacity
        self.tokens, self.stamp = float(capacity), now

    def take(self, now: float) -> tuple[bool, float]:
        self.tokens = min(self.capacity, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return True, 0.0
        return False, (1.0 - self.tokens) / self.rate


class RateLimiter:
    def __init__(self, config, clock=time.monotonic, today=lambda: datetime.now(timezone.utc)):
        self.config, self.clock, self.today = config, clock, today
        self._buckets: dict[tuple[str, str], TokenBucket] = {}
        self._days: dict[str, tuple[str, int]] = {}
        self._lock = threading.Lock()

    def check(self, key, analysis: bool) -> tuple[str, str, int] | None:
        """None when ``key`` (``auth.Key``) may go on; else (code, message, Retry-After seconds)."""
        c = self.config
        per_minute = (key.analyses_per_minute if key.analyses_per_minute is not None else c.analyses_per_minute) \
            if analysis else c.requests_per_minute
        burst = c.analysis_burst if analysis else c.request_burst
        quota = (key.analyses_per_day if key.analyses_per_day is not None else c.analyses_per_day) if analysis else 0
        with self._lock:
            if quota:
                day = self.today().strftime("%Y-%m-%d")
                seen_day, used = self._days.get(key.id, (day, 0))
                used = used if seen_day == day else 0
                if used >= quota:
                    return ("quota_exceeded", f"this key's daily quota of {quota} analyses is used up; it resets at "
                            "00:00 UTC", _seconds_to_midnight(self.today()))
            if per_minute:
                kind = "analyze" if analysis else "other"
                now = self.clock()
                bucket = self._buckets.get((key.id, kind))
                if bucket is None or bucket.rate != per_minute / 60.0:
                    bucket = self._buckets[(key.id, kind)] = TokenBucket(per_minute / 60.0, burst, now)
                ok, wait = bucket.take(now)
                if not ok:
                    return ("rate_limited", f"too many requests for this key (limit {per_minute:g} per minute); "
                            "retry after the Retry-After interval", max(1, math.ceil(wait)))
            if quota:
                self._days[key.id] = (day, used + 1)
        return None


def _seconds_to_midnight(now: datetime) -> int:
    tomorrow = (now + timedelta(days=1)).replace(hour=0, minute=0, second=0, microsecond=0)
    return max(1, math.ceil((tomorrow - now).total_seconds()))
