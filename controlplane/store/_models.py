"""The relational schema of the control plane (SQLAlchemy 2.x declarative models)."""

from __future__ import annotations

import datetime as dt
from typing import Any, cast

from sqlalchemy import JSON, BigInteger, DateTime, Index, Integer, String, Table, Text
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from sqlalchemy.types import TypeDecorator


class UtcDateTime(TypeDecorator[dt.datetime]):
    """Timezone-aware UTC datetimes on every backend (SQLite stores naive values)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: dt.datetime | None, dialect: Any) -> dt.datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to the store; use UTC-aware datetimes")
        return value.astimezone(dt.UTC)

    def process_result_value(self, value: dt.datetime | None, dialect: Any) -> dt.datetime | None:
        if value is not None and value.tzinfo is None:
            return value.replace(tzinfo=dt.UTC)
        return value


class Base(DeclarativeBase):
    pass


class AgentRow(Base):
    """One registered node agent: its liveness and what it reported about itself."""

    __tablename__ = "agents"

    node_id: Mapped[str] = mapped_column(String(128), primary_key=True)
    status: Mapped[str] = mapped_column(String(16))
    first_seen: Mapped[dt.datetime] = mapped_column(UtcDateTime())
    last_seen: Mapped[dt.datetime] = mapped_column(UtcDateTime())
    agent_version: Mapped[str] = mapped_column(String(64), default="")
    spiffe_id: Mapped[str] = mapped_column(String(512), default="")
    capabilities: Mapped[list[str]] = mapped_column(JSON, default=list)
    inventory: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    last_telemetry_seq: Mapped[int] = mapped_column(BigInteger, default=0)
    telemetry_gap_samples: Mapped[int] = mapped_column(BigInteger, default=0)


class CommandRow(Base):
    """A command for one node: written before it is sent, updated by its ack and result."""

    __tablename__ = "commands"
    __table_args__ = (Index("ix_commands_node_state", "node_id", "state"),)

    command_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    node_id: Mapped[str] = mapped_column(String(128))
    plan_id: Mapped[str] = mapped_column(String(64), default="")
    action: Mapped[str] = mapped_column(String(64))
    parameters: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    state: Mapped[str] = mapped_column(String(16))
    created_at: Mapped[dt.datetime] = mapped_column(UtcDateTime())
    deadline: Mapped[dt.datetime] = mapped_column(UtcDateTime())
    sent_at: Mapped[dt.datetime | None] = mapped_column(UtcDateTime(), nullable=True)
    acked_at: Mapped[dt.datetime | None] = mapped_column(UtcDateTime(), nullable=True)
    finished_at: Mapped[dt.datetime | None] = mapped_column(UtcDateTime(), nullable=True)
    deliveries: Mapped[int] = mapped_column(Integer, default=0)
    outcome: Mapped[str] = mapped_column(String(32), default="")
    message: Mapped[str] = mapped_column(Text, default="")
    output: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)


# The tables themselves, for Core statements on hot paths (executemany batches).
AGENTS = cast(Table, AgentRow.__table__)
COMMANDS = cast(Table, CommandRow.__table__)
