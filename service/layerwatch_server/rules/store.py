"""A run's alerts on the ingest path: plain records in, one executemany per kind of change out.

Every batch reads all of its run's alerts (one per rule and layer: dozens) and may change many of them
(a pending alert's evidence moves at every report). As ORM objects that cost
~30 us per alert to load and as much again to flush, more than evaluating the rules; as slotted records
read with one Core query and written back with one statement per set of changed columns, a few us.
:class:`AlertRecord` has the attributes of :class:`~layerwatch_server.storage.models.AlertRow`, so the
lifecycle, the outbox and ``alert_dict`` take either.
"""

from __future__ import annotations

import operator
from collections.abc import Iterable
from typing import Any

from sqlalchemy import Connection, bindparam, insert, select
from sqlalchemy.engine import Dialect

from layerwatch_server.storage.models import AlertRow

_TABLE = AlertRow.__table__
COLUMNS = tuple(c.name for c in _TABLE.columns)
# What the lifecycle (and the outbox's notified_at) may change; the rest names the alert (and evidence is
# written by nobody on this path).
MUTABLE = tuple(c for c in COLUMNS if c not in ("id", "run_id", "project", "rule", "layer_key", "evidence"))
_MUTABLE_OF = operator.itemgetter(*(COLUMNS.index(name) for name in MUTABLE))
_LOAD = select(_TABLE).where(_TABLE.c.run_id == bindparam("run_id"))
_INSERT = insert(_TABLE)
_UPDATES: dict[tuple[str, tuple[str, ...]], tuple[str, tuple[Any, ...]]] = {}


class AlertRecord:
    """One alert row as a plain object; ``loaded`` holds its MUTABLE values as read (None: a new alert)."""

    def __init__(self, **values: Any) -> None:
        self.__dict__.update(dict.fromkeys(COLUMNS), **values)
        self.loaded: tuple[Any, ...] | None = None

    def mutable(self) -> tuple[Any, ...]:
        return tuple(map(self.__dict__.__getitem__, MUTABLE))

    def changed(self) -> tuple[str, ...]:
        """Columns whose value differs from the one loaded (an unchanged attribute is the same object)."""
        assert self.loaded is not None
        return tuple(
            name
            for name, was, now in zip(MUTABLE, self.loaded, self.mutable(), strict=True)
            if now is not was and now != was
        )


def load(conn: Connection, run_id: str) -> dict[tuple[str, str], AlertRecord]:
    """The run's alerts by (rule, layer key)."""
    out = {}
    for row in conn.execute(_LOAD, {"run_id": run_id}):
        rec = object.__new__(AlertRecord)
        rec.__dict__ = dict(zip(COLUMNS, row, strict=True))
        rec.loaded = _MUTABLE_OF(row)
        out[(rec.rule, rec.layer_key)] = rec
    return out


def save(conn: Connection, alerts: Iterable[AlertRecord]) -> None:
    """Insert the new records, update the changed ones: one executemany per set of changed columns. The
    records are spent afterwards (``loaded`` is not brought up to date): load again for the next batch."""
    records = list(alerts)
    new: list[dict[str, Any]] = []
    groups: dict[tuple[str, ...], list[AlertRecord]] = {}
    for rec in records:
        if rec.loaded is None:
            new.append({name: getattr(rec, name) for name in COLUMNS})
        elif changed := rec.changed():
            groups.setdefault(changed, []).append(rec)
    if new:
        conn.execute(_INSERT, new)
    for changed, recs in groups.items():
        sql, processors = _update(conn.dialect, changed)
        rows = []
        for rec in recs:
            values = [getattr(rec, name) for name in changed]
            rows.append((*(v if p is None else p(v) for p, v in zip(processors, values, strict=True)), rec.id))
        conn.exec_driver_sql(sql, rows)


def _update(dialect: Dialect, changed: tuple[str, ...]) -> tuple[str, tuple[Any, ...]]:
    """UPDATE .. SET the changed columns WHERE id, as driver SQL with the columns' own bind processors:
    Core's per-row parameter handling cost three times the database's work for these rows."""
    key = (dialect.name, changed)
    hit = _UPDATES.get(key)
    if hit is None:
        mark, quote = ("?" if dialect.paramstyle == "qmark" else "%s"), dialect.identifier_preparer.quote
        sets = ", ".join(f"{quote(name)} = {mark}" for name in changed)
        processors = tuple(_TABLE.c[name].type.bind_processor(dialect) for name in changed)
        hit = _UPDATES[key] = (f"UPDATE {_TABLE.name} SET {sets} WHERE id = {mark}", processors)
    return hit
