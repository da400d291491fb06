"""Silences: mute the notifications of matching alerts (project, run, rule, layer pattern) for a while."""

from __future__ import annotations

import datetime as dt
import fnmatch
import secrets
from typing import Any

from sqlalchemy import Engine, false, insert, or_, select, update
from sqlalchemy.orm import Session

from layerwatch_server.storage.base import utcnow
from layerwatch_server.storage.engine import writer
from layerwatch_server.storage.models import Silence

_TABLE = Silence.__table__


def create(
    engine: Engine,
    *,
    project: str | None,
    run_id: str | None,
    rule: str | None,
    layer: str | None,
    comment: str,
    duration_s: float,
) -> dict[str, Any]:
    """A silence starting now; returns its public shape."""
    now = utcnow()
    values = {
        "id": secrets.token_hex(6),
        "project": project,
        "run_id": run_id,
        "rule": rule,
        "layer": layer,
        "comment": comment,
        "starts_at": now,
        "ends_at": now + dt.timedelta(seconds=duration_s),
    }
    with writer(engine).begin() as conn:
        conn.execute(insert(_TABLE).values(**values))
    return silence_dict(values)


def in_force(engine: Engine, only: set[str] | None) -> list[dict[str, Any]]:
    """Silences in force, soonest to end first: over the projects ``only`` (None: every project), those that
    cover every project included."""
    q = select(_TABLE).where(Silence.ends_at > utcnow()).order_by(Silence.ends_at)
    if only is not None:
        q = q.where(or_(Silence.project.in_(only), Silence.project.is_(None))) if only else q.where(false())
    with engine.connect() as conn:
        return [silence_dict(row) for row in conn.execute(q).mappings()]


def project_in_force(engine: Engine, silence_id: str) -> tuple[bool, str | None]:
    """(True, its project) for a silence in force (project None: every project); (False, None) otherwise."""
    with engine.connect() as conn:
        row = conn.execute(select(Silence.project).where(Silence.id == silence_id, Silence.ends_at > utcnow())).first()
    return (False, None) if row is None else (True, row.project)


def end(engine: Engine, silence_id: str) -> bool:
    """End a silence now; False when it was not in force."""
    now = utcnow()
    with writer(engine).begin() as conn:
        done = conn.execute(update(Silence).where(Silence.id == silence_id, Silence.ends_at > now).values(ends_at=now))
    return done.rowcount > 0


def covers(session: Session, alert: Any, now: dt.datetime) -> bool:
    """Whether a silence in force at ``now`` covers ``alert`` (an AlertRow or a record with its attributes)."""
    rows = session.scalars(select(Silence).where(Silence.ends_at > now, Silence.starts_at <= now))
    for s in rows:
        if s.project not in (None, alert.project) or s.run_id not in (None, alert.run_id):
            continue
        if s.rule not in (None, alert.rule):
            continue
        if s.layer is not None and not fnmatch.fnmatchcase(alert.layer_key, s.layer):
            continue
        return True
    return False


def silence_dict(s: Any) -> dict[str, Any]:
    """The public shape of a silence (a row mapping or the values written)."""
    return {
        "id": s["id"],
        "project": s["project"],
        "run_id": s["run_id"],
        "rule": s["rule"],
        "layer": s["layer"],
        "comment": s["comment"],
        "starts_at": s["starts_at"].isoformat(),
        "ends_at": s["ends_at"].isoformat(),
    }
