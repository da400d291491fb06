"""What follows a commit that changed alerts: their notifications delivered, the listeners told.

The rules write notifications through an injected :class:`Emit` (notify's outbox, wired by ``api.alerting``)
inside the alerts' transaction; after the commit :class:`FanOut` hands them to :data:`Deliver` and tells the
listeners (the Prometheus snapshot) the run's current alerts. The rules never import notify.
"""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Callable
from typing import Any, Protocol

from sqlalchemy.orm import Session

from layerwatch_server.storage.alerts import Obs
from layerwatch_server.storage.models import AlertRow

Clock = Callable[[], dt.datetime]
Listener = Callable[[str, list[dict[str, Any]]], None]  # (run_id, the run's current alerts)


class Emit(Protocol):
    """Queues the notifications of one alert transition in the caller's session (the alert's transaction) and
    returns them, to be handed to :data:`Deliver` after the commit. Notify provides it (``api.alerting`` wires
    it in): the rules say what changed, not where it goes."""

    def __call__(
        self,
        session: Session,
        alert: AlertRow,
        status: str,
        obs: Obs | None,
        now: dt.datetime,
        *,
        tag: str = "",
        layers: list[str] | None = None,
    ) -> list[Any]: ...


Deliver = Callable[[list[Any]], None]  # what Emit queued, after its commit: send it now


class FanOut:
    def __init__(self, deliver: Deliver) -> None:
        self.deliver = deliver
        self.listeners: list[Listener] = []

    def after_commit(
        self, queued: list[Any], run_id: str | None = None, alerts: list[dict[str, Any]] | None = None
    ) -> None:
        """Deliver ``queued`` and tell the listeners ``run_id``'s ``alerts`` (when given)."""
        if queued:
            self.deliver(queued)
        if run_id is None or alerts is None:
            return
        for listener in self.listeners:
            try:
                listener(run_id, alerts)
            except Exception:  # an observer must not fail an ingest or a tick
                logging.getLogger("layerwatch_server.rules").exception("alert listener %r failed", listener)
