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
OPEN_ALERT_STATES = ("pending", "firing")  # an alert is open in these; else "resolved"
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


class WriteProbe(Base):
    """One row per replica, rewritten by each /readyz: a committed write proves the database takes writes."""

    __tablename__ = "write_probes"

    replica: Mapped[str] = mapped_column(String(100), primary_key=True)
    checked_at: Mapped[dt.datetime] = mapped_column(UTCDateTime, default=utcnow)


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
    """On PostgreSQL partitioned by ``day`` (:mod:`layerwatch_server.storage.partitions`), whose primary key
    ends in ``day`` there (a partition key must be in it): one row per (run, series, rank, step) all the same,
    as ingest writes only the steps it claimed in ``step_stats``. On SQLite ``day`` is 0."""
    return Table(
        name,
        Base.metadata,
        Column("run_id", String(16), primary_key=True),
        Column(id_column, Integer, primary_key=True),
        Column("rank", Integer, primary_key=True),
        Column("step", BigInteger, primary_key=True),
        *(Column(stat, NanFloat) for stat in stats),
        Column("day", Integer, nullable=False),  # UTC day of the step's time (days since 1970-01-01)
        sqlite_with_rowid=False,
    )


layer_stats = _stats_table("layer_stats", "layer_id", wire.LAYER_STATS)
param_stats = _stats_table("param_stats", "param_id", wire.PARAM_STATS)

# Per-layer histograms (layerwatch.histograms): one row per (run, layer, kind, step), counts as a JSON array of
# integers, exact. Bin edges are shared by content (a hash of them names the row of histogram_edges), not
# repeated per row.
histogram_edges = Table(
    "histogram_edges",
    Base.metadata,
    Column("id", String(16), primary_key=True),
    Column("edges", JSON(none_as_null=True), nullable=False),
)
histograms = Table(
    "histograms",
    Base.metadata,
    Column("run_id", String(16), primary_key=True),
    Column("layer", String(500), primary_key=True),
    Column("kind", String(16), primary_key=True),
    Column("step", BigInteger, primary_key=True),
    Column("edges_id", String(16), nullable=False),
    Column("counts", JSON(none_as_null=True), nullable=False),
    Column("nan", BigInteger, nullable=False),
    sqlite_with_rowid=False,
)


class MlflowMirrorRow(Base):
    """Per-run MLflow mirror cursor: rank-0 steps up to ``last_step`` are in MLflow (restart-safe)."""

    __tablename__ = "mlflow_mirror"

    run_id: Mapped[str] = mapped_column(String(16), primary_key=True)
    last_step: Mapped[int | None] = mapped_column(BigInteger)
    nonfinite_values: Mapped[int] = mapped_column(BigInteger, default=0)
    first_nonfinite_step: Mapped[int | None] = mapped_column(BigInteger)
    ended_status: Mapped[str | None] = mapped_column(String(16))  # the status MLflow was given last
    updated_at: Mapped[dt.datetime] = mapped_column(UTCDateTime, default=utcnow)


# -- alerting (rules/, notify/) ------------------------------------------------------------------------


class AlertRow(Base):
    """One alert per (run, rule, layer): re-opened, not duplicated, when its condition comes back."""

    __tablename__ = "alerts"
    __table_args__ = (UniqueConstraint("run_id", "rule", "layer_key"),)

    id: Mapped[str] = mapped_column(String(16), primary_key=True)
    run_id: Mapped[str] = mapped_column(ForeignKey("runs.id"))
    project: Mapped[str] = mapped_column(String(100), index=True)
    rule: Mapped[str] = mapped_column(String(100))
    layer_key: Mapped[str] = mapped_column(String(500))  # layer name, "" for run-level alerts
    rank: Mapped[int] = mapped_column(Integer, default=0)
    severity: Mapped[str] = mapped_column(String(16))
    state: Mapped[str] = mapped_column(String(16), index=True)  # pending | firing | resolved
    episode: Mapped[int] = mapped_column(Integer, default=1)  # bumps each time it re-opens
    step: Mapped[int | None] = mapped_column(BigInteger)
    value: Mapped[float | None] = mapped_column(NanFloat)
    threshold: Mapped[float | None] = mapped_column(NanFloat)
    message: Mapped[str] = mapped_column(String(2000))
    evidence: Mapped[dict[str, Any] | None] = mapped_column(JSON(none_as_null=True))
    started_at: Mapped[dt.datetime] = mapped_column(UTCDateTime, default=utcnow)
    fired_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime)
    resolved_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime)
    notified_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime)
    updated_at: Mapped[dt.datetime] = mapped_column(UTCDateTime, default=utcnow)


class RuleState(Base):
    """Per-run evaluation memory (breach counters, recent losses), in the DB so replicas agree."""

    __tablename__ = "rule_state"

    run_id: Mapped[str] = mapped_column(String(16), primary_key=True)
    rank: Mapped[int] = mapped_column(Integer, primary_key=True)
    data: Mapped[dict[str, Any]] = mapped_column(JSON(none_as_null=True))
    updated_at: Mapped[dt.datetime] = mapped_column(UTCDateTime, default=utcnow)


class RuleDef(Base):
    """A rule set through the API; overrides the rules file and the built-in defaults of that name."""

    __tablename__ = "rule_defs"

    name: Mapped[str] = mapped_column(String(100), primary_key=True)
    spec: Mapped[dict[str, Any]] = mapped_column(JSON(none_as_null=True))
    updated_at: Mapped[dt.datetime] = mapped_column(UTCDateTime, default=utcnow)


class Silence(Base):
    __tablename__ = "silences"

    id: Mapped[str] = mapped_column(String(16), primary_key=True)
    project: Mapped[str | None] = mapped_column(String(100))
    run_id: Mapped[str | None] = mapped_column(String(16))
    rule: Mapped[str | None] = mapped_column(String(100))
    layer: Mapped[str | None] = mapped_column(String(500))  # fnmatch pattern
    comment: Mapped[str] = mapped_column(String(1000), default="")
    starts_at: Mapped[dt.datetime] = mapped_column(UTCDateTime, default=utcnow)
    ends_at: Mapped[dt.datetime] = mapped_column(UTCDateTime, index=True)


class OutboxRow(Base):
    """A notification to deliver, written in the alert's transaction; the sender claims it with a lease."""

    __tablename__ = "outbox"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    alert_id: Mapped[str] = mapped_column(String(16), index=True)
    channel: Mapped[str] = mapped_column(String(100))
    key: Mapped[str] = mapped_column(String(200), unique=True)  # idempotency key sent to the receiver
    payload: Mapped[dict[str, Any]] = mapped_column(JSON(none_as_null=True))
    state: Mapped[str] = mapped_column(String(16))  # pending | sent | failed
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    history: Mapped[list[Any] | None] = mapped_column(JSON(none_as_null=True))
    next_at: Mapped[dt.datetime] = mapped_column(UTCDateTime, index=True)
    lease_until: Mapped[dt.datetime | None] = mapped_column(UTCDateTime)
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime, default=utcnow)
    sent_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime)
