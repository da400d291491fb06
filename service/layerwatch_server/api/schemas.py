"""Response models of the API (the request body, the wire batch, is ``core.batch.Batch``).

In JSON *responses* non-finite values are the strings "NaN", "Infinity" and "-Infinity": strict JSON
has no literal for them.
"""

from __future__ import annotations

import datetime as dt
from typing import Any, Literal

from pydantic import BaseModel, Field

JsonFloat = float | Literal["NaN", "Infinity", "-Infinity"] | None


class Accepted(BaseModel):
    steps: int
    duplicates: int
    layer_rows: int
    param_rows: int


class IngestResponse(BaseModel):
    run_id: str
    accepted: Accepted
    alerts: list[dict[str, Any]] = Field(
        [], description="The run's alerts after this batch: open ones, and those resolved a moment ago."
    )


class ProjectOut(BaseModel):
    name: str
    created_at: dt.datetime
    runs: int


class RunOut(BaseModel):
    id: str
    name: str
    project: str
    key: str
    status: str
    world_size: int
    created_at: dt.datetime
    last_seen: dt.datetime
    first_step: int | None
    last_step: int | None
    firing_alerts: int = Field(0, description="The run's alerts now firing.")
    pending_alerts: int = Field(0, description="The run's alerts breaching, not yet for long enough to fire.")


class LayerOut(BaseModel):
    name: str
    type: str
    kind: str
    shape: list[int]
    units: int


class ParamOut(BaseModel):
    name: str
    shape: list[int]
    numel: int


class RankOut(BaseModel):
    rank: int
    host: str
    pid: int
    last_seen: dt.datetime
    dropped_reports: int
    dropped_batches: int


class RunDetail(RunOut):
    config: dict[str, Any] | None
    mlflow_run_id: str | None
    nonfinite_origin: dict[str, Any] | None
    ranks: list[RankOut]
    layers: list[LayerOut]
    params: list[ParamOut]


class Point(BaseModel):
    step: int
    value: JsonFloat
    min: JsonFloat = Field(None, description="Rolled-up buckets only: the bucket minimum.")
    max: JsonFloat = Field(None, description="Rolled-up buckets only: the bucket maximum.")


class Series(BaseModel):
    run_id: str
    layer: str | None
    stat: str
    rank: int
    points: list[Point]


class Problem(BaseModel):
    detail: Any
