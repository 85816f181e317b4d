"""Which model answers a request: the deployment (promoted analyzer, optional shadow / canary) and, when the service
runs from a model registry (``bundle.registry``), the watcher that loads versions and swaps deployments.

A ``Deployment`` is immutable; the service holds one reference to the current one (``state.deployment``) and
replaces it with a single assignment. A request takes that reference once, at its start, and uses only it — so
a promotion or rollback arriving mid-request never mixes versions in one answer or one audit row. New versions are
loaded, verified against the hashes recorded at registration and warmed *before* the swap; the previous analyzers
stay cached, so a rollback is a swap, not a reload.
"""
from __future__ import annotations

import hashlib
import hmac
import logging
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path

from ..bundle.registry import Registry, RegistryError, previous_promoted
from ..evaluation.drift_reference import read_reference_stats
from .analyzer import Analyzer
from .case_mix import CaseMixMonitor
from .drift import DriftMonitor
from .integrity import BundleIntegrityError, verify_predictor, verify_served
from .state import load_served_predictor

log = logging.getLogger("dermfusion.service")
KEEP_OTHERS = 2  # loaded versions kept besides the promoted, shadow and rollback target (most recently used)


@dataclass(frozen=True)
class Model:
    analyzer: Analyzer
    version: str | None       # registry version (None: served without a registry)
    role: str | None          # promoted | canary | shadow (None without a registry)


@dataclass(frozen=True)
class Deployment:
    primary: Analyzer
    version: str | None = None
    shadow: Analyzer | None = None
    shadow_version: str | None = None
    share: float = 0.0                 # share of requests the shadow answers (canary); 0 = audited only
    salt: bytes = field(default_factory=lambda: canary_secret(), repr=False)  # the server's secret for the split

    def route(self, request_id: str) -> tuple[Model, list[Model]]:
        """(the model that answers, the models run but not returned) for one request. Whether the canary answers is
        decided here, by a keyed hash (HMAC with the server's secret) of the request id: a client that chooses its
        request id cannot tell or choose which version will answer it."""
        promoted = Model(self.primary, self.version, "promoted" if self.version else None)
        if self.shadow is None:
            return promoted, []
        if self.share > 0 and canary_fraction(request_id, self.salt) < self.share:
            return Model(self.shadow, self.shadow_version, "canary"), [promoted]
        return promoted, [Model(self.shadow, self.shadow_version, "shadow")]


_SECRET: list[bytes] = []


def canary_secret() -> bytes:
    """``DERMFUSION_CANARY_SECRET`` (set the same value in every process behind one load balancer, so an id is split
    the same way everywhere), else 32 random bytes drawn once per process."""
    if not _SECRET:
        env = os.environ.get("DERMFUSION_CANARY_SECRET", "")
        _SECRET.append(hashlib.sha256(env.encode()).digest() if env else os.urandom(32))
    return _SECRET[0]


def canary_fraction(request_id: str, secret: bytes) -> float:
    """A number in [0, 1) that only the server can compute from the id: HMAC-SHA256(secret, id)."""
    return int.from_bytes(hmac.new(secret, request_id.encode(), hashlib.sha256).digest()[:8], "big") / 2 ** 64


