"""The wire batch as pydantic models: validation with messages that name the field.

Mirrors ``layerwatch.wire`` (version 1). Statistic values are floats, NaN and +/-Inf included (they are
the signal), or null. JSON requests may use the literals NaN/Infinity/-Infinity.

Everything a database would refuse is refused here, with a 422 that names the field: a batch that cannot
be stored must never look like an outage (a 503 is retried, and a client sends its batches in order, so one
such batch would hold back every later one). Hence no NUL character in any string (PostgreSQL text cannot
hold one), and a run ``config`` of bounded depth and size (its JSON is written by recursive code).
"""

from __future__ import annotations

import json
import math
import operator
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator, model_validator

from layerwatch import wire

MAX_STEPS = 10_000
# Layers in one batch, and layers a run may have over its life (the same for parameters): well above real
# models (a 70B-parameter transformer has about a thousand modules). With MAX_ROWS (layer and parameter rows
# in one batch: a client's report carries one per layer and parameter, so a report of the widest model fits)
# this bounds how long one batch holds the SQLite writer (bench/wide_batch.py measures it).
MAX_SERIES = 20_000
MAX_ROWS = 50_000
MAX_CONFIG_DEPTH = 32
MAX_CONFIG_BYTES = 256 * 1024  # as JSON


def _storable_text(text: str) -> str:
    if "\x00" in text:
        raise ValueError("contains a NUL character (U+0000), which no database column can store")
    if not text.isascii():
        try:
            text.encode()
        except UnicodeEncodeError:
            raise ValueError("is not valid Unicode (a lone surrogate)") from None
    return text


Text = Annotated[str, AfterValidator(_storable_text)]
Name = Annotated[Text, Field(min_length=1, max_length=500)]
Value = float | None
NonNegInt = Annotated[int, Field(ge=0, le=2**62)]
Index = Annotated[int, Field(ge=0, le=2**31 - 1)]
Dims = Annotated[list[Annotated[int, Field(ge=-1, le=2**62)]], Field(max_length=16)]
Row = Annotated[list[Value], Field(min_length=1, max_length=64)]

_FIRST = operator.itemgetter(0)


class _Wire(BaseModel):
    # Unknown keys are ignored: a newer v1 client may send more than this collector reads.
    model_config = ConfigDict(extra="ignore")


class RunIn(_Wire):
    key: Annotated[Text, Field(min_length=1, max_length=200)]
    name: Annotated[Text, Field(max_length=200)] = ""
    project: Annotated[str, Field(min_length=1, max_length=100, pattern=r"^[A-Za-z0-9_.\-]+$")]
    world_size: Annotated[int, Field(ge=1, le=1_000_000)] = 1
    config: dict[str, Any] | None = None

    @field_validator("config")
    @classmethod
    def _storable(cls, config: dict[str, Any] | None) -> dict[str, Any] | None:
        if config is not None:
            check_config(config)
        return config


class LayerIn(_Wire):
    index: Index
    name: Name
    type: Annotated[Text, Field(max_length=200)] = ""
    kind: Literal[wire.KINDS] = wire.KIND_OTHER  # type: ignore[valid-type]
    shape: Dims = []
    units: NonNegInt = 0


class ParamIn(_Wire):
    index: Index
    name: Name
    shape: Dims = []
    numel: NonNegInt = 0


class StepIn(_Wire):
    step: NonNegInt
    time: float = Field(description="Unix time in seconds; must be finite.", allow_inf_nan=False)
    loss: Value = None
    lr: Value = None
    grad_norm_total: Value = None
    scalars: Annotated[dict[Annotated[Text, Field(max_length=200)], float], Field(max_length=256)] = {}
    layers: Annotated[list[Row], Field(max_length=MAX_SERIES)] = Field(
        [], description="[[layer_index, *values in layer_stats order], ...]"
    )
    params: Annotated[list[Row], Field(max_length=MAX_SERIES)] = Field(
        [], description="[[param_index, *values in param_stats order], ...]"
    )


class NonfiniteOrigin(_Wire):
    model_config = ConfigDict(populate_by_name=True)
    step: NonNegInt
    pass_: Literal[wire.PASSES] = Field(alias="pass")  # type: ignore[valid-type]
    layer: Annotated[Text, Field(max_length=500)] | None = None
    rank: Index = 0


class End(_Wire):
    status: Literal[wire.END_STATUSES]  # type: ignore[valid-type]


class Dropped(_Wire):
    reports: NonNegInt = 0
    batches: NonNegInt = 0


MAX_EDGES = 1024
MAX_HISTOGRAMS = 2 * MAX_SERIES  # entries in one batch: an activation and a gradient histogram per layer


class HistogramIn(_Wire):
    layer: Name
    kind: Literal["activation", "gradient"]
    step: NonNegInt
    counts: Annotated[list[NonNegInt], Field(min_length=1, max_length=MAX_EDGES + 1)]
    nan: NonNegInt = 0


class HistogramsIn(_Wire):
    """Optional (see ``layerwatch.wire``): per-layer counts in the ``len(edges) + 1`` bins between ``edges``."""

    edges: Annotated[list[Annotated[float, Field(allow_inf_nan=False)]], Field(min_length=1, max_length=MAX_EDGES)]
    layers: Annotated[list[HistogramIn], Field(max_length=MAX_HISTOGRAMS)] = []

    @model_validator(mode="after")
    def _consistent(self) -> HistogramsIn:
        if any(a >= b for a, b in zip(self.edges, self.edges[1:], strict=False)):
            raise ValueError("edges: must be strictly ascending")
        seen: set[tuple[str, str, int]] = set()
        for i, entry in enumerate(self.layers):
            if len(entry.counts) != len(self.edges) + 1:
                raise ValueError(
                    f"layers[{i}].counts: {len(entry.counts)} counts for {len(self.edges)} edges; expected "
                    f"{len(self.edges) + 1}"
                )
            key = (entry.layer, entry.kind, entry.step)
            if key in seen:
                raise ValueError(f"layers[{i}]: {entry.kind} histogram of {entry.layer!r} at step {entry.step} twice")
            seen.add(key)
        return self


