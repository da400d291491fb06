"""Writing one batch: a single transaction, idempotent on (run, rank, step), bulk inserts on the hot path.

Steps are *claimed* first with INSERT .. ON CONFLICT DO NOTHING RETURNING step: only the steps this
transaction inserted get layer/param rows, so a re-sent step is skipped entirely, and on PostgreSQL two
replicas racing on the same step serialise on its unique key (the loser sees it as a duplicate).
Layer and parameter rows then go in with executemany (SQLite) or COPY (PostgreSQL).

Hooks registered in ``Ingestor.in_transaction`` (alert rules) run inside the same transaction, each under a
savepoint: one commit per batch, and a hook that fails rolls back to its savepoint and never the batch.
They run before the run row is updated, so on PostgreSQL that row's lock (which every rank of a run
takes) is held only for the last statement before the commit.
"""

from __future__ import annotations

import datetime as dt
import logging
import operator
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from itertools import chain
from typing import Any

from pydantic import TypeAdapter
from sqlalchemy import BigInteger, Connection, Engine, String, Table, bindparam, delete, select, text, update

from layerwatch import wire
from layerwatch_server.core.batch import MAX_SERIES, Batch, LayerIn, ParamIn
from layerwatch_server.storage import histograms, partitions
from layerwatch_server.storage.base import LRU, UTCDateTime, dialect_insert, json_serializer, sqlite_float, utcnow
from layerwatch_server.storage.engine import writer
from layerwatch_server.storage.models import (
    Layer,
    Param,
    Project,
    Run,
    WriteProbe,
    layer_stats,
    param_stats,
)

_CLAIM_CHUNK = 1000  # rows per multi-VALUES claim (SQLite caps bound parameters)
_SERIES_ID = operator.itemgetter(1)
log = logging.getLogger("layerwatch_server.storage")


class StoreBusy(Exception):
    """The database could not take the write in time; the client should retry later (503)."""


class TooManySeries(ValueError):
    """A batch that would take a run past MAX_SERIES layers or parameters (422: resending cannot help)."""


@dataclass
class IngestResult:
    run_id: str
    steps: int
    duplicates: int
    layer_rows: int
    param_rows: int
    # What each in-transaction hook returned, by its name; None where it failed (rolled back, logged).
    staged: dict[str, Any] = field(default_factory=dict)


# (connection in the batch's transaction, batch, result so far) -> what to hand over after the commit
InTransaction = Callable[[Connection, Batch, IngestResult], Any]


