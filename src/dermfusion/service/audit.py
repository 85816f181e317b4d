"""The audit trail: one row per analysis, through SQLAlchemy (SQLite by default, any database URL).

A row says which model (name, version, content hash) saw which inputs (sha256 of the uploaded
bytes, validated structured metadata, image statistics — never the image itself and never free
text), what it answered (probabilities, risk, action, review flags) and how long it took. That is
enough to reproduce or contest any answer, and to compute drift later (``dermfusion drift``).

SQLite runs with a rollback journal (``journal_mode=DELETE``, ``synchronous=FULL``, no memory mapping), not WAL:
WAL keeps its index in a memory-mapped ``-shm`` file, and a fault on that file (unwritable, truncated, a full
disk) arrives as SIGBUS and kills the process; through ordinary file I/O the same fault is an error (the request
gets 503, ``/readyz`` turns 503). Audit writes are a few per second at most, so WAL's speed is not needed.
``probe_write`` commits one heartbeat row (table ``dermfusion_audit_probe``): ``/readyz`` asks it, because a
database that still answers ``SELECT 1`` may no longer accept a write.
"""
from __future__ import annotations

import contextlib
import threading
from datetime import datetime, timezone

from sqlalchemy import (JSON, Boolean, DateTime, Float, Integer, String, UniqueConstraint, create_engine, event,
                        inspect, select, text, update)
from sqlalchemy.engine import Engine, make_url
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

from .feedback import AMENDMENT_REASONS, CONFIRMATION_STRENGTH, FEEDBACK_CONFIRMATIONS, resolve_feedback
from .privacy import private_sqlite_file, whole_years

TABLE = "dermfusion_audit"


class _Base(DeclarativeBase):
    pass


class AuditRecord(_Base):
    __tablename__ = TABLE

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    request_id: Mapped[str] = mapped_column(String(64), unique=True, index=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), index=True)
    model_name: Mapped[str] = mapped_column(String(200))
    model_version: Mapped[str] = mapped_column(String(100))
    model_hash: Mapped[str] = mapped_column(String(64), index=True)
    model_members: Mapped[list | None] = mapped_column(JSON, nullable=True)  # [{name, version, hash}] per member
    task: Mapped[str] = mapped_column(String(50))
    input_hashes: Mapped[dict] = mapped_column(JSON)        # {modality: sha256 of the uploaded bytes}
    input_stats: Mapped[dict] = mapped_column(JSON)         # {modality: {brightness, contrast, …}}
    patient_metadata: Mapped[dict] = mapped_column(JSON)    # validated structured fields only
    outputs: Mapped[dict] = mapped_column(JSON)             # {class: calibrated probability}
    primary_class: Mapped[str] = mapped_column(String(32))
    top_probability: Mapped[float] = mapped_column(Float)
    risk_score: Mapped[float] = mapped_column(Float)
    action: Mapped[str] = mapped_column(String(32), index=True)
    review_recommended: Mapped[bool] = mapped_column(Boolean)
    review_reasons: Mapped[list] = mapped_column(JSON)
    warnings: Mapped[list] = mapped_column(JSON)
    latency_ms: Mapped[float] = mapped_column(Float)
    client: Mapped[str | None] = mapped_column(String(32), nullable=True)   # the API key's id, never the key
    images_stored: Mapped[bool] = mapped_column(Boolean, default=False)
    image_files: Mapped[list | None] = mapped_column(JSON, nullable=True)   # stored images, relative to image_dir
    images_purged_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)  # retention
    registry_version: Mapped[str | None] = mapped_column(String(64), nullable=True, index=True)  # the answering one
    model_role: Mapped[str | None] = mapped_column(String(16), nullable=True)  # promoted | canary (registry only)
    # {supplied: [column], computed: {column: value the model saw}, computed_raw: {column: scorer's score},
    #  scorer: {model, weights_sha256, concept_set}, mapping: {source, file, sha256}} — null for models without concepts
    concepts: Mapped[dict | None] = mapped_column(JSON, nullable=True)
    # what decided: {prior: training | deployment, posterior_training_prior: {class: p}, prediction_set: [classes],
    #  level, operating_point: {source, cut-offs}} — outputs above are the shown posteriors
    decisions: Mapped[dict | None] = mapped_column(JSON, nullable=True)


