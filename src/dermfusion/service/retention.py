"""Stored images (``audit.store_images``): what is kept, how, and for how long.

- **Kept without metadata**: an image is decoded as the model saw it (``data.images.decode_image``: EXIF rotation
  applied, any mode → RGB) and re-encoded as a PNG built from the pixels alone — the upload's EXIF (names, dates of
  birth, record numbers, GPS, camera serials), XMP, ICC profile and comments never reach the disk.
- **Private**: folders 0700, files 0600, whatever the process umask.
- **For ``audit.retention_days``**: ``purge_images`` (``dermfusion audit purge``) deletes the images of audit rows
  older than that and records when (``images_purged_at``), then sweeps any file left in a day folder past the
  cut-off (an image whose analysis was never audited). The audit row itself stays — it holds no image.
"""
from __future__ import annotations

import io
import logging
from datetime import datetime, timedelta, timezone
from pathlib import Path

from PIL import Image

from ..data.images import decode_image
from .privacy import private_dir, write_private

log = logging.getLogger("dermfusion.service")
DAY_FORMAT = "%Y%m%d"


def clean_png(data: bytes, max_pixels: int) -> bytes:
    """The image's pixels only, as PNG: decoded as the model saw them, then copied into a fresh image (no ``info``:
    no EXIF, XMP, ICC profile, text chunks or comments)."""
    img = decode_image(data, "stored image", max_pixels)
    rgb = img.convert("RGB")
    bare = Image.frombytes("RGB", rgb.size, rgb.tobytes())
    buf = io.BytesIO()
    bare.save(buf, format="PNG", optimize=False)
    return buf.getvalue()


def store_images(config, request_id: str, images: dict) -> list[str]:
    """Store an analysis' images (``{modality: (bytes, format)}``) as ``<image_dir>/<UTC day>/<request id>_<modality>
    .png``; the paths written, relative to ``image_dir`` (recorded in the audit row for the purge)."""
    root = Path(config.audit.image_dir).expanduser()
    day = datetime.now(timezone.utc).strftime(DAY_FORMAT)
    folder = private_dir(root / day)
    out = []
    for modality, (data, _fmt) in images.items():
        name = f"{request_id}_{modality}.png"  # the request id is 8–64 safe characters (middleware)
        write_private(folder / name, clean_png(data, config.limits.max_pixels))
        out.append(f"{day}/{name}")
    return out


def _inside(root: Path, rel: str) -> Path | None:
    p = (root / rel).resolve()
    return p if p.is_relative_to(root.resolve()) else None


def purge_images(store, image_dir: str | Path, retention_days: int, now: datetime | None = None,
                 dry_run: bool = False) -> dict:
    """Delete the images of audit rows older than ``retention_days`` and record it in each row; then delete any file
    left in a day folder wholly before the cut-off. Returns counts (and the cut-off)."""
    if retention_days < 1:
        raise ValueError("retention_days must be at least 1")
    now = now or datetime.now(timezone.utc)
    cutoff = now - timedelta(days=retention_days)
    root = Path(image_dir).expanduser()
    rows = store.images_due(cutoff)
    files = 0
    for row in rows:
        listed = row.get("image_files")
        if listed is None:  # stored by an older version: <day>/<request id>_<modality>.<ext>, day of storing
            created = row["created_at"]
            days = {(created - timedelta(days=d)).strftime(DAY_FORMAT) for d in (0, 1)}
            candidates = [p for d in days for p in (root / d).glob(f"{row['request_id']}_*")]
        else:
            candidates = [p for p in (_inside(root, rel) for rel in listed) if p is not None]
        for p in candidates:
            if p.is_file():
                files += 1
                if not dry_run:
                    p.unlink()
    if rows and not dry_run:
        store.mark_images_purged([r["request_id"] for r in rows], now)
    orphans = 0
    last_day = (cutoff - timedelta(days=1)).strftime(DAY_FORMAT)  # a folder of that day or earlier is all past
    if root.is_dir():
        for folder in sorted(p for p in root.iterdir() if p.is_dir() and p.name.isdigit() and len(p.name) == 8):
            if folder.name > last_day:
                continue
            for p in folder.iterdir():
                if p.is_file():
                    orphans += 1
                    if not dry_run:
                        p.unlink()
            if not dry_run and not any(folder.iterdir()):
                folder.rmdir()
    log.info("purge: %d audit row(s), %d image file(s), %d unaudited file(s) older than %s%s", len(rows), files,
             orphans, cutoff.isoformat(timespec="seconds"), " (dry run)" if dry_run else "")
    return {"cutoff": cutoff.isoformat(timespec="seconds"), "rows": len(rows), "files": files, "unaudited_files": orphans,
            "dry_run": dry_run}
