"""The outbox: notifications written in the same transaction as the alert change, delivered later.

Rows are claimed with a lease (UPDATE .. WHERE lease expired .. RETURNING), so with several replicas
each row is sent by one of them; a replica that dies mid-send leaves a lease that expires and another
one retries (at-least-once; receivers get the row's ``key`` as Idempotency-Key to drop a repeat).
"""

from __future__ import annotations

import datetime as dt
from typing import Any, NamedTuple

from sqlalchemy import Connection, Engine, or_, select, update
from sqlalchemy.orm import Session

from layerwatch_server.core.backoff import backoff_s
from layerwatch_server.notify.config import NotifyConfig
from layerwatch_server.notify.payload import build
from layerwatch_server.storage import silences
from layerwatch_server.storage.alerts import Obs
from layerwatch_server.storage.models import AlertRow, OutboxRow

LEASE_S = 60.0


class Claimed(NamedTuple):
    """An outbox row leased to this process: what the sender needs to send it and record the outcome."""

    id: int
    channel: str
    key: str
    payload: dict[str, Any]
    attempts: int
    created_at: dt.datetime
    history: list[Any] | None

    @classmethod
    def of(cls, row: OutboxRow) -> Claimed:
        return cls(row.id, row.channel, row.key, row.payload, row.attempts, row.created_at, row.history)


def enqueue(
    session: Session,
    cfg: NotifyConfig,
    alert: AlertRow,
    status: str,
    obs: Obs | None,
    now: dt.datetime,
    tag: str = "",
    layers: list[str] | None = None,
) -> list[OutboxRow]:
    """Queue ``status`` of ``alert`` for every routed channel, unless a silence covers it. ``layers``: every layer
    of the (run, rule) incident the notification speaks for (default: the alert's own)."""
    channels = cfg.channels_for(alert.project, alert.severity)
    if not channels:
        return []
    if silences.covers(session, alert, now):
        return []
    session.flush()  # the alert row must exist for the payload's queries
    rows = []
    for ch in channels:
        key = f"{alert.id}-{alert.episode}-{status}{tag}-{ch}"
        payload = build(session, alert, status, obs, cfg.notify, key, layers)
        rows.append(
            OutboxRow(
                alert_id=alert.id,
                channel=ch,
                key=key,
                payload=payload,
                state="pending",
                attempts=0,
                history=[],
                next_at=now,
                created_at=now,
                # leased to this process from the start: its sender is handed the row after the commit and
                # sends it at once, without a claim (another write) on the way; if it dies, the lease expires
                lease_until=now + dt.timedelta(seconds=LEASE_S),
            )
        )
    session.add_all(rows)
    alert.notified_at = now
    return rows


def claim(conn: Connection, now: dt.datetime, ids: list[int] | None = None, limit: int = 50) -> list[Claimed]:
    """Lease due rows (or just ``ids``) to this process; the caller commits, then sends."""
    due = select(OutboxRow.id).where(
        OutboxRow.state == "pending",
        OutboxRow.next_at <= now,
        or_(OutboxRow.lease_until.is_(None), OutboxRow.lease_until < now),
    )
    if ids is not None:
        due = due.where(OutboxRow.id.in_(ids))
    due = due.order_by(OutboxRow.id).limit(limit)
    if conn.dialect.name == "postgresql":
        due = due.with_for_update(skip_locked=True)
    stmt = (
        update(OutboxRow)
        .where(OutboxRow.id.in_(due.scalar_subquery()))
        .values(lease_until=now + dt.timedelta(seconds=LEASE_S))
        .returning(
            OutboxRow.id,
            OutboxRow.channel,
            OutboxRow.key,
            OutboxRow.payload,
            OutboxRow.attempts,
            OutboxRow.created_at,
            OutboxRow.history,
        )
    )
    return [Claimed(*row) for row in conn.execute(stmt)]


def record(
    conn: Connection,
    row_id: int,
    attempts: int,
    created: dt.datetime,
    history: list[Any] | None,
    now: dt.datetime,
    error: str | None,
    *,
    permanent: bool = False,
    status: int | None = None,
    max_backoff_s: float = 60.0,
    give_up_s: float = 86400.0,
) -> str:
    """Store one attempt's outcome; returns the row's new state."""
    entry: dict[str, Any] = {"at": now.isoformat(), "ok": error is None, "status": status, "error": error}
    history = [*(history or []), entry][-20:]
    values: dict[str, Any] = {"attempts": attempts + 1, "history": history, "lease_until": None}
    if error is None:
        values.update(state="sent", sent_at=now)
    elif permanent or now - created > dt.timedelta(seconds=give_up_s):
        values.update(state="failed")
    else:
        backoff = backoff_s(attempts + 1, first_s=0.5, max_s=max_backoff_s)
        values.update(state="pending", next_at=now + dt.timedelta(seconds=backoff))
    conn.execute(update(OutboxRow).where(OutboxRow.id == row_id).values(**values))
    return values["state"]


def attempts_for(engine: Engine, alert_id: str) -> list[dict[str, Any]]:
    """An alert's notifications, each with its delivery attempts."""
    with Session(engine) as session:
        rows = session.scalars(select(OutboxRow).where(OutboxRow.alert_id == alert_id).order_by(OutboxRow.id)).all()
    return [
        {
            "id": r.id,
            "channel": r.channel,
            "key": r.key,
            "status": r.payload.get("status"),
            "state": r.state,
            "attempts": r.attempts,
            "history": r.history or [],
            "next_at": r.next_at.isoformat(),
            "sent_at": r.sent_at.isoformat() if r.sent_at else None,
        }
        for r in rows
    ]
