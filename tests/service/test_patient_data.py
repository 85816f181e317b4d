"""Issue 32, finding 5 — patient data at rest. With ``store_images: true`` the uploaded bytes were kept with all their
metadata (a name, a date of birth, a record number, GPS and a camera serial), image files and the audit database
were world-readable, nothing was ever deleted, and the age was stored to nine decimals. Now: images are re-encoded
from their pixels (no EXIF, XMP, ICC or comment), files are 0600 in 0700 folders, the audit database is 0600,
``audit.retention_days`` + ``dermfusion audit purge`` delete old images and say so in the audit row, and ages are
stored in whole years. (/metrics behind a scope: test_access_roles.)"""
from __future__ import annotations

import io
import json
import os
import stat
from datetime import datetime, timedelta, timezone
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image, ImageCms
from typer.testing import CliRunner

from cli_helpers import squash
from service_fixtures import fixture_image_bytes, fixture_images, tiny_bundle, tiny_predictor  # noqa: F401

pytest.importorskip("fastapi")
from fastapi.testclient import TestClient  # noqa: E402
from sqlalchemy import update  # noqa: E402
from sqlalchemy.orm import Session  # noqa: E402

from dermfusion.cli import app as cli  # noqa: E402
from dermfusion.service.app import create_app  # noqa: E402
from dermfusion.service.audit import AuditRecord, AuditStore  # noqa: E402
from dermfusion.service.config import load_service_config  # noqa: E402
from dermfusion.service.retention import purge_images  # noqa: E402

SECRETS = ("Jane Doe", "1950-01-01", "MRN-123456", "SN-998877", "Ward 7")


def tagged_jpeg(data: bytes) -> bytes:
    """The fixture photo carrying what a clinic camera or phone writes: EXIF (name, date of birth, record number,
    camera serial, GPS), XMP, an ICC profile and a comment."""
    img = Image.open(io.BytesIO(data)).convert("RGB")
    exif = Image.Exif()
    exif[0x013B] = SECRETS[0]                                      # Artist
    exif[0x010E] = f"DOB {SECRETS[1]} {SECRETS[2]}"                # ImageDescription
    exif.get_ifd(0x8769)[0xA431] = SECRETS[3]                      # BodySerialNumber (Exif IFD)
    exif.get_ifd(0x8825).update({1: "N", 2: (51.0, 30.0, 12.5), 3: "W", 4: (0.0, 7.0, 40.0)})  # GPS
    xmp = (f'<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#">'
           f'<rdf:Description xmlns:dc="http://purl.org/dc/elements/1.1/" dc:creator="{SECRETS[0]}"/></rdf:RDF>'
           '</x:xmpmeta>').encode()
    icc = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=95, exif=exif, icc_profile=icc, comment=SECRETS[4].encode(), xmp=xmp)
    out = buf.getvalue()
    for s in SECRETS:
        assert s.encode() in out, s  # the upload really carries them
    return out


def _config(tmp_path, **audit):
    return load_service_config(None, env={}, backend="fp32", audit={
        "db_url": f"sqlite:///{tmp_path}/data/audit.db", "store_images": True, "image_dir": str(tmp_path / "images"),
        "retention_days": 30, **audit})


@pytest.fixture
def stored(tmp_path, tiny_bundle, tiny_predictor, fixture_image_bytes):
    """One analysis of the tagged photo with images stored: (config, request id, upload bytes)."""
    cfg = _config(tmp_path)
    upload = tagged_jpeg(fixture_image_bytes)
    with TestClient(create_app(tiny_bundle, cfg, predictor=tiny_predictor, warmup=False)) as c:
        r = c.post("/v1/analyze?explain=false", files={"dermoscopic": ("d.jpg", upload, "image/jpeg")},
                   data={"metadata": json.dumps({"age": 61.748291003, "sex": "female"})})
        assert r.status_code == 200, r.text
    return cfg, r.json()["request_id"], upload


