"""The audit trail: one row per analysis, through SQLAlchemy (SQLite by default, any database URL).

A row says which model (name, version, content hash) saw which inputs (sha256 of the uploaded
bytes, validated structured metadata, image statistics — never the image itself and never free
text), what it answered (probabilities, risk, action, review flags) and how long it took. That is
enough to reproduce or contest any answer, and to compute drift later (``dermfusion drift``).
"""
from __future__ import annotations

import threading
from datetime import datetime, timezone

from sqlalchemy import JSON, Boolean, DateTime, Float, Integer, String, create_engine, event, select
from sqlalchemy.engine import Engine, make_url
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

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
    client: Mapped[str | None] = mapped_column(String(32), nullable=True)   # API-key fingerprint, not the key
    images_stored: Mapped[bool] = mapped_column(Boolean, default=False)


COLUMNS = [c.name for c in AuditRecord.__table__.columns]


def _sqlite_pragmas(dbapi_conn, _record):
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA busy_timeout=5000")
    cur.close()


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
                from pathlib import Path
                Path(db).expanduser().parent.mkdir(parents=True, exist_ok=True)
            else:
                from sqlalchemy.pool import StaticPool
                kw["poolclass"] = StaticPool
        self.engine: Engine = create_engine(url, **kw)
        if u.get_backend_name() == "sqlite":
            event.listen(self.engine, "connect", _sqlite_pragmas)
        self._lock = threading.Lock() if u.get_backend_name() == "sqlite" else None
        if create:
            _Base.metadata.create_all(self.engine)

    @property
    def backend(self) -> str:
        return self.engine.url.get_backend_name()

    def describe(self) -> str:
        """The URL with any password masked (safe to log and show)."""
        return self.engine.url.render_as_string(hide_password=True)

    def write(self, record: dict) -> None:
        rec = dict(record)
        rec.setdefault("created_at", datetime.now(timezone.utc))
        obj = AuditRecord(**{k: v for k, v in rec.items() if k in COLUMNS and k != "id"})
        if self._lock:
            with self._lock, Session(self.engine) as s, s.begin():
                s.add(obj)
        else:
            with Session(self.engine) as s, s.begin():
                s.add(obj)

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

    def ping(self) -> bool:
        try:
            with self.engine.connect() as c:
                c.exec_driver_sql("SELECT 1")
            return True
        except Exception:  # noqa: BLE001
            return False

    def close(self) -> None:
        self.engine.dispose()
