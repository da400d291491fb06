"""The collector's own health metrics and the ``/metrics`` endpoint.

Everything lives on one injected ``CollectorRegistry`` (tests build their own). With several worker
processes (``PROMETHEUS_MULTIPROC_DIR`` set), counters and histograms are aggregated across processes by
prometheus-client's multiprocess collector; the per-run snapshot is per process, so run one worker per
replica (the default) and scale with replicas: Prometheus scrapes each replica and ``sum``/``max`` by
``run`` merges them.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from typing import Any, Protocol

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from layerwatch_server.core.batch import Batch
from layerwatch_server.core.state import Admission
from layerwatch_server.observability.snapshot import LatestSnapshot

_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class Telemetry:
    """Counters and histograms of the collector; ``ingest_hook`` feeds them and the snapshot."""

    def __init__(self, snapshot: LatestSnapshot, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry(auto_describe=True)
        self.snapshot = snapshot
        r = self.registry
        self.requests = Counter(
            "layerwatch_http_requests", "HTTP requests by route and status.", ["method", "route", "status"], registry=r
        )
        self.latency = Histogram(
            "layerwatch_http_request_duration_seconds", "Request latency.", ["route"], buckets=_BUCKETS, registry=r
        )
        self.ingest_rows = Counter("layerwatch_ingest_rows", "Rows stored by ingest.", ["kind"], registry=r)
        self.ingest_duplicates = Counter("layerwatch_ingest_duplicate_steps", "Re-sent steps skipped.", registry=r)
        self.db_errors = Counter("layerwatch_db_errors", "Requests answered 503: database busy or down.", registry=r)
        self.notification_failures = Counter(
            "layerwatch_notification_failures",
            "Alert notifications that could not be delivered.",
            ["channel"],
            registry=r,
        )
        r.register(snapshot)

    def ingest_hook(self, batch: Batch, res: Any) -> list[dict[str, Any]]:
        """An ingest hook (``AppState.ingest_hooks``): runs after commit, costs O(layers) per batch."""
        self.ingest_rows.labels("step").inc(res.steps)
        self.ingest_rows.labels("layer").inc(res.layer_rows)
        self.ingest_rows.labels("param").inc(res.param_rows)
        if res.duplicates:
            self.ingest_duplicates.inc(res.duplicates)
        self.snapshot.update(batch, res.run_id)
        return []

    @classmethod
    def from_settings(cls, settings: Any, registry: CollectorRegistry | None = None) -> Telemetry:
        snapshot = LatestSnapshot(
            tuple(settings.metrics_layer_stats),
            tuple(settings.metrics_param_stats),
            max_layers=settings.metrics_max_layers,
            layer_regex=settings.metrics_layer_regex,
            stale_s=settings.metrics_stale_s,
            ended_s=settings.metrics_ended_s,
        )
        return cls(snapshot, registry)

    def watch(self, state: Watched) -> None:
        """Gauges read from the app state at scrape time: in-flight ingests, MLflow mirror progress."""
        self.registry.register(_StateCollector(state))

    def render(self, accept: str | None = None) -> tuple[bytes, str]:
        from prometheus_client.exposition import choose_encoder

        registry: Any = self.registry
        if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
            from prometheus_client import multiprocess

            registry = CollectorRegistry()
            multiprocess.MultiProcessCollector(registry)
            registry.register(self.snapshot)
        encoder, content_type = choose_encoder(accept or "")
        return encoder(registry), content_type


class MirrorCounters(Protocol):
    """The MLflow mirror's progress, from the in-process worker or the mirror process's handle."""

    @property
    def lag_steps(self) -> float: ...
    @property
    def lag_seconds(self) -> float: ...
    @property
    def errors_total(self) -> float: ...
    @property
    def metrics_total(self) -> float: ...
    @property
    def requests_total(self) -> float: ...


class Watched(Protocol):
    """What the scrape-time gauges read from the collector's state."""

    @property
    def admission(self) -> Admission: ...
    @property
    def mlflow_mirror(self) -> MirrorCounters | None: ...


class _StateCollector(Collector):
    def __init__(self, state: Watched) -> None:
        self.state = state

    def collect(self) -> Iterator[Metric]:
        adm = self.state.admission
        yield GaugeMetricFamily(
            "layerwatch_ingest_inflight", "Ingest requests in flight (the queue).", value=adm.inflight
        )
        yield GaugeMetricFamily("layerwatch_ingest_inflight_limit", "In-flight ingests before 429.", value=adm.limit)
        yield CounterMetricFamily(
            "layerwatch_ingest_rejected", "Ingests answered 429 (overloaded).", value=adm.rejected
        )
        mirror = self.state.mlflow_mirror
        if mirror is not None:
            yield GaugeMetricFamily(
                "layerwatch_mlflow_mirror_lag_steps", "Steps not yet in MLflow (worst run).", value=mirror.lag_steps
            )
            yield GaugeMetricFamily(
                "layerwatch_mlflow_mirror_lag_seconds",
                "Age of the oldest step not in MLflow.",
                value=mirror.lag_seconds,
            )
            yield CounterMetricFamily(
                "layerwatch_mlflow_mirror_errors", "Mirror ticks that failed.", value=mirror.errors_total
            )
            yield CounterMetricFamily(
                "layerwatch_mlflow_mirror_metrics", "Metric values sent to MLflow.", value=mirror.metrics_total
            )
            yield CounterMetricFamily(
                "layerwatch_mlflow_mirror_requests", "Requests sent to MLflow.", value=mirror.requests_total
            )


class MetricsMiddleware:
    """Pure ASGI: counts requests by route template and status, times them; 503 counts as a DB error."""

    def __init__(self, app: ASGIApp, telemetry: Telemetry) -> None:
        self.app, self.t = app, telemetry

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start, status = time.perf_counter(), 500

        async def send_wrapper(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            route = scope.get("route")
            path = getattr(route, "path", "other")
            if path != "/metrics":
                self.t.latency.labels(path).observe(time.perf_counter() - start)
            self.t.requests.labels(scope.get("method", ""), path, str(status)).inc()
            if status == 503:
                self.t.db_errors.inc()
