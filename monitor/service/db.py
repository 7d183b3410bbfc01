"""The service's tables (SQLAlchemy 2), the engine, and schema upgrades through Alembic.

PostgreSQL (psycopg 3) in production; SQLite for the embedded default. The schema is owned by
the Alembic migrations in ``migrations/``: ``safety-monitor db upgrade`` applies them, and the
service applies them at start.
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import Any

from sqlalchemy import (
    JSON,
    Boolean,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    String,
    Text,
    UniqueConstraint,
    create_engine,
    event,
    text,
)
from sqlalchemy.engine import Engine, make_url
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column
from sqlalchemy.sql import Select

MIGRATIONS = Path(__file__).resolve().parent / "migrations"
UPGRADE_LOCK = 0x5AFE_0001  # advisory lock id serialising schema upgrades


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def search_text(messages: list[dict[str, Any]]) -> str:
    """What audit text search matches: the messages' content, lower-cased."""
    return "\n".join(str(m.get("content", "")) for m in messages).lower()


class Base(DeclarativeBase):
    pass


class ApiKey(Base):
    __tablename__ = "api_keys"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    tenant: Mapped[str] = mapped_column(String(64), index=True)
    role: Mapped[str] = mapped_column(String(16))
    key_hash: Mapped[str] = mapped_column(String(64), unique=True)  # sha256 of the whole key
    prefix: Mapped[str] = mapped_column(String(16))  # shown in listings, never enough to use
    # Who holds it (a person or a service): the author of triage changes and notes it makes.
    name: Mapped[str | None] = mapped_column(String(64), nullable=True)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    revoked_at: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)


class Turn(Base):
    __tablename__ = "turns"
    __table_args__ = (
        UniqueConstraint("tenant", "source_id", name="uq_turns_tenant_source"),
        Index("ix_turns_tenant_conversation", "tenant", "conversation_id"),
        Index("ix_turns_tenant_created", "tenant", "created_at"),
    )
    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    tenant: Mapped[str] = mapped_column(String(64))
    conversation_id: Mapped[str] = mapped_column(String(256))
    source_id: Mapped[str | None] = mapped_column(String(256), nullable=True)  # idempotency
    pipeline: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    messages: Mapped[list[dict[str, Any]]] = mapped_column(JSON)
    # The messages' content joined and lower-cased (as stored, redacted): audit text search.
    search_text: Mapped[str | None] = mapped_column(Text, nullable=True)
    meta: Mapped[dict[str, Any]] = mapped_column("metadata", JSON, default=dict)
    n_tokens: Mapped[int] = mapped_column(Integer)
    dropped: Mapped[int] = mapped_column(Integer, default=0)
    sae_fingerprint: Mapped[str | None] = mapped_column(String(32), nullable=True)  # reencode.py


class TurnFeatures(Base):
    """Per-token sparse features of a turn, as the audit highlight view needs them."""

    __tablename__ = "turn_features"
    turn_id: Mapped[str] = mapped_column(
        String(36), ForeignKey("turns.id", ondelete="CASCADE"), primary_key=True
    )
    tokens: Mapped[list[str]] = mapped_column(JSON)
    roles: Mapped[bytes] = mapped_column(LargeBinary)  # int8 per token
    indptr: Mapped[bytes] = mapped_column(LargeBinary)  # int32 [n_tokens + 1]
    indices: Mapped[bytes] = mapped_column(LargeBinary)  # int32 feature ids
    values: Mapped[bytes] = mapped_column(LargeBinary)  # float16 activations


class VerdictRow(Base):
    __tablename__ = "verdicts"
    __table_args__ = (
        # The fires a silence withheld (each tenant's own count of an all-tenant silence).
        Index(
            "ix_verdicts_silence",
            "silence_id",
            postgresql_where=text("silence_id IS NOT NULL"),
            sqlite_where=text("silence_id IS NOT NULL"),
        ),
    )
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    turn_id: Mapped[str] = mapped_column(
        String(36), ForeignKey("turns.id", ondelete="CASCADE"), index=True
    )
    detector: Mapped[str] = mapped_column(String(64))
    kind: Mapped[str] = mapped_column(String(16))
    score: Mapped[float] = mapped_column(Float)
    fired: Mapped[bool] = mapped_column(Boolean)
    severity: Mapped[str] = mapped_column(String(16))
    evidence: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    # A fire an active silence withheld from alerting: the silence's id (no foreign key:
    # silences are never deleted, only expired).
    silence_id: Mapped[int | None] = mapped_column(Integer, nullable=True)