class Ingestor:
    """Writes batches into one database. Thread-safe; on SQLite writers take turns on a process lock."""

    def __init__(self, engine: Engine, *, lock_timeout_s: float = 10.0, cache_runs: int = 256) -> None:
        self.engine = engine
        self._writer = writer(engine)
        self.pg = engine.dialect.name == "postgresql"
        self.lock_timeout_s = lock_timeout_s
        self._write_lock = threading.Lock()  # SQLite has one writer; waiting here beats SQLITE_BUSY
        self._cache_lock = threading.Lock()
        self._runs: LRU = LRU(cache_runs)  # (project, key) -> run id
        self._series: LRU = LRU(cache_runs * 2)  # (run id, "layer"|"param") -> {name: db id}
        self.in_transaction: dict[str, InTransaction] = {}

    def write(self, batch: Batch) -> IngestResult:
        if self.pg:
            return self._write(batch)
        if not self._write_lock.acquire(timeout=self.lock_timeout_s):
            raise StoreBusy(f"database write lock not free after {self.lock_timeout_s:.0f}s")
        try:
            return self._write(batch)
        finally:
            self._write_lock.release()

    def probe(self, replica: str, wait_s: float = 2.0) -> bool:
        """Commit one small write (``replica``'s row of write_probes), to learn that the database takes writes;
        raises what the database raised. False when the writer stayed busy for ``wait_s``: a batch is being
        written, which is no outage, and readiness checks must answer quickly."""
        if not self.pg and not self._write_lock.acquire(timeout=wait_s):
            return False
        try:
            now = utcnow()
            with self._writer.begin() as conn:
                insert = dialect_insert(conn, WriteProbe).values(replica=replica, checked_at=now)
                conn.execute(insert.on_conflict_do_update(index_elements=["replica"], set_={"checked_at": now}))
                # replicas come and go (a row per process): forget those not heard of for a day
                conn.execute(delete(WriteProbe).where(WriteProbe.checked_at < now - dt.timedelta(days=1)))
            return True
        finally:
            if not self.pg:
                self._write_lock.release()

    def _write(self, batch: Batch) -> IngestResult:
        learned: list[tuple[LRU, Any, Any]] = []
        with self._writer.begin() as conn:
            run_id = self._run_id(conn, batch, learned)
            new_steps: dict[int, Any] = {}
            res = IngestResult(run_id, 0, 0, 0, 0)
            if not batch.preview:  # a preview is for the hooks to judge; the combined report stores its steps
                new_steps = self._claim_steps(conn, run_id, batch)
                layer_ids = self._series_ids(conn, run_id, "layer", batch.layers, learned)
                param_ids = self._series_ids(conn, run_id, "param", batch.params, learned)
                n_layer = self._bulk(conn, layer_stats, "layer_id", run_id, batch, new_steps, layer_ids, "layers")
                n_param = self._bulk(conn, param_stats, "param_id", run_id, batch, new_steps, param_ids, "params")
                histograms.write(conn, run_id, batch.histograms, self.pg)
                res = IngestResult(run_id, len(new_steps), len(batch.steps) - len(new_steps), n_layer, n_param)
            self._first_wins(conn, run_id, batch)
            for name, hook in self.in_transaction.items():
                res.staged[name] = self._guarded(conn, name, hook, batch, res)
            self._touch(conn, run_id, batch, new_steps)
        with self._cache_lock:  # only after commit: a rolled-back id must never be cached
            for cache, key, value in learned:
                cache.put(key, value)
        return res

    @staticmethod
    def _guarded(conn: Connection, name: str, hook: InTransaction, batch: Batch, res: IngestResult) -> Any:
        try:
            with conn.begin_nested():
                return hook(conn, batch, res)
        except Exception:  # the batch's rows stay: only the hook's own writes are rolled back
            log.exception("in-transaction ingest hook %r failed; the batch is stored without it", name)
            return None

    def _run_id(self, conn: Connection, batch: Batch, learned: list[tuple[LRU, Any, Any]]) -> str:
        key = (batch.run.project, batch.run.key)
        with self._cache_lock:
            cached = self._runs.get(key)
        if cached is not None:
            return cached
        conn.execute(dialect_insert(conn, Project).values(name=key[0], created_at=utcnow()).on_conflict_do_nothing())
        project_id = conn.scalar(select(Project.id).where(Project.name == key[0]))
        now = utcnow()
        conn.execute(
            dialect_insert(conn, Run)
            .values(
                id=secrets.token_hex(6),
                project_id=project_id,
                key=key[1],
                name=batch.run.name or key[1],
                status="running",
                config=batch.run.config,
                world_size=batch.run.world_size,
                created_at=now,
                last_seen=now,
            )
            .on_conflict_do_nothing()
        )
        run_id = conn.scalar(select(Run.id).where(Run.project_id == project_id, Run.key == key[1]))
        learned.append((self._runs, key, run_id))
        return run_id

    def _claim_steps(self, conn: Connection, run_id: str, batch: Batch) -> dict[int, Any]:
        """Insert the step rows; return those this transaction inserted (the others are duplicates).

        Hand-written multi-VALUES SQL: Core would recompile a statement of this shape for every batch.
        """
        steps = sorted(batch.steps, key=lambda s: s.step)  # a fixed order: no lock-order deadlocks
        if not steps:
            return {}
        mark, cast = ("%s", "CAST(%s AS JSON)") if self.pg else ("?", "?")
        fl = (lambda v: v) if self.pg else sqlite_float
        one = f"({', '.join([mark] * 7)}, {cast})"
        claimed: set[int] = set()
        for i in range(0, len(steps), _CLAIM_CHUNK):
            chunk = steps[i : i + _CLAIM_CHUNK]
            params: list[Any] = []
            for s in chunk:
                scalars = json_serializer(s.scalars) if s.scalars else None
                params += (
                    run_id,
                    batch.rank,
                    s.step,
                    s.time,
                    fl(s.loss),
                    fl(s.lr),
                    fl(s.grad_norm_total),
                    scalars,
                )
            sql = (
                f"INSERT INTO step_stats (run_id, rank, step, time, {', '.join(wire.STEP_STATS)}, scalars) "
                f"VALUES {', '.join([one] * len(chunk))} ON CONFLICT DO NOTHING RETURNING step"
            )
            claimed.update(row[0] for row in conn.exec_driver_sql(sql, tuple(params)))
        return {s.step: s for s in steps if s.step in claimed}

    def _series_ids(
        self,
        conn: Connection,
        run_id: str,
        kind: str,
        defs: list[LayerIn] | list[ParamIn],
        learned: list[tuple[LRU, Any, Any]],
    ) -> dict[int, int]:
        """Batch index -> stable DB id, by name (wire indices are only valid inside one batch).

        New names go in with one statement whatever their number: multi-row INSERTs built with Core cost
        ~0.15 ms a row, most of it compiling them (40,000 new series held the SQLite writer for 6.6 s, 100,000
        for minutes); this one is built once, and its rows travel as one JSON array."""
        if not defs:
            return {}
        model = Layer if kind == "layer" else Param
        with self._cache_lock:
            known = self._series.get((run_id, kind))
        if known is None:  # first batch of this run since start (or evicted): what the run already has
            known = dict(conn.execute(select(model.name, model.id).where(model.run_id == run_id)).all())
        else:
            known = dict(known)
        missing = sorted((d for d in defs if d.name not in known), key=lambda d: d.name)
        if missing:
            if len(known) + len(missing) > MAX_SERIES:
                raise TooManySeries(
                    f"{kind}s: this batch would give run {run_id} {len(known) + len(missing)} {kind}s; "
                    f"a run may have at most {MAX_SERIES}"
                )
            rows = _AS_JSON[kind].dump_json(missing).decode()  # in Rust: 5x faster than json.dumps(model_dump())
            sql = _REGISTER_PG[kind] if self.pg else _REGISTER_SQLITE[kind]
            known.update(conn.exec_driver_sql(sql, (run_id, rows)).all())
            if any(d.name not in known for d in missing):  # another replica registered some meanwhile
                known.update(conn.execute(select(model.name, model.id).where(model.run_id == run_id)).all())
        learned.append((self._series, (run_id, kind), known))
        return {d.index: known[d.name] for d in defs}

    def _bulk(
        self,
        conn: Connection,
        table: Table,
        id_col: str,
        run_id: str,
        batch: Batch,
        new_steps: dict[int, Any],
        ids: dict[int, int],
        attr: str,
    ) -> int:
        names = batch.layer_stats if attr == "layers" else batch.param_stats
        rank = batch.rank
        # r[0] is a float that equals an int (the batch check made sure), so it finds the int key as it is
        if self.pg:  # and the partition key, the day of the step's time
            cols = ", ".join(["run_id", id_col, "rank", "step", "day", *names])
            now = time.time()
            day = {step: partitions.day_of(s.time, now) for step, s in new_steps.items()}
            rows = [
                (run_id, ids[r[0]], rank, step, day[step], *r[1:])
                for step, s in new_steps.items()
                for r in getattr(s, attr)
            ]
        else:
            cols = ", ".join(["run_id", id_col, "rank", "step", *names])
            rows = [(run_id, ids[r[0]], rank, step, *r[1:]) for step, s in new_steps.items() for r in getattr(s, attr)]
        if not rows:
            return 0
        # SQLite would store a bound NaN as NULL: NaN goes in as text (see storage.base). The sum of every
        # value, in C, is NaN when one is (or when +Inf meets -Inf); only then is each value looked at.
        if not self.pg:
            total = sum(
                filter(None, chain.from_iterable(chain.from_iterable(getattr(s, attr) for s in new_steps.values())))
            )
            if total != total:
                rows = [tuple(map(sqlite_float, row)) for row in rows]
        # In primary-key order (series, then step; the sort is stable and steps are sorted): each B-tree
        # leaf is visited once per batch instead of once per step, ~25% less insert work on SQLite.
        rows.sort(key=_SERIES_ID)
        if self.pg:
            cursor = conn.connection.driver_connection.cursor()
            with cursor, cursor.copy(f"COPY {table.name} ({cols}) FROM STDIN") as copy:
                for row in rows:
                    copy.write_row(row)
        else:
            marks = ", ".join("?" * (4 + len(names)))
            conn.exec_driver_sql(f"INSERT INTO {table.name} ({cols}) VALUES ({marks})", rows)
        return len(rows)

    def _touch(self, conn: Connection, run_id: str, batch: Batch, new_steps: dict[int, Any]) -> None:
        """Per-rank and per-run bookkeeping, last: every rank of a run updates the run row, so its lock is held
        from here to the commit only."""
        now = utcnow()
        conn.execute(
            _UPSERT_RANK,
            {
                "run_id": run_id,
                "rank": batch.rank,
                "host": batch.host,
                "pid": batch.pid,
                "seq": batch.seq,
                "now": now,
                "dr": batch.dropped.reports,
                "db": batch.dropped.batches,
            },
        )
        lo, hi = (min(new_steps), max(new_steps)) if new_steps else (None, None)
        end = batch.end.status if batch.end is not None else None
        conn.execute(_TOUCH_RUN, {"id": run_id, "now": now, "lo": lo, "hi": hi, "end": end})

    def _first_wins(self, conn: Connection, run_id: str, batch: Batch) -> None:
        """A run's config does not change once set, and its non-finite origin is the earliest any rank reported
        (under DDP a NaN of one rank's forward reaches every rank's gradients in the same step, and each rank's
        tripwire may report its view first). Before the hooks, which read them; an UPDATE whose WHERE no longer
        matches takes no row lock, and only the rare batch that names an origin locks the run row (the alert
        rules lock it next anyway), so this costs no waiting later."""
        if batch.run.config is not None:
            conn.execute(update(Run).where(Run.id == run_id, Run.config.is_(None)).values(config=batch.run.config))
        if batch.nonfinite_origin is not None:
            origin = batch.nonfinite_origin.model_dump(by_alias=True)
            current = conn.scalar(select(Run.nonfinite_origin).where(Run.id == run_id).with_for_update())
            if current is None or _origin_order(origin) < _origin_order(current):
                conn.execute(update(Run).where(Run.id == run_id).values(nonfinite_origin=origin))


