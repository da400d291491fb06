"""The delivery worker: sends newly queued notifications at once and retries due ones with backoff.

One daemon thread per process. Ingest hands it the rows it queued right after the alert's commit (they are
already leased to this process, so they go out without another write first: latency); otherwise it polls
the outbox every ``poll_s`` so a retry, a restart or another replica's leftovers get delivered. Outcomes
are recorded after a pass's sends, in one transaction (on SQLite every write waits for the one writer).
"""

from __future__ import annotations

import datetime as dt
import logging
import threading
from collections import deque
from collections.abc import Callable, Iterable
from typing import NamedTuple

import httpx
from sqlalchemy import Engine

from layerwatch_server.notify import outbox
from layerwatch_server.notify.channels import DeliveryError, send
from layerwatch_server.notify.config import NotifyConfig
from layerwatch_server.storage.base import utcnow
from layerwatch_server.storage.engine import writer
from layerwatch_server.storage.models import OutboxRow

log = logging.getLogger("layerwatch_server.notify")


class Outcome(NamedTuple):
    """One delivery attempt, recorded after a pass's sends."""

    row: outbox.Claimed
    at: dt.datetime
    error: str | None
    permanent: bool
    status: int | None


class Sender:
    def __init__(self, engine: Engine, cfg: Callable[[], NotifyConfig], poll_s: float = 1.0) -> None:
        self.engine, self.cfg, self.poll_s = engine, cfg, poll_s
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._client = httpx.Client()
        self._handed: deque[outbox.Claimed] = deque()

    def hand(self, rows: Iterable[OutboxRow]) -> None:
        """Rows just committed (leased to this process by :func:`outbox.enqueue`): send them now."""
        self._handed.extend(outbox.Claimed.of(r) for r in rows)
        self._wake.set()

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="layerwatch-notify", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
            self._thread = None
        self._client.close()

    def _run(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(self.poll_s)
            self._wake.clear()
            try:
                while self._handed and not self._stop.is_set():
                    rows = [self._handed.popleft() for _ in range(min(50, len(self._handed)))]
                    self._deliver(rows)
                while self.deliver_due() and not self._stop.is_set():
                    pass
            except Exception:  # the database may be down: the rows stay queued, try again next poll
                log.warning("outbox delivery pass failed", exc_info=True)

    def deliver_due(self) -> int:
        """Claim due rows, send each, record the outcomes; returns how many were attempted."""
        with writer(self.engine).begin() as conn:
            rows = outbox.claim(conn, utcnow())
        self._deliver(rows)
        return len(rows)

    def _deliver(self, rows: list[outbox.Claimed]) -> None:
        cfg = self.cfg()
        outcomes: list[Outcome] = []
        for row in rows:
            ch = cfg.channels.get(row.channel)
            error, permanent, status = None, False, None
            try:
                if ch is None:
                    raise DeliveryError(f"channel {row.channel!r} is no longer configured", permanent=True)
                status = send(ch, row.payload, row.key, self._client, cfg.notify.renotify_s)
            except DeliveryError as exc:
                error, permanent, status = str(exc), exc.permanent, exc.status
            except Exception as exc:  # a bug in one channel must not stop the others
                log.exception("channel %s failed", row.channel)
                error = f"{type(exc).__name__}: {exc}"
            outcomes.append(Outcome(row, utcnow(), error, permanent, status))
        if not outcomes:
            return
        with writer(self.engine).begin() as conn:
            for o in outcomes:
                state = outbox.record(
                    conn,
                    o.row.id,
                    o.row.attempts,
                    o.row.created_at,
                    o.row.history,
                    o.at,
                    o.error,
                    permanent=o.permanent,
                    status=o.status,
                    max_backoff_s=cfg.notify.max_backoff_s,
                    give_up_s=cfg.notify.give_up_s,
                )
                if o.error:
                    log.warning("notification %s to %s: %s (now %s)", o.row.key, o.row.channel, o.error, state)