class Alert(Base):
    __tablename__ = "alerts"
    __table_args__ = (
        Index("ix_alerts_tenant_created", "tenant", "created_at"),
        Index("ix_alerts_tenant_detector", "tenant", "detector"),
        Index("ix_alerts_tenant_status", "tenant", "status", "created_at"),
        Index("ix_alerts_verdict_detector", "verdict", "detector"),
    )
    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    turn_id: Mapped[str] = mapped_column(
        String(36), ForeignKey("turns.id", ondelete="SET NULL"), nullable=True
    )
    tenant: Mapped[str] = mapped_column(String(64))
    conversation_id: Mapped[str] = mapped_column(String(256))
    pipeline: Mapped[str] = mapped_column(String(64))
    detector: Mapped[str] = mapped_column(String(64))
    kind: Mapped[str] = mapped_column(String(16), default="rule", server_default="rule")
    severity: Mapped[str] = mapped_column(String(16))
    score: Mapped[float] = mapped_column(Float)
    summary: Mapped[str] = mapped_column(Text, default="")
    # Fires folded into this alert by the detector's cooldown (counted, not re-sent).
    suppressed: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    created_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    evidence: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    # Triage (monitor.service.triage): open → acknowledged → resolved, the auditor's verdict,
    # who has it; ``version`` grows with every change (a stale update is refused: 409).
    status: Mapped[str] = mapped_column(String(16), default="open", server_default="open")
    verdict: Mapped[str | None] = mapped_column(String(16), nullable=True)
    assignee: Mapped[str | None] = mapped_column(String(64), nullable=True)
    version: Mapped[int] = mapped_column(Integer, default=1, server_default="1")
    updated_at: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)


class AlertNote(Base):
    """An auditor's note on an alert: append-only (never edited or deleted)."""

    __tablename__ = "alert_notes"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    alert_id: Mapped[str] = mapped_column(
        String(36), ForeignKey("alerts.id", ondelete="CASCADE"), index=True
    )
    author: Mapped[str] = mapped_column(String(64))
    text: Mapped[str] = mapped_column(Text)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class AlertHistory(Base):
    """One change of one triage field of an alert: who, when, from what to what."""

    __tablename__ = "alert_history"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    alert_id: Mapped[str] = mapped_column(
        String(36), ForeignKey("alerts.id", ondelete="CASCADE"), index=True
    )
    author: Mapped[str] = mapped_column(String(64))
    changed_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    field: Mapped[str] = mapped_column(String(16))  # status | verdict | assignee
    old: Mapped[str | None] = mapped_column("from_value", String(64), nullable=True)
    new: Mapped[str | None] = mapped_column("to_value", String(64), nullable=True)
    version: Mapped[int] = mapped_column(Integer)  # the alert's version this change made


class Silence(Base):
    """A detector's fires withheld from alerting for a time window: stored, counted (silences)."""

    __tablename__ = "silences"
    __table_args__ = (Index("ix_silences_tenant_detector", "tenant", "detector", "ends_at"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    tenant: Mapped[str | None] = mapped_column(String(64), nullable=True)  # None: every tenant
    detector: Mapped[str] = mapped_column(String(64))
    pipeline: Mapped[str | None] = mapped_column(String(64), nullable=True)  # None: every one
    features: Mapped[str | None] = mapped_column(String(200), nullable=True)  # silence_match
    reason: Mapped[str] = mapped_column(Text)
    created_by: Mapped[str] = mapped_column(String(64))
    starts_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True))
    ends_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True))
    created_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    expired_by: Mapped[str | None] = mapped_column(String(64), nullable=True)  # ended early
    # Fires it withheld (each flagged on its verdict row, ``VerdictRow.silence_id``, too).
    fires: Mapped[int] = mapped_column(Integer, default=0, server_default="0")