class RegistryWatcher:
    """Loads the registry's promoted and shadow versions into the service and follows changes to ``registry.json``
    (polled every ``poll_s``, or at once via ``refresh`` after an admin call)."""

    def __init__(self, state, root: str | Path, poll_s: float = 2.0, warmup: bool = True):
        self.state, self.registry, self.poll_s, self.warmup = state, Registry(root), poll_s, warmup
        self._cache: dict[str, Analyzer] = {}
        self._lock = threading.RLock()  # one loader at a time: admin calls and the poller share the cache
        self._seen = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.error: str | None = None   # the last failed refresh (/readyz warning); the previous deployment stays

    def analyzer(self, version: str) -> Analyzer:
        """The analyzer of a registered version: cached, else verified (hashes as registered), loaded and warmed."""
        with self._lock:
            return self._analyzer(version)

    def _analyzer(self, version: str) -> Analyzer:
        if version in self._cache:
            self._cache[version] = self._cache.pop(version)  # most recently used last
            return self._cache[version]
        entry = self.registry.version(version)
        verified = verify_served(entry["bundle"])
        have = sorted(v.hash for v in verified.values())
        want = sorted(b["hash"] for b in entry["bundles"])
        if not set(want) <= set(have):
            raise BundleIntegrityError(f"version {version}: the bundle at {entry['bundle']} is not the one registered "
                                       f"(content hash {have[0][:16] if have else 'missing'}…, registered "
                                       f"{want[0][:16]}…); register it as a new version")
        an = Analyzer(load_served_predictor(Path(entry["bundle"]), self.state.config.device), self.state.config)
        verify_predictor(an.predictor, verified)
        if self.warmup:
            secs = an.warmup()
            log.info("registry version %s loaded and warmed in %.2f s", version, secs)
        else:
            an.ready = True
        self._cache[version] = an
        return an

    def refresh(self, force: bool = False) -> bool:
        """Re-read the registry; when it changed, load what it names and swap the deployment. True if swapped."""
        with self._lock:
            rev = self.registry.revision()
            if rev == self._seen and not force:
                return False
            s = self.registry.read()
            if not s.get("promoted"):
                raise RegistryError(f"registry {self.registry.root} has no promoted version: "
                                    "dermfusion registry promote VERSION")
            primary = self.analyzer(s["promoted"])
            sh = s.get("shadow") or {}
            shadow = self.analyzer(sh["version"]) if sh.get("version") else None
            dep = Deployment(primary, s["promoted"], shadow, sh.get("version"), float(sh.get("share") or 0.0))
            self._seen = rev
            old = self.state.deployment
            changed = old is None or (old.version, old.shadow_version, old.share) != \
                (dep.version, dep.shadow_version, dep.share)
            if changed:
                install(self.state, dep)
                log.info("registry: version %s answers%s", dep.version, f"; {dep.shadow_version} as "
                         f"{'canary (share %.2f)' % dep.share if dep.share else 'shadow'}" if shadow else "")
            keep = {s["promoted"], sh.get("version"), previous_promoted(s["history"])}
            for v in [v for v in self._cache if v not in keep][:-KEEP_OTHERS or None]:
                del self._cache[v]   # requests holding the old deployment keep their own reference
            self.error = None
            return changed

    def start(self) -> None:
        self._thread = threading.Thread(target=self._poll, name="dermfusion-registry", daemon=True)
        self._thread.start()

    def _poll(self) -> None:
        while not self._stop.wait(self.poll_s):
            try:
                self.refresh()
            except Exception as e:  # noqa: BLE001 — keep serving the current deployment; /readyz warns
                self.error = f"registry change not applied: {type(e).__name__}: {e}"
                log.error("%s", self.error)
                self._seen = self.registry.revision()  # retry only after the next change

    def close(self) -> None:
        self._stop.set()


def install(state, dep: Deployment) -> None:
    """Make ``dep`` the current deployment (one assignment each: a request reads ``state.deployment`` once)."""
    an = dep.primary
    state.analyzer = an
    state.model_card = None
    if state.deployment is None or state.deployment.primary is not an:
        ref = read_reference_stats(an.bundle.path) if an.bundle.path else None
        c = state.config.drift
        state.drift = DriftMonitor(ref, c.window, c.min_samples)  # the window describes the answering model
        state.case_mix = CaseMixMonitor(an.task.classes, an.engine.rules.training_prior,
                                        state.config.prior.estimate_window)
    state.deployment = dep
    m = state.metrics
    m.model_info.clear()
    r = an.model_ref
    m.model_info.labels(r["name"], r["version"], r["hash"][:16], r["task"]).set(1)
    m.expected_rate.clear()
    expected = an.engine.rules.expected_rates([an.bundle.path, *(n.bundle.path for n in an.model_pass.networks[:1])])
    if expected is not None:
        m.expected_rate.labels("referral").set(expected["referral_rate"])
        m.expected_rate.labels("urgent").set(expected["urgent_rate"])
    m.registry_version.clear()
    if dep.version:
        m.registry_version.labels(dep.version, "promoted").set(1)
    if dep.shadow_version:
        m.registry_version.labels(dep.shadow_version, "canary" if dep.share else "shadow").set(dep.share or 1)