class Batch(_Wire):
    """One rank's batch, wire version 1 (see ``layerwatch.wire``)."""

    v: Literal[1] = Field(description=f"Wire version; this collector reads {wire.VERSION}.")
    run: RunIn
    rank: Index = 0
    host: Annotated[Text, Field(max_length=255)] = ""
    pid: Index = 0
    seq: NonNegInt = 0
    layers: Annotated[list[LayerIn], Field(max_length=MAX_SERIES)] = []
    params: Annotated[list[ParamIn], Field(max_length=MAX_SERIES)] = []
    layer_stats: list[str] = list(wire.LAYER_STATS)
    param_stats: list[str] = list(wire.PARAM_STATS)
    steps: Annotated[list[StepIn], Field(max_length=MAX_STEPS)] = []
    nonfinite_origin: NonfiniteOrigin | None = None
    end: End | None = None
    dropped: Dropped = Dropped()
    histograms: HistogramsIn | None = None  # optional; a v1 collector before it ignored the key
    # Optional: a rank's steps so far, sent early because its tripwire tripped in a job whose ranks combine their
    # reports. Judged by the rules (and its origin kept), not stored: the job's combined report stores those steps.
    preview: bool = False

    @model_validator(mode="after")
    def _consistent(self) -> Batch:
        if self.rank >= self.run.world_size:
            raise ValueError(f"rank: {self.rank} is not below run.world_size {self.run.world_size}")
        _check_names("layer_stats", self.layer_stats, wire.LAYER_STATS)
        _check_names("param_stats", self.param_stats, wire.PARAM_STATS)
        layer_idx = _check_defs("layers", self.layers)
        param_idx = _check_defs("params", self.params)
        rows = sum(len(step.layers) + len(step.params) for step in self.steps)
        if rows > MAX_ROWS:
            raise ValueError(
                f"steps: {rows} layer and parameter rows in one batch, more than {MAX_ROWS}; send fewer steps per batch"
            )
        seen: set[int] = set()
        for i, step in enumerate(self.steps):
            if step.step in seen:
                raise ValueError(f"steps[{i}].step: step {step.step} appears twice in this batch")
            seen.add(step.step)
            _check_rows(f"steps[{i}].layers", step.layers, layer_idx, len(self.layer_stats))
            _check_rows(f"steps[{i}].params", step.params, param_idx, len(self.param_stats))
        return self


def _check_names(field: str, names: list[str], known: tuple[str, ...]) -> None:
    unknown = [n for n in names if n not in known]
    if unknown:
        raise ValueError(f"{field}: unknown statistic(s) {unknown}; known: {list(known)}")
    if len(set(names)) != len(names):
        raise ValueError(f"{field}: a statistic is named twice")


def _check_defs(field: str, defs: list[LayerIn] | list[ParamIn]) -> set[int]:
    indices = {d.index for d in defs}
    if len(indices) != len(defs):
        raise ValueError(f"{field}: an index is used twice")
    if len({d.name for d in defs}) != len(defs):
        raise ValueError(f"{field}: a name is used twice")
    return indices


def _check_rows(field: str, rows: list[list[Value]], indices: set[int], n_values: int) -> None:
    # Fast path, in C: every index one of the batch's (so finite and whole; 3.0 == 3), none twice, every row
    # as long as the statistics. Anything else goes through the loop below, which names the first bad row.
    ids = set(map(_FIRST, rows))
    if len(ids) == len(rows) and ids <= indices and all(map((n_values + 1).__eq__, map(len, rows))):
        return
    seen: set[float] = set()
    for j, row in enumerate(rows):
        index = row[0]
        if index is None or not math.isfinite(index) or index not in indices or index != int(index):
            raise ValueError(f"{field}[{j}][0]: index {index!r} is not one of this batch's {field[-6:]}")
        if index in seen:
            raise ValueError(f"{field}[{j}][0]: index {int(index)} appears twice in this step")
        seen.add(index)
        if len(row) != n_values + 1:
            raise ValueError(f"{field}[{j}]: expected {n_values + 1} values (index + stats), got {len(row)}")


def check_config(config: dict[str, Any]) -> None:
    """Refuse a config nested deeper than MAX_CONFIG_DEPTH, larger than MAX_CONFIG_BYTES as JSON, or holding
    a NUL. The walk is iterative: the point is to refuse what recursive code would choke on."""
    todo: list[tuple[Any, int]] = [(config, 1)]
    while todo:
        value, depth = todo.pop()
        if isinstance(value, dict):
            items = [*value.keys(), *value.values()]
        elif isinstance(value, list):
            items = value
        else:
            if isinstance(value, str):
                _storable_text(value)
            continue
        if depth > MAX_CONFIG_DEPTH:
            raise ValueError(f"nested deeper than {MAX_CONFIG_DEPTH} levels")
        todo.extend((item, depth + 1) for item in items)
    size = len(json.dumps(config, default=str).encode())  # as stored, to a few bytes (NaN is stored quoted)
    if size > MAX_CONFIG_BYTES:
        raise ValueError(f"{size} bytes as JSON, more than the {MAX_CONFIG_BYTES} allowed")
