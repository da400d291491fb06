"""The MLflow mirror worker: a scheduler job that copies stored rows past each run's cursor to MLflow.

It never touches the ingest path: ingest commits rows, this job reads them later. While MLflow is down
every tick fails fast (no MLflow-side retries) and the worker backs off exponentially; the cursor only
moves after MLflow accepted the rows, and re-sent metrics are identical (same timestamp), which MLflow
deduplicates. One replica runs each tick (``jobs.scheduler.run_once``).
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import Engine

from layerwatch import wire
from layerwatch_server.core.backoff import backoff_s
from layerwatch_server.mirrors import convert, naming, source
from layerwatch_server.mirrors.alerts import mirror_alerts
from layerwatch_server.mirrors.images import PictureSchedule, log_pictures
from layerwatch_server.mirrors.source import RunState
from layerwatch_server.storage.base import utcnow

log = logging.getLogger("layerwatch_server.mirrors")

MAX_METRICS_PER_REQUEST = 1000  # MLflow log_batch: <= 1000 metrics, <= 100 params/tags, <= 1 MB
MAX_PARAMS_TAGS_PER_REQUEST = 100
MAX_BACKOFF_S = 60.0
MIN_METRICS_PER_RUN = 1000  # a tick's budget is shared by its pending runs, each gets at least this
PER_STEP_METRICS = len(wire.STEP_STATS) + 5  # and the run-level aggregates, beside the budgeted keys
AGGREGATE_LAYER_STATS = ("dead_frac", "nonfinite")  # read for every layer: the run-level aggregates
AGGREGATE_PARAM_STATS = ("grad_norm", "grad_nonfinite")


@dataclass(frozen=True)
class MirrorConfig:
    tracking_uri: str
    layer_stats: tuple[str, ...] = ("dead_frac", "act_std")
    param_stats: tuple[str, ...] = ("grad_norm",)
    max_keys: int = 1000
    max_params: int = 100
    stride: int = 1
    max_steps_per_tick: int = 1000
    # MLflow's SQLite store takes ~0.13 ms of CPU per metric (a 200-layer step: ~400 metrics, 55 ms): past this
    # many per tick a run is sent downsampled (convert.pace_window), so the mirror keeps pace with any run
    max_metrics_per_tick: int = 2000
    max_runs_per_tick: int = 100
    image_interval_s: float = 300.0  # a run's pictures at most this often (and at its end)
    image_layers: int = 3  # the worst layers whose distributions are pictured


def default_client_factory(tracking_uri: str) -> Any:
    # Our own backoff replaces MLflow's (7 retries with exponential waits would hold the tick for minutes).
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "20")
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=tracking_uri)


class MlflowMirror:
    """``tick(engine, now)`` is the scheduler job; counters are read by the Prometheus collector."""

    def __init__(self, config: MirrorConfig, client_factory: Callable[[str], Any] = default_client_factory) -> None:
        self.config = config
        self._alerts_synced_at = utcnow() - dt.timedelta(hours=1)
        self._factory = client_factory
        self._client: Any = None
        self._experiments: dict[str, str] = {}
        self._lock = threading.Lock()
        self._retry_at = 0.0
        self._failures = 0
        self._pictures = PictureSchedule(config.image_interval_s)
        # exposed as Prometheus metrics
        self.errors_total = 0
        self.metrics_total = 0
        self.requests_total = 0
        self.lag_steps = 0
        self.lag_seconds = 0.0
        self.last_success = 0.0
        self.pace_window = 1  # the widest downsampling window of the last tick (1: every step sent)
        self.metrics_budget = config.max_metrics_per_tick
        self._layer_columns = _columns(wire.LAYER_STATS, config.layer_stats, AGGREGATE_LAYER_STATS)
        self._param_columns = _columns(wire.PARAM_STATS, config.param_stats, AGGREGATE_PARAM_STATS)

    @property
    def client(self) -> Any:
        if self._client is None:
            self._client = self._factory(self.config.tracking_uri)
        return self._client

    def tick(self, engine: Engine, now: float | None = None) -> None:
        """Mirror what is pending; on failure back off (1 s, 2 s, ... 60 s, jittered) and keep the cursor."""
        now = time.time() if now is None else now
        if time.monotonic() < self._retry_at:
            return
        with self._lock:
            try:
                lag_steps, lag_s = 0, 0.0
                runs = source.pending_runs(engine, self.config.max_runs_per_tick)
                most = self.config.max_metrics_per_tick
                self.metrics_budget = max(min(MIN_METRICS_PER_RUN, most), most // max(1, len(runs)))
                if self.pace_window > 1:
                    log.info("MLflow mirror: runs sent downsampled, every %d steps at most", self.pace_window)
                self.pace_window = 1
                for run in runs:
                    steps, seconds = self.sync_run(engine, run, now)
                    lag_steps, lag_s = max(lag_steps, steps), max(lag_s, seconds)
                self.lag_steps, self.lag_seconds = lag_steps, lag_s
                self._sync_alerts(engine)
                self._failures, self.last_success = 0, now
            except Exception as exc:
                self.errors_total += 1
                self._failures += 1
                wait = backoff_s(self._failures, max_s=MAX_BACKOFF_S)
                self._retry_at = time.monotonic() + wait
                log.warning("MLflow mirror failed (%s); retrying in %.1fs", exc, wait)

    def sync_run(self, engine: Engine, run: RunState, now: float) -> tuple[int, float]:
        """One bounded slice of one run; returns (steps still behind, age in s of the oldest unsent step)."""
        if run.mlflow_run_id is None:
            run.mlflow_run_id = self._create(engine, run)
        steps = source.read_steps(engine, run.id, run.cursor, self.config.max_steps_per_tick)
        if steps:
            lag_s = max(0.0, now - float(steps[0]["time"]))
            layers, params = source.series_defs(engine, run.id)
            budget = naming.plan_keys(
                layers, params, self.config.layer_stats, self.config.param_stats, self.config.max_keys
            )
            hi = int(steps[-1]["step"])
            per_step = len(budget.layer_keys) + len(budget.param_keys) + PER_STEP_METRICS
            per_step += min(convert.MAX_USER_SCALARS, len(steps[-1].get("scalars") or {}))
            span = hi - (run.cursor if run.cursor is not None else int(steps[0]["step"]) - 1)
            window = convert.pace_window(len(steps), span, per_step, self.metrics_budget)
            kept = None if window == 1 else convert.kept_steps((int(s["step"]) for s in steps), window, run.cursor)
            layer_rows, param_rows = source.read_rows(
                engine, run.id, run.cursor, hi, (layers, params), (self._layer_columns, self._param_columns), kept
            )
            out = convert.convert(
                steps, layer_rows, param_rows, budget, {d.id: d for d in layers}, self.config.stride, window, kept
            )
            self.pace_window = max(self.pace_window, window)
            self._log_metrics(run.mlflow_run_id, out.metrics)
            tags: dict[str, str] = {}
            if budget.dropped:
                tags["layerwatch.mirror.keys_dropped"] = str(budget.dropped)
            if out.nonfinite_values:
                run.nonfinite_values += out.nonfinite_values
                tags["layerwatch.nonfinite.values"] = str(run.nonfinite_values)
                if run.first_nonfinite_step is None and out.first_nonfinite is not None:
                    run.first_nonfinite_step = out.first_nonfinite[0]
                    tags["layerwatch.nonfinite.first_step"] = str(out.first_nonfinite[0])
                    tags["layerwatch.nonfinite.first_metric"] = out.first_nonfinite[1]
            if run.nonfinite_origin:
                o = run.nonfinite_origin
                tags["layerwatch.nonfinite.origin"] = (
                    f"step {o.get('step')} {o.get('pass')} layer={o.get('layer')} rank={o.get('rank')}"
                )
            self._log(run.mlflow_run_id, tags=tags)
            run.cursor = int(steps[-1]["step"])
        else:
            lag_s = 0.0
        caught_up = len(steps) < self.config.max_steps_per_tick
        ending = caught_up and run.status not in ("running", run.mirrored_status)
        if self._pictures.due(run.id, run.cursor, now, ending):
            self._log_pictures(engine, run, now)
        if caught_up and run.status != run.mirrored_status:
            self._set_status(engine, run)
        source.save(engine, run)
        behind = max(0, (run.last_step or 0) - (run.cursor if run.cursor is not None else -1))
        return (0, 0.0) if caught_up and not steps else (behind, lag_s)

    def _log_pictures(self, engine: Engine, run: RunState, now: float) -> None:
        """The run's pictures at the cursor's step; a failure is counted and waits for the next interval, so a
        picture that cannot be drawn never holds back the metrics."""
        assert run.mlflow_run_id is not None and run.cursor is not None
        self._pictures.logged(run.id, run.cursor, now)
        try:
            keys = log_pictures(
                self.client, engine, run.id, run.mlflow_run_id, run.cursor, title=run.name,
                layers=self.config.image_layers,
            )  # fmt: skip
        except Exception as exc:
            self.errors_total += 1
            log.warning("pictures of run %s not logged to MLflow (%s)", run.id, exc)
            return
        self.requests_total += 2 * len(keys)  # each image: full size and a compressed preview

    def _create(self, engine: Engine, run: RunState) -> str:
        client = self.client
        layers, params = source.model_rows(engine, run.id)
        tags = {
            "layerwatch.run_id": run.id,
            "layerwatch.run_key": run.key,
            "layerwatch.project": run.project,
            "layerwatch.world_size": str(run.world_size),
            "mlflow.note.content": naming.RUN_NOTE,
            **self._host_tags(engine, run.id),
        }
        created = client.create_run(
            self._experiment(run.project), start_time=run.created_ms, tags=tags, run_name=run.name
        )
        mlflow_id = created.info.run_id
        self._log(mlflow_id, params=naming.run_params(run.config, layers, params, self.config.max_params))
        client.log_dict(mlflow_id, naming.model_summary(layers, params), "layerwatch/model_summary.json")
        source.set_mlflow_run_id(engine, run.id, mlflow_id)
        log.debug("run %s mirrored to MLflow run %s", run.id, mlflow_id)
        return mlflow_id

    def _experiment(self, project: str) -> str:
        if project not in self._experiments:
            found = self.client.get_experiment_by_name(project)
            if found is not None:
                self._experiments[project] = found.experiment_id
            else:
                self._experiments[project] = self.client.create_experiment(
                    project, artifact_location=_local_artifacts(self.config.tracking_uri, project)
                )
        return self._experiments[project]

    def _host_tags(self, engine: Engine, run_id: str) -> dict[str, str]:
        hosts = source.rank_hosts(engine, run_id)
        tags = {f"layerwatch.rank.{r}.host": h for r, h in sorted(hosts.items())[:64]}
        tags["layerwatch.hosts"] = ",".join(sorted(set(hosts.values())))[: naming.MAX_TAG_VALUE_LEN]
        return tags

    def _set_status(self, engine: Engine, run: RunState) -> None:
        if run.status == "running":  # a stalled run that came back
            self.client.update_run(run.mlflow_run_id, status="RUNNING")
        else:
            self._log(run.mlflow_run_id, tags={"layerwatch.status": run.status, **self._host_tags(engine, run.id)})
            self.client.set_terminated(run.mlflow_run_id, status=naming.MLFLOW_STATUS.get(run.status, "FAILED"))
        self.requests_total += 1
        run.mirrored_status = run.status

    def _log_metrics(self, mlflow_run_id: str, metrics: list[tuple[str, float, int, int]]) -> None:
        from mlflow.entities import Metric

        # Key-major: a request of few keys costs MLflow's store ~40% less than one of many (it looks up and
        # updates each key's latest value once per request).
        metrics = sorted(metrics, key=lambda m: (m[0], m[3]))
        for i in range(0, len(metrics), MAX_METRICS_PER_REQUEST):
            chunk = [Metric(k, v, ts, step) for k, v, ts, step in metrics[i : i + MAX_METRICS_PER_REQUEST]]
            self.client.log_batch(mlflow_run_id, metrics=chunk, synchronous=True)
            self.requests_total += 1
            self.metrics_total += len(chunk)

    def _log(
        self, mlflow_run_id: str, *, params: dict[str, str] | None = None, tags: dict[str, str] | None = None
    ) -> None:
        from mlflow.entities import Param, RunTag

        items: list[Any] = [Param(k, v) for k, v in (params or {}).items()]
        items += [RunTag(k, v[: naming.MAX_TAG_VALUE_LEN]) for k, v in (tags or {}).items()]
        for i in range(0, len(items), MAX_PARAMS_TAGS_PER_REQUEST):
            chunk = items[i : i + MAX_PARAMS_TAGS_PER_REQUEST]
            self.client.log_batch(
                mlflow_run_id,
                params=[x for x in chunk if isinstance(x, Param)],
                tags=[x for x in chunk if isinstance(x, RunTag)],
                synchronous=True,
            )
            self.requests_total += 1

    def backfill(self, engine: Engine, run_id: str, *, fresh: bool = True) -> int | None:
        """Re-mirror one run from the database (``fresh``: into a new MLflow run); returns the last step sent."""
        if fresh:
            source.reset(engine, run_id)
        while True:
            runs = source.pending_runs(engine, 1, run_id=run_id)
            if not runs:
                raise LookupError(f"run {run_id!r} not found")
            before = runs[0].cursor
            self.sync_run(engine, runs[0], time.time())
            if runs[0].cursor == before:
                return before

    def _sync_alerts(self, engine: Engine) -> None:
        """Runs whose alerts changed since the last sync get their alert tags and artifact rewritten.

        A replica that did not run the previous ticks starts from its own last sync (or the last hour): it
        may rewrite some runs' alerts again, which is harmless.
        """
        since = self._alerts_synced_at
        started = utcnow()
        for run_id, (mlflow_run_id, alerts) in source.alert_changes(engine, since).items():
            mirror_alerts(self.client, mlflow_run_id, alerts)
            log.debug("mirrored %d alerts of run %s", len(alerts), run_id)
        self._alerts_synced_at = started - dt.timedelta(seconds=5)  # overlap: a commit racing this read

    def mirror_alerts(self, engine: Engine, run_id: str, alerts: list[dict[str, Any]]) -> bool:
        """Alerts of a layerwatch run onto its MLflow run; False while that run is not mirrored yet."""
        runs = source.pending_runs(engine, 1, run_id=run_id)
        if not runs or runs[0].mlflow_run_id is None:
            return False
        mirror_alerts(self.client, runs[0].mlflow_run_id, alerts)
        return True


def _columns(order: tuple[str, ...], *wanted: tuple[str, ...]) -> tuple[str, ...]:
    """The stored statistics the mirror reads: the budgeted and the aggregated ones, in the table's order."""
    chosen = {stat for stats in wanted for stat in stats}
    return tuple(stat for stat in order if stat in chosen)


def _local_artifacts(tracking_uri: str, project: str) -> str | None:
    """Artifacts of a local SQLite store live next to it (not in the server's working directory)."""
    if not tracking_uri.startswith("sqlite:///"):
        return None
    root = Path(tracking_uri.removeprefix("sqlite:///")).resolve().parent / "mlartifacts" / naming.safe_key(project)
    return root.as_uri()


def from_settings(settings: Any) -> MlflowMirror | None:
    """The mirror the settings ask for, or None when mirroring is off."""
    uri = settings.mlflow_uri
    if uri is None:
        return None
    return MlflowMirror(
        MirrorConfig(
            tracking_uri=uri,
            layer_stats=tuple(settings.mlflow_layer_stats),
            param_stats=tuple(settings.mlflow_param_stats),
            max_keys=settings.mlflow_max_keys,
            stride=settings.mlflow_stride,
            max_metrics_per_tick=max(1, int(settings.mlflow_max_metrics_s * settings.mlflow_interval_s)),
            image_interval_s=settings.mlflow_image_interval_s,
        )
    )
