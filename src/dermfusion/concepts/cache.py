"""Concept scores on disk, keyed by the image's content (sha256 of the file bytes).

The same photo sent twice, or listed in two manifests, is scored once. The key also holds the scorer's identity
(model name + weights fingerprint + concept-set fingerprint), so new weights or edited prompts never return stale
scores. One small JSON file per image: ``<root>/<scorer key>/<sha[:2]>/<sha>.json`` — written atomically.
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path


def default_cache_dir() -> Path:
    """``$DERMFUSION_CACHE_DIR/concepts``, else ``$XDG_CACHE_HOME/dermfusion/concepts`` (``~/.cache`` default)."""
    root = os.environ.get("DERMFUSION_CACHE_DIR")
    if root:
        return Path(root).expanduser() / "concepts"
    xdg = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(xdg).expanduser() / "dermfusion" / "concepts"


def content_hash(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class ConceptCache:
    """``get(sha) -> {concept: score} | None`` and ``put(sha, scores)`` for one scorer (``scorer_key``)."""

    def __init__(self, root: str | os.PathLike | None, scorer_key: str):
        safe = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in scorer_key)
        if len(safe) > 120:  # a long model path: cut, the fingerprints at the end would be lost — a digest keeps them
            safe = f"{safe[:103]}-{hashlib.sha256(scorer_key.encode('utf-8')).hexdigest()[:16]}"
        self.root = Path(root if root is not None else default_cache_dir()) / safe
        self.hits = self.misses = 0

    def _file(self, sha: str) -> Path:
        return self.root / sha[:2] / f"{sha}.json"

    def get(self, sha: str) -> dict[str, float] | None:
        f = self._file(sha)
        try:
            scores = json.loads(f.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            self.misses += 1
            return None
        self.hits += 1
        return {str(k): float(v) for k, v in scores.items()}

    def put(self, sha: str, scores: dict[str, float]) -> None:
        f = self._file(sha)
        f.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=f.parent, suffix=".tmp")
        with os.fdopen(fd, "w", encoding="utf-8") as out:
            json.dump({k: float(v) for k, v in scores.items()}, out)
        os.replace(tmp, f)