_PASSES = {"forward": 0, "loss": 1, "backward": 2}  # as a step computes them


def _origin_order(origin: dict[str, Any]) -> tuple[int, int]:
    return int(origin.get("step", 0)), _PASSES.get(str(origin.get("pass")), len(_PASSES))


# Hand-written once (valid on SQLite and PostgreSQL): building these with Core per batch cost more
# than the inserts of 500 layer rows.
_UPSERT_RANK = text(
    "INSERT INTO run_ranks (run_id, rank, host, pid, last_seq, last_seen, dropped_reports, dropped_batches) "
    "VALUES (:run_id, :rank, :host, :pid, :seq, :now, :dr, :db) ON CONFLICT (run_id, rank) DO UPDATE SET "
    "host = excluded.host, pid = excluded.pid, last_seq = excluded.last_seq, last_seen = excluded.last_seen, "
    "dropped_reports = excluded.dropped_reports, dropped_batches = excluded.dropped_batches"
).bindparams(bindparam("now", type_=UTCDateTime()))

_TOUCH_RUN = text(
    "UPDATE runs SET last_seen = :now, "
    "first_step = CASE WHEN :lo IS NOT NULL AND (first_step IS NULL OR first_step > :lo) "
    "THEN :lo ELSE first_step END, "
    "last_step = CASE WHEN :hi IS NOT NULL AND (last_step IS NULL OR last_step < :hi) "
    "THEN :hi ELSE last_step END, "
    # an end status is final; a stalled run that sends new steps is running again
    "status = CASE WHEN :end IS NOT NULL THEN :end WHEN :lo IS NOT NULL AND status = 'stalled' "
    "THEN 'running' ELSE status END "
    "WHERE id = :id"
).bindparams(
    bindparam("now", type_=UTCDateTime()),
    bindparam("lo", type_=BigInteger()),
    bindparam("hi", type_=BigInteger()),
    bindparam("end", type_=String()),
)