def test_stored_images_carry_no_metadata(stored):
    cfg, rid, upload = stored
    (path,) = list(Path(cfg.audit.image_dir).rglob("*.png"))
    assert path.name == f"{rid}_dermoscopic.png"
    data = path.read_bytes()
    for s in SECRETS:
        assert s.encode() not in data, s
    img = Image.open(path)
    assert not {"exif", "icc_profile", "xmp", "XML:com.adobe.xmp", "comment"} & set(img.info), img.info
    assert img.getexif() == {} or len(img.getexif()) == 0
    # the pixels are the ones the model saw (decoded as the service decodes)
    assert np.array_equal(np.asarray(img.convert("RGB")), np.asarray(Image.open(io.BytesIO(upload)).convert("RGB")))


def test_files_are_private(stored):
    cfg, rid, _ = stored
    (path,) = list(Path(cfg.audit.image_dir).rglob("*.png"))
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    db = Path(cfg.audit.db_url.removeprefix("sqlite:///"))
    assert stat.S_IMODE(db.stat().st_mode) == 0o600 and stat.S_IMODE(db.parent.stat().st_mode) == 0o700
    # an audit database left world-readable by an older version is narrowed when the service opens it
    os.chmod(db, 0o644)
    AuditStore(cfg.audit.db_url).close()
    assert stat.S_IMODE(db.stat().st_mode) == 0o600


def test_age_is_stored_in_whole_years(stored):
    cfg, rid, _ = stored
    row = AuditStore(cfg.audit.db_url).get(rid)
    assert row["patient_metadata"]["age"] == 61 and isinstance(row["patient_metadata"]["age"], int)
    assert "61.74" not in json.dumps(row, default=str)


def test_retention_purge_deletes_old_images_and_says_so(stored, tmp_path):
    cfg, rid, _ = stored
    store = AuditStore(cfg.audit.db_url)
    row = store.get(rid)
    assert row["images_stored"] and row["image_files"] and row["images_purged_at"] is None
    root = Path(cfg.audit.image_dir)
    (path,) = list(root.rglob("*.png"))
    # within the retention period nothing goes
    assert purge_images(store, root, 30)["rows"] == 0 and path.exists()
    # an unaudited leftover in a day folder past the cut-off goes too (e.g. an analysis whose audit write failed)
    (root / "20000101").mkdir()
    (root / "20000101" / "orphan_dermoscopic.png").write_bytes(b"x")
    # the CLI, after the row aged past the period: the image deleted, the row says when, the row itself kept
    with Session(store.engine) as s, s.begin():
        s.execute(update(AuditRecord).where(AuditRecord.request_id == rid)
                  .values(created_at=datetime.now(timezone.utc) - timedelta(days=31)))
    yml = tmp_path / "service.yaml"
    yml.write_text(yaml.safe_dump({"audit": cfg.audit.model_dump()}))
    res = CliRunner().invoke(cli, ["audit", "purge", "--config", str(yml), "--dry-run"])
    assert res.exit_code == 0, res.output
    assert "would delete the images of 1 audited analyses (1 file(s)) and 1 unaudited file(s)" in squash(res.output)
    assert path.exists()
    res = CliRunner().invoke(cli, ["audit", "purge", "--config", str(yml)])
    assert res.exit_code == 0, res.output
    assert not path.exists() and not (root / "20000101").exists()
    row = store.get(rid)
    assert row is not None and row["images_stored"] and row["images_purged_at"] is not None
    assert "purge" in squash(CliRunner().invoke(cli, ["audit", "purge", "--help"]).output)
    # no retention configured: the verb says what to set
    yml.write_text(yaml.safe_dump({"audit": {**cfg.audit.model_dump(), "retention_days": None}}))
    res = CliRunner().invoke(cli, ["audit", "purge", "--config", str(yml)])
    assert res.exit_code == 2 and "retention_days" in squash(res.output)
    store.close()