class Outbox(Base):
    """Alerts waiting to go out; written in the same transaction as the alert."""

    __tablename__ = "outbox"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    alert_id: Mapped[str] = mapped_column(String(36), ForeignKey("alerts.id", ondelete="CASCADE"))
    key: Mapped[str] = mapped_column(String(256))
    payload: Mapped[dict[str, Any]] = mapped_column(JSON)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    published_at: Mapped[dt.datetime | None] = mapped_column(
        DateTime(timezone=True), nullable=True, index=True
    )
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    last_error: Mapped[str | None] = mapped_column(Text, nullable=True)


class WebhookDelivery(Base):
    """One alert (``event`` 'alert'), or its resolution ('resolve', PagerDuty), to one sink:
    retried with backoff, dead-lettered after the last attempt."""

    __tablename__ = "webhook_deliveries"
    __table_args__ = (
        UniqueConstraint("alert_id", "webhook", "event", name="uq_delivery_alert_webhook_event"),
        Index("ix_deliveries_due", "delivered_at", "dead_at", "next_attempt_at"),
    )
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    alert_id: Mapped[str] = mapped_column(String(36), ForeignKey("alerts.id", ondelete="CASCADE"))
    webhook: Mapped[str] = mapped_column(String(64))
    event: Mapped[str] = mapped_column(String(16), default="alert", server_default="alert")
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    delivered_at: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    dead_at: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    last_status: Mapped[int | None] = mapped_column(Integer, nullable=True)
    last_error: Mapped[str | None] = mapped_column(Text, nullable=True)


class PendingTurn(Base):
    """A turn accepted by ``POST /v1/turns/batch`` and not yet evaluated; its id becomes the
    turn's id. Claimed with a lease (``available_at``), deleted once the turn is stored."""

    __tablename__ = "pending_turns"
    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    tenant: Mapped[str] = mapped_column(String(64))
    body: Mapped[dict[str, Any]] = mapped_column(JSON)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    available_at: Mapped[dt.datetime] = mapped_column(
        DateTime(timezone=True), default=utcnow, index=True
    )
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    last_error: Mapped[str | None] = mapped_column(Text, nullable=True)


def make_engine(url: str) -> Engine:
    """An engine for ``url``; SQLite gets foreign keys on and a busy timeout."""
    if url.startswith("postgresql://"):
        url = "postgresql+psycopg://" + url.removeprefix("postgresql://")
    if url.startswith("sqlite"):
        engine = create_engine(url, connect_args={"timeout": 30, "check_same_thread": False})

        @event.listens_for(engine, "connect")
        def _pragmas(conn: Any, _record: Any) -> None:
            cur = conn.cursor()
            cur.execute("PRAGMA foreign_keys=ON")
            cur.execute("PRAGMA journal_mode=WAL")
            cur.close()

        return engine
    # A bounded connect: an unreachable host must fail requests, scrapes and retries within
    # seconds, not after the system's TCP timeout (unless the URL sets its own).
    connect_args = {} if "connect_timeout" in make_url(url).query else {"connect_timeout": 10}
    return create_engine(
        url, pool_pre_ping=True, pool_size=5, max_overflow=5, connect_args=connect_args
    )


def upgrade(engine: Engine, revision: str = "head") -> None:
    """Apply the Alembic migrations to ``engine``'s database."""
    import logging

    from alembic import command
    from alembic.config import Config

    logging.getLogger("alembic.runtime.plugins").setLevel(logging.WARNING)

    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    with engine.begin() as conn:
        if conn.dialect.name == "postgresql":
            # Instances starting together (pods, compose services) upgrade one at a time; the
            # lock is released when this transaction ends.
            conn.exec_driver_sql(f"SELECT pg_advisory_xact_lock({UPGRADE_LOCK})")
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, revision)


def claim(query: Select[Any], session: Session) -> Select[Any]:
    """``query`` with ``FOR UPDATE SKIP LOCKED`` where the database has it (PostgreSQL), so that
    several instances share queued rows without taking the same one."""
    if session.get_bind().dialect.name == "postgresql":
        return query.with_for_update(skip_locked=True)
    return query
