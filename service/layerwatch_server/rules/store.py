"""A run's alerts on the ingest path: plain records in, one executemany per kind of change out.

Every batch reads all of its run's alerts (one per rule and layer: dozens) and may change many of them
(ranks that disagree re-open and resolve the same alert batch after batch). As ORM objects that cost
~30 us per alert to load and as much again to flush, more than evaluating the rules; as slotted records
read with one Core query and written back with one statement per set of changed columns, a few us.
:class:`AlertRecord` has the attributes of :class:`~layerwatch_server.storage.models.AlertRow`, so the
lifecycle, the outbox and ``alert_dict`` take either.
"""

from __future__ import annotations

import operator
from collections.abc import Iterable
from typing import Any

from sqlalchemy import Connection, Update, bindparam, insert, select, update

from layerwatch_server.storage.models import AlertRow

_TABLE = AlertRow.__table__
COLUMNS = tuple(c.name for c in _TABLE.columns)
# What the lifecycle (and the outbox's notified_at) may change; the rest names the alert.
MUTABLE = tuple(c for c in COLUMNS if c not in ("id", "run_id", "project", "rule", "layer_key"))
_MUTABLE_OF = operator.itemgetter(*(COLUMNS.index(name) for name in MUTABLE))
_LOAD = select(_TABLE).where(_TABLE.c.run_id == bindparam("run_id"))
_INSERT = insert(_TABLE)
_UPDATES: dict[tuple[str, ...], Update] = {}


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
    groups: dict[tuple[str, ...], list[dict[str, Any]]] = {}
    for rec in records:
        if rec.loaded is None:
            new.append({name: getattr(rec, name) for name in COLUMNS})
        elif changed := rec.changed():
            params = {f"b_{name}": getattr(rec, name) for name in changed}
            params["b_id"] = rec.id
            groups.setdefault(changed, []).append(params)
    if new:
        conn.execute(_INSERT, new)
    for changed, params in groups.items():
        conn.execute(_update(changed), params)


def _update(changed: tuple[str, ...]) -> Update:
    stmt = _UPDATES.get(changed)
    if stmt is None:
        # Bound names differ from column names: SQLAlchemy reserves the latter for its own SET parameters.
        values = {name: bindparam(f"b_{name}", type_=_TABLE.c[name].type) for name in changed}
        stmt = _UPDATES[changed] = update(_TABLE).where(_TABLE.c.id == bindparam("b_id")).values(values)
    return stmt
