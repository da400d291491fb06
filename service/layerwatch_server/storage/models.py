"""The schema. Alembic revisions under ``alembic/versions`` must agree with it (a test checks).

Hot tables (``step_stats``, ``layer_stats``, ``param_stats``) are append-only, keyed for the series
query (run, series, rank, step), and carry no foreign keys so bulk inserts stay cheap. One float column
per statistic named in :mod:`layerwatch.wire`; a new statistic is a new column and a new revision.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Column,
    ForeignKey,
    Index,
    Integer,
    String,
    Table,
    UniqueConstraint,
)
from sqlalchemy.orm import Mapped, mapped_column

from layerwatch import wire
from layerwatch_server.storage.base import Base, NanFloat, UTCDateTime, utcnow

RUN_STATUSES = ("running", "finished", "failed", "killed", "stalled")
SCOPES = ("write", "read", "admin")
ALL_PROJECTS = "*"


class Project(Base):
    __tablename__ = "projects"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(100), unique=True)
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime, default=utcnow)


class Run(Base):
    __tablename__ = "runs"
    __table_args__ = (UniqueConstraint("project_id", "key"),)

    id: Mapped[str] = mapped_column(String(16), primary_key=True)
    project_id: Mapped[int] = mapped_column(ForeignKey("projects.id"), index=True)
    key: Mapped[str] = mapped_column(String(200))
    name: Mapped[str] = mapped_column(String(200))
    status: Mapped[str] = mapped_column(String(16), index=True, default="running")
    config: Mapped[dict[str, Any] | None] = mapped_column(JSON(none_as_null=True))
    world_size: Mapped[int] = mapped_column(Integer, default=1)
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime, default=utcnow)
    last_seen: Mapped[dt.datetime] = mapped_column(UTCDateTime, default=utcnow, index=True)
    first_step: Mapped[int | None] = mapped_column(BigInteger)
    last_step: Mapped[int | None] = mapped_column(BigInteger)
    mlflow_run_id: Mapped[str | None] = mapped_column(String(64))
    nonfinite_origin: Mapped[dict[str, Any] | None] = mapped_column(JSON(none_as_null=True))


class RunRank(Base):
    __tablename__ = "run_ranks"

    run_id: Mapped[str] = mapped_column(ForeignKey("runs.id"), primary_key=True)
    rank: Mapped[int] = mapped_column(Integer, primary_key=True)
    host: Mapped[str] = mapped_column(String(255))
    pid: Mapped[int] = mapped_column(Integer)
    last_seq: Mapped[int] = mapped_column(BigInteger)
    last_seen: Mapped[dt.datetime] = mapped_column(UTCDateTime, default=utcnow)
    dropped_reports: Mapped[int] = mapped_column(BigInteger, default=0)
    dropped_batches: Mapped[int] = mapped_column(BigInteger, default=0)


class Layer(Base):
    """A module of the run, identified by its ``named_modules()`` name; wire indices are per batch."""

    __tablename__ = "layers"
    __table_args__ = (UniqueConstraint("run_id", "name"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    run_id: Mapped[str] = mapped_column(ForeignKey("runs.id"))
    index: Mapped[int] = mapped_column(Integer)
    name: Mapped[str] = mapped_column(String(500))
    type: Mapped[str] = mapped_column(String(200))
    kind: Mapped[str] = mapped_column(String(16))
    shape: Mapped[list[int]] = mapped_column(JSON(none_as_null=True))
    units: Mapped[int] = mapped_column(BigInteger)


class Param(Base):
    __tablename__ = "params"
    __table_args__ = (UniqueConstraint("run_id", "name"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    run_id: Mapped[str] = mapped_column(ForeignKey("runs.id"))
    index: Mapped[int] = mapped_column(Integer)
    name: Mapped[str] = mapped_column(String(500))
    shape: Mapped[list[int]] = mapped_column(JSON(none_as_null=True))
    numel: Mapped[int] = mapped_column(BigInteger)


class Token(Base):
    """An API token; only its SHA-256 is stored. ``project`` is a name, or ``*`` (admin of all)."""

    __tablename__ = "tokens"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    project: Mapped[str] = mapped_column(String(100))
    scope: Mapped[str] = mapped_column(String(8))
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime, default=utcnow)
    revoked_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime)


class Rollup(Base):
    """Retention output: one statistic of one series over a bucket of steps, min/max kept."""

    __tablename__ = "rollups"

    run_id: Mapped[str] = mapped_column(String(16), primary_key=True)
    series: Mapped[str] = mapped_column(String(8), primary_key=True)  # "layer" | "param" | "step"
    series_id: Mapped[int] = mapped_column(Integer, primary_key=True)  # layer/param id, 0 for step
    stat: Mapped[str] = mapped_column(String(64), primary_key=True)
    rank: Mapped[int] = mapped_column(Integer, primary_key=True)
    bucket_start: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    bucket_end: Mapped[int] = mapped_column(BigInteger)
    n: Mapped[int] = mapped_column(Integer)
    nan_count: Mapped[int] = mapped_column(Integer)
    min: Mapped[float | None] = mapped_column(NanFloat)
    max: Mapped[float | None] = mapped_column(NanFloat)
    mean: Mapped[float | None] = mapped_column(NanFloat)


class JobTick(Base):
    """Lease row: the replica that inserts (job, tick) first runs that tick; the others skip it."""

    __tablename__ = "job_ticks"

    job: Mapped[str] = mapped_column(String(64), primary_key=True)
    tick: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    replica: Mapped[str] = mapped_column(String(100))
    started_at: Mapped[dt.datetime] = mapped_column(UTCDateTime, default=utcnow)
    finished_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime)


step_stats = Table(
    "step_stats",
    Base.metadata,
    Column("run_id", String(16), primary_key=True),
    Column("rank", Integer, primary_key=True),
    Column("step", BigInteger, primary_key=True),
    Column("time", NanFloat, nullable=False),
    *(Column(name, NanFloat) for name in wire.STEP_STATS),
    Column("scalars", JSON(none_as_null=True)),
    Index("ix_step_stats_time", "time"),
    sqlite_with_rowid=False,
)


def _stats_table(name: str, id_column: str, stats: tuple[str, ...]) -> Table:
    return Table(
        name,
        Base.metadata,
        Column("run_id", String(16), primary_key=True),
        Column(id_column, Integer, primary_key=True),
        Column("rank", Integer, primary_key=True),
        Column("step", BigInteger, primary_key=True),
        *(Column(stat, NanFloat) for stat in stats),
        sqlite_with_rowid=False,
    )


layer_stats = _stats_table("layer_stats", "layer_id", wire.LAYER_STATS)
param_stats = _stats_table("param_stats", "param_id", wire.PARAM_STATS)


class MlflowMirror(Base):
    """Per-run MLflow mirror cursor: rank-0 steps up to ``last_step`` are in MLflow (restart-safe)."""

    __tablename__ = "mlflow_mirror"

    run_id: Mapped[str] = mapped_column(String(16), primary_key=True)
    last_step: Mapped[int | None] = mapped_column(BigInteger)
    nonfinite_values: Mapped[int] = mapped_column(BigInteger, default=0)
    first_nonfinite_step: Mapped[int | None] = mapped_column(BigInteger)
    ended_status: Mapped[str | None] = mapped_column(String(16))  # the status MLflow was given last
    updated_at: Mapped[dt.datetime] = mapped_column(UTCDateTime, default=utcnow)
