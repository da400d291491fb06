"""PostgreSQL: ``layer_stats`` and ``param_stats`` are partitioned by day, so retention drops a day at once.

The partition key ``day`` is the UTC day (days since 1970-01-01) of the step's time, as ingest writes it, and
never later than the collector's today (a client whose clock runs ahead does not fill tomorrow) nor
before 1970. One partition
per day, named ``<table>_YYYY_MM_DD``, and a ``<table>_default`` partition for rows of a day that has none (a
synced run older than the collector, days when no replica ran the scheduler): ingest never fails for want of a
partition. Retention (:mod:`layerwatch_server.jobs.retention`) rolls up and drops days older than its horizon;
the scheduler's retention tick creates the next :data:`AHEAD_DAYS` days ahead, each as a table of its own then
attached (ATTACH takes a lock that lets ingest and queries go on; ``CREATE TABLE .. PARTITION OF`` would block
them). ``step_stats`` and ``histograms`` stay plain tables: their primary keys make a re-sent step a duplicate,
which a partition key in them would not (a step re-sent the day after would land again), and they are small
(one row per step, and one per layer every ``histogram_every`` steps, against one per layer per step).

SQLite keeps plain tables; its ``day`` is 0 and retention deletes rows there.
"""

from __future__ import annotations

import datetime as dt
import logging
import re
from dataclasses import dataclass

from sqlalchemy import Connection, Engine, text
from sqlalchemy.exc import DBAPIError

from layerwatch_server.storage.engine import writer

log = logging.getLogger("layerwatch_server.storage")

PARTITIONED = ("layer_stats", "param_stats")
DAY_S = 86400
AHEAD_DAYS = 7  # days created ahead: a week without a scheduler tick before rows fall into the default partition
LOCK_TIMEOUT = "2s"  # DDL waits at most this for its lock; ingest queued behind it waits no longer
_DDL_LOCK = 7263  # advisory lock: one replica at a time creates partitions (7262 is the migrations')
_EPOCH = dt.date(1970, 1, 1)
_BOUND = re.compile(r"FOR VALUES FROM \('?(-?\d+)'?\) TO \('?(-?\d+)'?\)")
_NAME = re.compile(rf"(?:{'|'.join(PARTITIONED)})_(?:\d{{4}}_\d{{2}}_\d{{2}}|default)")


def include_name(name: str | None, type_: str, parent_names: object) -> bool:
    """Alembic's ``include_name``: partitions are made at run time, not by revisions, so comparing the models
    with a database (autogenerate, the parity test) leaves them out."""
    return not (type_ == "table" and name is not None and _NAME.fullmatch(name))


def day_of(time_s: float, now_s: float) -> int:
    """The partition key of a step stored at ``now_s`` whose time is ``time_s`` (a time before 1970: day 0)."""
    return max(0, int(min(time_s, now_s) // DAY_S))


def name(table: str, day: int) -> str:
    return f"{table}_{_EPOCH + dt.timedelta(days=day):%Y_%m_%d}"


@dataclass(frozen=True)
class Partition:
    name: str
    lo: int | None  # first day it holds; None for the default partition
    hi: int | None  # first day it does not hold


def attached(conn: Connection, table: str) -> list[Partition]:
    """The partitions of ``table``, days in order, the default partition last; [] where it is not partitioned."""
    rows = conn.execute(
        text(
            "SELECT c.relname, pg_get_expr(c.relpartbound, c.oid) FROM pg_inherits i "
            "JOIN pg_class c ON c.oid = i.inhrelid WHERE i.inhparent = to_regclass(:t)"
        ),
        {"t": table},
    ).all()
    out = []
    for relname, bound in rows:
        m = _BOUND.fullmatch(bound)
        out.append(Partition(relname, int(m[1]), int(m[2])) if m else Partition(relname, None, None))
    return sorted(out, key=lambda p: (p.lo is None, p.lo or 0))


def ensure(engine: Engine, now_s: float, ahead: int = AHEAD_DAYS) -> list[str]:
    """Create the partitions of today and the ``ahead`` days after it that do not exist; returns their names.

    Safe from several replicas at once (an advisory lock, and each day looked up under it). A day whose rows
    already sit in the default partition is left to it (attaching would fail on them) and logged.
    """
    if engine.dialect.name != "postgresql":
        return []
    today = int(now_s // DAY_S)
    created = []
    with writer(engine).begin() as conn:
        conn.execute(text(f"SET LOCAL lock_timeout = '{LOCK_TIMEOUT}'"))
        conn.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": _DDL_LOCK})
        for table in PARTITIONED:
            have = {p.lo for p in attached(conn, table)}
            if not have:
                continue  # not partitioned (yet): nothing to do before the migration
            for day in range(today, today + ahead + 1):
                if day in have:
                    continue
                try:
                    with conn.begin_nested():
                        create(conn, table, day)
                    created.append(name(table, day))
                except DBAPIError as exc:
                    log.warning("partition %s not created: %s", name(table, day), str(exc.orig).strip())
    if created:
        log.info("created partitions %s", ", ".join(created))
    return created


def create(conn: Connection, table: str, day: int) -> None:
    """One day's partition: a table like ``table``, then attached (its primary key index comes with it)."""
    part = name(table, day)
    conn.execute(text(f'CREATE TABLE "{part}" (LIKE "{table}" INCLUDING DEFAULTS)'))
    conn.execute(text(f'ALTER TABLE "{table}" ATTACH PARTITION "{part}" FOR VALUES FROM ({day}) TO ({day + 1})'))
