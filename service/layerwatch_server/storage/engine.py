"""Engine construction: SQLite tuned for a single writer in WAL mode, PostgreSQL with bounded waits.

Transactions that write go through :func:`writer`. On SQLite they begin IMMEDIATE, taking the write lock up
front: a deferred transaction that reads before it writes holds a snapshot, and when another connection commits
after that read, its first write fails at once with "database is locked" (no busy wait can help). SQLAlchemy
emits every BEGIN itself (pysqlite's own, issued only before DML, would leave a SAVEPOINT opening the
transaction, and its RELEASE committing the batch half-way).
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path
from typing import Any

from sqlalchemy import Connection, Engine, create_engine, event
from sqlalchemy.engine import make_url

from layerwatch_server.storage.base import json_serializer

log = logging.getLogger("layerwatch_server.storage")


def writer(engine: Engine) -> Engine:
    """``engine`` for a transaction that writes (on SQLite: BEGIN IMMEDIATE; elsewhere the same engine)."""
    return engine.execution_options(sqlite_begin="IMMEDIATE")


def make_engine(
    db_url: str, *, timeout_s: float = 10.0, pool_size: int = 8, background_checkpoint: bool = False
) -> Engine:
    """``background_checkpoint`` (SQLite): writers never checkpoint; run a :class:`Checkpointer`."""
    url = make_url(db_url)
    if url.get_backend_name() == "sqlite":
        return _sqlite_engine(db_url, timeout_s, background_checkpoint)
    if url.get_backend_name() != "postgresql":
        raise ValueError(f"unsupported database {url.get_backend_name()!r}; use sqlite:// or postgresql+psycopg://")
    lock_ms = int(timeout_s * 1000)
    return create_engine(
        url,
        pool_size=pool_size,
        max_overflow=pool_size,
        pool_timeout=timeout_s,
        pool_pre_ping=True,
        json_serializer=json_serializer,
        # A lock held by another replica or a stuck query turns into an error (then a 503), not a hang.
        connect_args={"connect_timeout": max(1, int(timeout_s)), "options": f"-c lock_timeout={lock_ms}"},
    )


def _sqlite_engine(db_url: str, timeout_s: float, background_checkpoint: bool) -> Engine:
    url = make_url(db_url)
    if url.database and url.database != ":memory:":
        Path(url.database).parent.mkdir(parents=True, exist_ok=True)
    engine = create_engine(
        url,
        json_serializer=json_serializer,
        connect_args={"check_same_thread": False, "timeout": timeout_s},
    )

    @event.listens_for(engine, "connect")
    def _pragmas(dbapi_conn: Any, _record: Any) -> None:
        dbapi_conn.isolation_level = None  # no BEGIN of pysqlite's own: ``_begin`` issues them all
        cur = dbapi_conn.cursor()
        cur.execute("PRAGMA journal_mode=WAL")
        cur.execute("PRAGMA synchronous=NORMAL")  # WAL: safe against a crash of this process
        cur.execute("PRAGMA cache_size=-16384")  # 16 MiB per connection: B-tree pages of every layer
        cur.execute(f"PRAGMA busy_timeout={int(timeout_s * 1000)}")
        if background_checkpoint:
            cur.execute("PRAGMA wal_autocheckpoint=0")
        cur.close()

    @event.listens_for(engine, "begin")
    def _begin(conn: Connection) -> None:
        conn.exec_driver_sql(f"BEGIN {conn.get_execution_options().get('sqlite_begin', 'DEFERRED')}")

    return engine


class Checkpointer:
    """Moves the SQLite WAL into the database file from a background thread.

    With the default auto-checkpoint the committing ingest pays for copying pages and the fsync; with
    50 layers per batch that was most of its time. A passive checkpoint every second never blocks
    writers; a truncating one now and then keeps the WAL file from growing without bound.
    """

    def __init__(self, engine: Engine, interval_s: float = 1.0, truncate_every: int = 60) -> None:
        self.engine, self.interval_s, self.truncate_every = engine, interval_s, truncate_every
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="layerwatch-sqlite-checkpoint", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def _run(self) -> None:
        n = 0
        while not self._stop.wait(self.interval_s):
            n += 1
            mode = "TRUNCATE" if n % self.truncate_every == 0 else "PASSIVE"
            try:
                with self.engine.connect() as conn:
                    conn.exec_driver_sql(f"PRAGMA wal_checkpoint({mode})")
            except Exception:  # a busy or vanished database: try again next interval
                log.warning("WAL checkpoint (%s) failed", mode, exc_info=True)

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=30)
        try:
            with self.engine.connect() as conn:
                conn.exec_driver_sql("PRAGMA wal_checkpoint(TRUNCATE)")
        except Exception:
            log.warning("final WAL checkpoint failed", exc_info=True)