class ShadowRecord(_Base):
    """A prediction made but not returned: the shadow version's, or — when a canary answered — the promoted
    version's. Same request id as the answer's row; compared with it once a diagnosis is confirmed."""
    __tablename__ = f"{TABLE}_shadow"
    __table_args__ = (UniqueConstraint("request_id", "registry_version"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    request_id: Mapped[str] = mapped_column(String(64), index=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), index=True)
    registry_version: Mapped[str] = mapped_column(String(64), index=True)
    model_role: Mapped[str] = mapped_column(String(16))     # shadow | promoted (the canary answered instead)
    model_hash: Mapped[str] = mapped_column(String(64))
    task: Mapped[str] = mapped_column(String(50))
    outputs: Mapped[dict] = mapped_column(JSON)
    primary_class: Mapped[str] = mapped_column(String(32))
    top_probability: Mapped[float] = mapped_column(Float)
    risk_score: Mapped[float] = mapped_column(Float)
    action: Mapped[str] = mapped_column(String(32))
    latency_ms: Mapped[float | None] = mapped_column(Float, nullable=True)


class FeedbackRecord(_Base):
    """A clinician's confirmed diagnosis for an audited request: enumerated values only, never free text. Append-only:
    nothing is ever overwritten. Which row counts (``resolve_feedback``): the first confirmation; a *stronger* one
    replaces it (histology after follow-up); a weaker or equal one of another diagnosis is a conflict — kept,
    flagged, not counted; an amendment (``kind`` = amendment, with a ``reason``) replaces whatever counted and
    names it (``amends``)."""
    __tablename__ = "dermfusion_feedback"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    request_id: Mapped[str] = mapped_column(String(64), index=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), index=True)
    diagnosis: Mapped[str] = mapped_column(String(32))
    confirmation: Mapped[str] = mapped_column(String(16))
    client: Mapped[str | None] = mapped_column(String(32), nullable=True)   # API key id or "cli:<user>"
    kind: Mapped[str | None] = mapped_column(String(16), nullable=True)     # confirmation (null: older rows) | amendment
    amends: Mapped[int | None] = mapped_column(Integer, nullable=True)      # the row an amendment replaces
    reason: Mapped[str | None] = mapped_column(String(32), nullable=True)   # AMENDMENT_REASONS


class AuditProbe(_Base):
    """One heartbeat row, rewritten by ``AuditStore.probe_write`` (readiness = the store can commit a write)."""
    __tablename__ = f"{TABLE}_probe"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    checked_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


COLUMNS = [c.name for c in AuditRecord.__table__.columns]
SHADOW_COLUMNS = [c.name for c in ShadowRecord.__table__.columns]
FEEDBACK_COLUMNS = [c.name for c in FeedbackRecord.__table__.columns]


def _sqlite_pragmas(dbapi_conn, _record):
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA busy_timeout=5000")
    cur.execute("PRAGMA mmap_size=0")  # ordinary reads and writes: an I/O fault is an error code, never SIGBUS
    mode = cur.execute("PRAGMA journal_mode=DELETE").fetchone()  # also turns a WAL database (old default) back
    cur.execute("PRAGMA synchronous=FULL")
    cur.close()
    if mode and str(mode[0]).lower() not in ("delete", "memory"):  # another process still holds it in WAL mode
        raise RuntimeError(f"the SQLite audit database stays in {mode[0]} journal mode (another process has it "
                           "open?); it must be in rollback-journal mode")


def describe_url(url: str) -> str:
    """A database URL with any password masked (safe to log and show)."""
    return make_url(url).render_as_string(hide_password=True)


def _add_missing_columns(engine: Engine) -> None:
    """Tables created by an older version lack newer (nullable) columns: add them."""
    insp = inspect(engine)
    for table in (AuditRecord.__table__, FeedbackRecord.__table__, ShadowRecord.__table__):
        have = {c["name"] for c in insp.get_columns(table.name)}
        with engine.begin() as conn:
            for col in table.columns:
                if col.name not in have and col.nullable:
                    conn.execute(text(f"ALTER TABLE {table.name} ADD COLUMN {col.name} "
                                      f"{col.type.compile(dialect=engine.dialect)}"))