# New series of a batch in one statement, from one JSON array of their definitions; RETURNING gives the ids of
# those inserted (a name another replica registered meanwhile is not returned, and is read back instead).
_SERIES_COLUMNS = {
    "layer": ("index", "name", "type", "kind", "shape", "units"),
    "param": ("index", "name", "shape", "numel"),
}
_PG_TYPES = {
    "index": "integer",
    "name": "text",
    "type": "text",
    "kind": "text",
    "shape": "json",
    "units": "bigint",
    "numel": "bigint",
}


def _register_sqlite(table: str, cols: tuple[str, ...]) -> str:
    picks = ", ".join(f"json_extract(value, '$.{c}')" for c in cols)
    names = ", ".join(f'"{c}"' for c in cols)
    # WHERE true: without it SQLite would read ON CONFLICT as a join constraint of the SELECT
    return (
        f"INSERT INTO {table} (run_id, {names}) SELECT ?, {picks} FROM json_each(?) WHERE true "
        "ON CONFLICT DO NOTHING RETURNING name, id"
    )


def _register_pg(table: str, cols: tuple[str, ...]) -> str:
    names = ", ".join(f'"{c}"' for c in cols)
    typed = ", ".join(f'"{c}" {_PG_TYPES[c]}' for c in cols)
    return (
        f"INSERT INTO {table} (run_id, {names}) SELECT %s, {names} FROM json_to_recordset(%s::json) AS r({typed}) "
        "ON CONFLICT DO NOTHING RETURNING name, id"
    )


_AS_JSON: dict[str, TypeAdapter[Any]] = {"layer": TypeAdapter(list[LayerIn]), "param": TypeAdapter(list[ParamIn])}
_REGISTER_SQLITE = {kind: _register_sqlite(f"{kind}s", cols) for kind, cols in _SERIES_COLUMNS.items()}
_REGISTER_PG = {kind: _register_pg(f"{kind}s", cols) for kind, cols in _SERIES_COLUMNS.items()}
