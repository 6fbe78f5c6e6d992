"""SQLAlchemy models of guardproxy's own schema: the audit log, deleted-row images,
the idempotency ledger, task budgets, the instance registry and token revocations.
Alembic migrations in ``migrations/`` create them; the proxy writes to them with
asyncpg (and to the instance registry through its own server connection).
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import (
    BigInteger,
    CheckConstraint,
    DateTime,
    Double,
    Index,
    LargeBinary,
    MetaData,
    SmallInteger,
    Text,
    UniqueConstraint,
    func,
)
from sqlalchemy.dialects.postgresql import ARRAY, JSONB
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

SCHEMA = "guardproxy"


class Base(DeclarativeBase):
    metadata = MetaData(schema=SCHEMA)


class AuditEvent(Base):
    """One write, rewrite, denial, replay or undo by an agent."""

    __tablename__ = "audit_events"
    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=True)
    at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
    agent_id: Mapped[str] = mapped_column(Text)
    agent_type: Mapped[str] = mapped_column(Text)
    task: Mapped[str | None] = mapped_column(Text)
    step: Mapped[str | None] = mapped_column(Text)
    principals: Mapped[list[str] | None] = mapped_column(ARRAY(Text))
    statement: Mapped[str] = mapped_column(Text)
    decision: Mapped[str] = mapped_column(Text)  # allowed, denied, rewritten, replayed, undo, ...
    rule: Mapped[str | None] = mapped_column(Text)
    reason: Mapped[str | None] = mapped_column(Text)
    rows: Mapped[int | None] = mapped_column(BigInteger)
    duration_ms: Mapped[float | None] = mapped_column(Double)
    tags: Mapped[dict[str, str] | None] = mapped_column(JSONB)
    # what became of a write upstream: succeeded, failed, undone; NULL: denied, or before 0005
    outcome: Mapped[str | None] = mapped_column(Text)
    __table_args__ = (
        Index("audit_events_agent_at", "agent_id", "at"),
        Index("audit_events_task_at", "task", "at"),
    )


class DeletedRow(Base):
    """The image of a row an agent hard-deleted (``capture_deleted_rows``), for audit and undo."""

    __tablename__ = "deleted_rows"
    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=True)
    at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
    agent_id: Mapped[str] = mapped_column(Text)
    task: Mapped[str | None] = mapped_column(Text)
    step: Mapped[str | None] = mapped_column(Text)
    reason: Mapped[str | None] = mapped_column(Text)
    table_name: Mapped[str] = mapped_column(Text)
    primary_key: Mapped[dict[str, object]] = mapped_column(JSONB)
    row_image: Mapped[dict[str, object]] = mapped_column(JSONB)
    restored_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    __table_args__ = (
        Index("deleted_rows_agent_at", "agent_id", "at"),
        Index("deleted_rows_task", "task"),
    )


class IdempotencyKey(Base):
    """A write that ran once: its key, what it was, and what it answered."""

    __tablename__ = "idempotency_keys"
    key: Mapped[str] = mapped_column(Text, primary_key=True)
    agent_type: Mapped[str] = mapped_column(Text)
    agent_id: Mapped[str] = mapped_column(Text)
    task: Mapped[str | None] = mapped_column(Text)
    request_hash: Mapped[str] = mapped_column(Text)  # statement shape + parameters
    command_tag: Mapped[str | None] = mapped_column(Text)
    response: Mapped[bytes | None] = mapped_column(LargeBinary)  # RowDescription + DataRows, raw
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
    expires_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    __table_args__ = (Index("idempotency_keys_expires", "expires_at"),)


class TaskBudget(Base):
    """What a task has spent, across sessions, workers and proxy instances."""

    __tablename__ = "task_budgets"
    task: Mapped[str] = mapped_column(Text, primary_key=True)
    agent_type: Mapped[str] = mapped_column(Text)
    first_statement_at: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), server_default=func.now()
    )
    statements: Mapped[int] = mapped_column(BigInteger, default=0)
    rows_written: Mapped[int] = mapped_column(BigInteger, default=0)
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())


class ProxyInstance(Base):
    """A running guardproxy instance: its slot in the cancel keys and where it takes cancels."""

    __tablename__ = "proxy_instances"
    slot: Mapped[int] = mapped_column(SmallInteger, primary_key=True, autoincrement=False)
    address: Mapped[str] = mapped_column(Text)  # host:port, advertise_address
    owner: Mapped[str] = mapped_column(Text)  # host/pid/random of the process holding it
    started_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
    heartbeat_at: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), server_default=func.now()
    )
    __table_args__ = (CheckConstraint("slot BETWEEN 1 AND 255", name="proxy_instances_slot_range"),)


class TokenRevocation(Base):
    """A revoked delegation token (kind 'token', by jti) or principal (kind 'principal')."""

    __tablename__ = "token_revocations"
    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=True)
    kind: Mapped[str] = mapped_column(Text)
    value: Mapped[str] = mapped_column(Text)  # the jti, or the principal
    issuer: Mapped[str] = mapped_column(Text, server_default="")  # '': every issuer
    revoked_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
    revoked_by: Mapped[str] = mapped_column(Text)
    reason: Mapped[str | None] = mapped_column(Text)
    __table_args__ = (
        CheckConstraint("kind IN ('token', 'principal')", name="token_revocations_kind"),
        UniqueConstraint("kind", "value", "issuer", name="token_revocations_once"),
    )