class AuditStore:
    """Thread-safe writer/reader over one engine. ``create=True`` creates the table if missing."""

    def __init__(self, url: str, create: bool = True):
        self.url = url
        u = make_url(url)
        kw: dict = {"future": True, "pool_pre_ping": True}
        if u.get_backend_name() == "sqlite":
            kw["connect_args"] = {"check_same_thread": False, "timeout": 10}
            db = u.database
            if db and db != ":memory:":
                private_sqlite_file(db)
            else:
                from sqlalchemy.pool import StaticPool
                kw["poolclass"] = StaticPool
        self.engine: Engine = create_engine(url, **kw)
        if u.get_backend_name() == "sqlite":
            event.listen(self.engine, "connect", _sqlite_pragmas)
        self._lock = threading.Lock() if u.get_backend_name() == "sqlite" else None
        if create:
            _Base.metadata.create_all(self.engine)
            _add_missing_columns(self.engine)

    @property
    def backend(self) -> str:
        return self.engine.url.get_backend_name()

    def describe(self) -> str:
        """The URL with any password masked (safe to log and show)."""
        return describe_url(self.url)

    def _locked(self):
        return self._lock if self._lock is not None else contextlib.nullcontext()

    def write(self, record: dict) -> None:
        rec = dict(record)
        rec.setdefault("created_at", datetime.now(timezone.utc))
        if "patient_metadata" in rec:
            rec["patient_metadata"] = whole_years(rec["patient_metadata"])
        obj = AuditRecord(**{k: v for k, v in rec.items() if k in COLUMNS and k != "id"})
        with self._locked(), Session(self.engine) as s, s.begin():
            s.add(obj)

    def write_shadow(self, record: dict) -> None:
        """A prediction made but not returned (``ShadowRecord``)."""
        rec = {k: v for k, v in record.items() if k in SHADOW_COLUMNS and k != "id"}
        rec.setdefault("created_at", datetime.now(timezone.utc))
        with self._locked(), Session(self.engine) as s, s.begin():
            s.add(ShadowRecord(**rec))

    def feedback_rows(self, request_id: str) -> list[dict]:
        """Every feedback row of one request, in the order written."""
        with Session(self.engine) as s:
            q = select(FeedbackRecord).where(FeedbackRecord.request_id == request_id).order_by(
                FeedbackRecord.created_at, FeedbackRecord.id)
            return [{c: getattr(r, c) for c in FEEDBACK_COLUMNS} for r in s.scalars(q)]

    def write_feedback(self, request_id: str, diagnosis: str, confirmation: str, client: str | None = None,
                       amendment_reason: str | None = None) -> dict:
        """Record a confirmed diagnosis (the caller validated the enums against the audited row's task) by the rules
        of ``resolve_feedback``. Returns the row written (or the one that counts) with ``status``: ``recorded`` (the
        first), ``upgraded`` (a stronger confirmation replaced it), ``amended`` (an amendment replaced it), ``kept``
        (a weaker or equal confirmation of the same diagnosis: kept beside it), ``unchanged`` (the same as the one
        that counts: nothing written), ``conflict`` (a weaker or equal confirmation of another diagnosis: kept and
        flagged; the stronger one still counts) or ``nothing_to_amend`` (nothing written)."""
        if confirmation not in FEEDBACK_CONFIRMATIONS:
            raise ValueError(f"confirmation must be one of {', '.join(FEEDBACK_CONFIRMATIONS)}")
        if amendment_reason is not None and amendment_reason not in AMENDMENT_REASONS:
            raise ValueError(f"an amendment's reason must be one of {', '.join(AMENDMENT_REASONS)}")
        rec = {"request_id": request_id, "created_at": datetime.now(timezone.utc), "diagnosis": diagnosis,
               "confirmation": confirmation, "client": client, "kind": "confirmation"}
        with self._locked(), Session(self.engine) as s, s.begin():
            rows = [{c: getattr(r, c) for c in FEEDBACK_COLUMNS} for r in s.scalars(
                select(FeedbackRecord).where(FeedbackRecord.request_id == request_id).order_by(
                    FeedbackRecord.created_at, FeedbackRecord.id))]
            current, _ = resolve_feedback(rows)
            if amendment_reason is not None:
                if current is None:
                    return {**rec, "status": "nothing_to_amend", "id": None}
                rec.update(kind="amendment", amends=current["id"], reason=amendment_reason)
                status = "amended"
            elif current is None:
                status = "recorded"
            elif (current["diagnosis"], current["confirmation"]) == (diagnosis, confirmation):
                return {**current, "status": "unchanged"}
            elif CONFIRMATION_STRENGTH[confirmation] > CONFIRMATION_STRENGTH.get(current["confirmation"], 0):
                status = "upgraded"
            else:
                status = "kept" if diagnosis == current["diagnosis"] else "conflict"
            obj = FeedbackRecord(**rec)
            s.add(obj)
            s.flush()
            rec["id"] = obj.id
        return {**rec, "status": status, "counted": current if status in ("kept", "conflict") else None}

    def confirmed_cases(self) -> list[dict]:
        """Every audited request with a confirmed diagnosis (the feedback row that counts, ``resolve_feedback``):
        the answer's row, its unreturned predictions (``shadows``), the diagnosis and its flags — the input of the
        performance report."""
        with Session(self.engine) as s:
            rows: dict[str, list[dict]] = {}
            for f in s.scalars(select(FeedbackRecord).order_by(FeedbackRecord.created_at, FeedbackRecord.id)):
                rows.setdefault(f.request_id, []).append({c: getattr(f, c) for c in FEEDBACK_COLUMNS})
            if not rows:
                return []
            counted = {rid: resolve_feedback(rs) for rid, rs in rows.items()}
            ids = list(rows)
            out: dict[str, dict] = {}
            for i in range(0, len(ids), 500):
                chunk = ids[i:i + 500]
                for r in s.scalars(select(AuditRecord).where(AuditRecord.request_id.in_(chunk))):
                    f, flags = counted[r.request_id]
                    out[r.request_id] = {"row": {c: getattr(r, c) for c in COLUMNS}, "shadows": [],
                                         "diagnosis": f["diagnosis"], "confirmation": f["confirmation"], **flags}
                for r in s.scalars(select(ShadowRecord).where(ShadowRecord.request_id.in_(chunk))):
                    if r.request_id in out:
                        out[r.request_id]["shadows"].append({c: getattr(r, c) for c in SHADOW_COLUMNS})
            return list(out.values())

    def images_due(self, before: datetime) -> list[dict]:
        """Rows whose images are stored, not yet purged, and written before ``before`` (retention)."""
        q = select(AuditRecord).where(AuditRecord.images_stored.is_(True), AuditRecord.images_purged_at.is_(None),
                                      AuditRecord.created_at < before).order_by(AuditRecord.created_at)
        with Session(self.engine) as s:
            return [{"request_id": r.request_id, "created_at": r.created_at, "image_files": r.image_files}
                    for r in s.scalars(q)]

    def mark_images_purged(self, request_ids: list[str], when: datetime) -> None:
        """Record that these rows' images were deleted (the row itself stays: it holds no image)."""
        with self._locked(), Session(self.engine) as s, s.begin():
            for i in range(0, len(request_ids), 500):
                s.execute(update(AuditRecord).where(AuditRecord.request_id.in_(request_ids[i:i + 500]))
                          .values(images_purged_at=when))

    def recent(self, limit: int = 500, since: datetime | None = None, model_hash: str | None = None) -> list[dict]:
        """Newest first."""
        q = select(AuditRecord).order_by(AuditRecord.created_at.desc(), AuditRecord.id.desc()).limit(limit)
        if since is not None:
            q = q.where(AuditRecord.created_at >= since)
        if model_hash:
            q = q.where(AuditRecord.model_hash == model_hash)
        with Session(self.engine) as s:
            return [{c: getattr(r, c) for c in COLUMNS} for r in s.scalars(q)]

    def get(self, request_id: str) -> dict | None:
        with Session(self.engine) as s:
            r = s.scalars(select(AuditRecord).where(AuditRecord.request_id == request_id)).first()
            return {c: getattr(r, c) for c in COLUMNS} if r else None

    def count(self) -> int:
        from sqlalchemy import func
        with Session(self.engine) as s:
            return int(s.scalar(select(func.count()).select_from(AuditRecord)) or 0)

    def probe_write(self) -> None:
        """Commit one small write (the heartbeat row); raises when the store cannot write."""
        now = datetime.now(timezone.utc)
        for _ in range(2):  # two processes inserting the first row at once: the loser updates instead
            try:
                with self._locked(), Session(self.engine) as s, s.begin():
                    done = s.execute(update(AuditProbe).where(AuditProbe.id == 1).values(checked_at=now)).rowcount
                    if not done:
                        s.add(AuditProbe(id=1, checked_at=now))
                return
            except IntegrityError:
                continue

    def ping(self) -> bool:
        try:
            with self.engine.connect() as c:
                c.exec_driver_sql("SELECT 1")
            return True
        except Exception:  # noqa: BLE001
            return False

    def close(self) -> None:
        self.engine.dispose()
