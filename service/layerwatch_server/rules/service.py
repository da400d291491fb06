"""Alerting assembled from its pieces, one job each: the rule book (which rules apply where,
``rules.book``), the evaluation on ingest (``rules.evaluation``), the scheduled tick (``rules.schedule``) and
the fan-out after a commit (``rules.fanout``). The notifications go out through the ``emit`` and ``deliver``
it is given (``api.alerting`` wires notify's outbox and sender in); it owns no thread.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import Engine

from layerwatch_server.core.batch import Batch
from layerwatch_server.rules.book import RuleBook
from layerwatch_server.rules.config import RulesConfig
from layerwatch_server.rules.evaluation import Evaluation
from layerwatch_server.rules.fanout import Clock, Deliver, Emit, FanOut, Listener
from layerwatch_server.rules.schedule import Schedule
from layerwatch_server.storage.base import utcnow
from layerwatch_server.storage.ingest import Ingestor, IngestResult


class Alerting:
    def __init__(
        self,
        engine: Engine,
        cfg: RulesConfig,
        *,
        emit: Emit,
        deliver: Deliver,
        renotify_s: float,
        resolved_visible_s: float,
        clock: Clock = utcnow,
        cache_s: float = 2.0,
    ) -> None:
        self.book = RuleBook(engine, cfg, cache_s=cache_s)
        self.fanout = FanOut(deliver)
        self.evaluation = Evaluation(self.book, emit, self.fanout, resolved_visible_s=resolved_visible_s, clock=clock)
        self.schedule = Schedule(self.book, emit, self.fanout, renotify_s=renotify_s, clock=clock)

    @property
    def listeners(self) -> list[Listener]:
        """Called with (run_id, the run's current alerts) after each change: the Prometheus snapshot."""
        return self.fanout.listeners

    @property
    def clock(self) -> Clock:
        return self.evaluation.clock

    @clock.setter
    def clock(self, clock: Clock) -> None:  # tests move time for ingest and tick alike
        self.evaluation.clock = self.schedule.clock = clock

    # The hooks the collector registers: in the batch's transaction, after its commit, on the scheduler.
    def attach(self, ingestor: Ingestor) -> None:
        self.evaluation.attach(ingestor)

    def on_ingest(self, batch: Batch, res: IngestResult) -> list[dict[str, Any]]:
        return self.evaluation.on_ingest(batch, res)

    def tick(self, engine: Engine, now_s: float | None = None) -> None:
        self.schedule.tick(engine, now_s)
