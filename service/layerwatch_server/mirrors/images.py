"""Pictures on the MLflow run: the health map and the worst layers' distributions, as images with a step.

MLflow's image view slides through a key's steps, so each picture is logged under one key
(``layerwatch/health_map``, ``layerwatch/distribution/<kind>/<layer>``) at the step the mirror's cursor reached.
Drawing a picture reads a whole run and costs matplotlib time, so a run gets them at most once per
``interval_s`` (and only with new steps since its last ones; the first set one interval after the mirror first
saw the run) and once more when it ends. When a run's pictures were last logged is kept in the mirror's memory,
not the database: a restarted mirror starts each active run's interval again, which costs a picture at most.
"""

from __future__ import annotations

import io
import logging
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import Engine

from layerwatch_server import pictures
from layerwatch_server.mirrors.naming import safe_key
from layerwatch_server.storage import histograms
from layerwatch_server.storage.queries import NotFound

log = logging.getLogger("layerwatch_server.mirrors")

HEALTH_MAP_KEY = "layerwatch/health_map"
DISTRIBUTION_KEY = "layerwatch/distribution/{kind}/{layer}"


@dataclass
class PictureSchedule:
    """When each run's pictures are due: ``interval_s`` apart with new steps, and once at the run's end."""

    interval_s: float
    _last: dict[str, tuple[int, float]] = field(default_factory=dict)  # run id -> (step, time) of the last set

    def due(self, run_id: str, step: int | None, now: float, ended: bool) -> bool:
        if step is None:
            return False
        last = self._last.get(run_id)
        if last is None:
            # A run's first set waits one interval (or its end): drawing one (~5 s of CPU for 200 layers) on
            # its first tick would hold back the metrics of a run just starting, for a map of a few steps.
            self._last[run_id] = (-1, now)
            return ended
        last_step, last_time = last
        return step > last_step and (ended or now - last_time >= self.interval_s)

    def logged(self, run_id: str, step: int, now: float) -> None:
        self._last[run_id] = (step, now)


def worst_layers(data: pictures.HealthMap, limit: int) -> list[str]:
    """Up to ``limit`` layers that look worst on the map: an alert onset in their row first, then the largest
    ``dead_frac`` or ``sat_frac`` they reached. Layers that never left zero are not "worst"."""
    scores: dict[str, tuple[int, float]] = {}
    for panel in data.panels:
        if panel.stat not in ("dead_frac", "sat_frac"):
            continue
        onset_rows = {row for row, _ in panel.onsets}
        for i, (name, values) in enumerate(zip(panel.rows, panel.values, strict=True)):
            peak = max((v for v in values if v is not None), default=0.0)
            alerted, best = scores.get(name, (0, 0.0))
            scores[name] = (max(alerted, int(i in onset_rows)), max(best, peak))
    ranked = sorted((s for s in scores.items() if s[1] > (0, 0.0)), key=lambda s: s[1], reverse=True)
    return [name for name, _ in ranked[:limit]]


def log_pictures(client: Any, engine: Engine, run_id: str, mlflow_run_id: str, step: int, *, title: str,
                 layers: int) -> list[str]:  # fmt: skip
    """Draw the run's health map and its worst layers' distributions and log them at ``step``; the keys logged."""
    data = pictures.health_map(engine, run_id)
    if not data.steps:
        return []
    keys = [HEALTH_MAP_KEY]
    _log_png(client, mlflow_run_id, pictures.render_health_map(data, title), HEALTH_MAP_KEY, step)
    for layer in worst_layers(data, layers):
        for kind in histograms.KINDS:
            try:
                dist = pictures.distribution(engine, run_id, layer, kind)
            except NotFound:  # no histograms of this layer (a client without them, or not yet)
                continue
            if not dist["steps"]:
                continue
            key = safe_key(DISTRIBUTION_KEY.format(kind=kind, layer=layer)).replace(":", "_")  # image keys: no ":"
            png = pictures.render_distribution(dist, f"{title} {layer} {kind}s".strip())
            _log_png(client, mlflow_run_id, png, key, step)
            keys.append(key)
    return keys


def _log_png(client: Any, mlflow_run_id: str, png: bytes, key: str, step: int) -> None:
    from PIL import Image

    with Image.open(io.BytesIO(png)) as image:
        image.load()
        client.log_image(mlflow_run_id, image, key=key, step=step, synchronous=True)
