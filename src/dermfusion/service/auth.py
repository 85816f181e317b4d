"""Who may do what: named API keys with scopes, checked in the middleware before any body is read.

A key is a random secret (``dermfusion keys new ID --scope analyze`` makes one, 256 bits) known to its holder;
the service keeps only its **id** (a short name that audit, feedback and registry-history rows record instead of
anything derived from the secret), its **scopes** and a **salted SHA-256** of the secret (``sha256:<salt>:<digest>``,
a fresh 16-byte salt per key). A presented key is hashed with every configured key's salt and compared in
constant time against all of them (no early exit), so timing says nothing about which key nearly matched. A
fast hash is sound here because the secrets are random and long; a human-chosen password would need a slow one
(keys shorter than ``MIN_KEY_CHARS`` draw a warning at start).

Scopes (docs/SERVICE.md, "Roles"):

- ``analyze``  — ``POST /v1/analyze``, the model and its card (the clinician page, an EHR integration);
- ``feedback`` — ``POST /v1/feedback`` (confirmed diagnoses and their amendments: a pathology or follow-up feed);
- ``admin``    — ``/v1/admin/*`` (promote, shadow / canary, rollback, the registry), ``/v1/performance``, ``/metrics``;
- ``metrics``  — ``/metrics`` only (a Prometheus scraper).

Any key may read ``/v1/model`` and the model card. Without keys the service is open for analysis only (a local
demo on loopback): feedback, performance and admin routes then answer 403, since nobody could be held to them.
"""
from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from dataclasses import dataclass

SCOPES = ("analyze", "feedback", "admin", "metrics")
KEY_ID = re.compile(r"^[a-z0-9][a-z0-9._-]{0,31}$")
MIN_KEY_CHARS = 32
_HASH = re.compile(r"^sha256:([0-9a-f]{32}):([0-9a-f]{64})$")

ANY_KEY = frozenset(SCOPES)
# path → the scopes any one of which grants the route; paths not listed and outside /v1/ are public
ROUTE_SCOPES: dict[str, frozenset[str]] = {
    "/v1/analyze": frozenset({"analyze"}),
    "/v1/model": ANY_KEY,
    "/v1/model-card": ANY_KEY,
    "/v1/model-card.html": ANY_KEY,
    "/v1/feedback": frozenset({"feedback"}),
    "/v1/performance": frozenset({"admin"}),
    "/metrics": frozenset({"metrics", "admin"}),
}
ADMIN = frozenset({"admin"})
# routes that hold someone to account: refused outright (403) when the service has no keys at all
NEEDS_KEYS = ("/v1/feedback", "/v1/performance", "/v1/admin/")


def required_scopes(path: str) -> frozenset[str] | None:
    """The scopes that grant ``path`` (any one suffices); None for a public route. Unknown ``/v1/`` paths need
    ``admin`` (fail closed)."""
    if path in ROUTE_SCOPES:
        return ROUTE_SCOPES[path]
    if path.startswith("/v1/"):
        return ADMIN
    return None


def needs_keys(path: str) -> bool:
    return any(path == p or (p.endswith("/") and path.startswith(p)) for p in NEEDS_KEYS)


def new_key() -> str:
    """A fresh random API key (256 bits, URL-safe)."""
    return secrets.token_urlsafe(32)


def hash_key(key: str, salt: bytes | None = None) -> str:
    """``sha256:<salt hex>:<digest hex>`` of ``key`` with a fresh random salt (or ``salt``)."""
    salt = secrets.token_bytes(16) if salt is None else salt
    return f"sha256:{salt.hex()}:{hashlib.sha256(salt + key.encode()).hexdigest()}"


def parse_hash(value: str) -> tuple[bytes, bytes]:
    """(salt, digest) of a stored key hash; ValueError naming the expected form."""
    m = _HASH.match(value or "")
    if not m:
        raise ValueError("a key hash has the form sha256:<32 hex salt>:<64 hex digest> "
                         "(dermfusion keys new ID --scope SCOPE prints one)")
    return bytes.fromhex(m.group(1)), bytes.fromhex(m.group(2))


def presented_key(headers: dict[str, str], header: str) -> str:
    """The key a request presents: the configured header (``X-API-Key``), else ``Authorization: Bearer <key>``
    (what Prometheus' scrape ``authorization`` setting sends)."""
    key = headers.get(header.lower(), "")
    if not key:
        auth = headers.get("authorization", "")
        if auth[:7].lower() == "bearer ":
            key = auth[7:].strip()
    return key


@dataclass(frozen=True)
class Key:
    id: str
    scopes: frozenset[str]
    salt: bytes
    digest: bytes
    analyses_per_minute: float | None = None   # None: the service's rate_limits default
    analyses_per_day: int | None = None

    def allows(self, scopes: frozenset[str]) -> bool:
        return bool(self.scopes & scopes)


class KeyRing:
    """The configured keys (``auth.keys``). Truthy when any key is configured."""

    def __init__(self, keys: list[Key]):
        ids = [k.id for k in keys]
        if len(set(ids)) != len(ids):
            raise ValueError("auth.keys: key ids must be unique")
        self.keys = list(keys)

    @classmethod
    def from_config(cls, auth) -> "KeyRing":
        out = []
        for k in auth.keys:
            salt, digest = parse_hash(k.hash)
            out.append(Key(k.id, frozenset(k.scopes), salt, digest, k.analyses_per_minute, k.analyses_per_day))
        return cls(out)

    def __bool__(self) -> bool:
        return bool(self.keys)

    def __len__(self) -> int:
        return len(self.keys)

    def identify(self, presented: str) -> Key | None:
        """The key ``presented`` is, or None. Every configured key is checked (constant time per key, no early
        exit), so the time taken does not depend on which key matched or nearly matched."""
        if not presented or len(presented) > 512:
            return None
        raw = presented.encode()
        found = None
        for k in self.keys:
            if hmac.compare_digest(hashlib.sha256(k.salt + raw).digest(), k.digest):
                found = k
        return found
