"""Reports become wire batches: the part of exporting that knows the batch layout and nothing of delivery.

A builder belongs to one rank of one run and is used from one thread (the exporter's): it numbers the
batches (``seq``), sends the run's config only in the first, remembers weight norms between reports (for
``update_ratio``) and names the first NaN/Inf once. A built batch waits as :class:`Packed`: packed
except for its ``dropped`` counts, filled in when it leaves memory, so that what the collector reads
includes what happened while the batch waited (a refusal, a drop).
"""

from __future__ import annotations

import gzip
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import msgpack

from layerwatch import wire
from layerwatch.histograms import wire_section
from layerwatch.ranks import Combined, RankReducer, layout, rank_part, reduce_windows
from layerwatch.report import Report, first_nonfinite, translate, uncounted_nonfinite


class BatchBuilder:
    def __init__(
        self,
        header: dict[str, Any],
        params: list[dict[str, Any]],
        on_uncounted_nonfinite: Callable[[], None] | None = None,
        reducer: RankReducer | None = None,
    ) -> None:
        self.header = header  # run, rank, host, pid: the same in every batch
        self.params = params  # the parameter registry, in every batch
        self.param_names = [p["name"] for p in params]
        self.on_uncounted_nonfinite = on_uncounted_nonfinite  # a NaN/Inf seen in a sum, not yet counted
        self._seq = 0
        self._origin_sent = False
        self._weight_norms: dict[int, float] = {}
        # The ranks' collectives (torch.distributed, world > 1): dead-unit windows OR-ed, and reports marked
        # ``combine`` combined (rank 0 sends the rows); None: every rank sends its own rows and dead units.
        self.reducer = reducer
        self._last_time: float | None = None  # the previous step's time, for the time between steps

    def build(self, report: Report) -> list[Packed]:
        """The batches for ``report``, all but their ``dropped`` field: one, or several in step order when its
        rows would pass the collector's ``MAX_ROWS`` (a wide model with a long ``every``). The run's config goes
        in the run's first batch, the first NaN/Inf's origin in the first part, the end of the run in the last."""
        if report.ready is not None:
            report.ready.synchronize()  # waits here, on the exporter's thread, never on the training thread
        values: list[float] = []
        if report.flat is not None:
            words = sum(report.activity)  # the dead-unit windows' packed activity ends the buffer
            values = report.flat[: report.flat.numel() - words].tolist()
            if words and self.reducer is not None:
                reduce_windows(self.reducer, report, values, report.flat[report.flat.numel() - words :])
        times = self._step_times(report) if not report.preview else []  # its steps come again, in the report
        steps = translate(report, values, self._weight_norms)
        if self.on_uncounted_nonfinite is not None and uncounted_nonfinite(steps):
            self.on_uncounted_nonfinite()
            self.on_uncounted_nonfinite = None  # once: counting stays on for the rest of the run
        combined = None
        if report.combine and self.reducer is not None:
            reducer = self.reducer
            part = rank_part(report, values, steps, times, reducer.rank, reducer.world)
            whole = reducer.combine(layout(report), part)
            if whole is not None:
                if reducer.rank != 0:
                    return []  # rank 0 sends the job's rows
                combined = Combined(report, whole, reducer.world)
                combined.apply(report, values)
                steps = translate(report, values, self._weight_norms)
                combined.spread(steps)
        names = [layer["name"] for layer in report.layers]
        origin = None
        if not self._origin_sent:
            origin = first_nonfinite(steps, names, self.param_names, self.header["rank"])
            self._origin_sent = origin is not None and not report.preview  # the report names it too
            if origin is not None and combined is not None:
                origin["rank"] = combined.origin_rank(origin, names, report.steps[0].step)
        parts = split_rows(steps, wire.MAX_ROWS)
        section = wire_section(report.histograms) if report.histograms else None
        return [
            self._batch(
                report,
                part,
                origin if i == 0 else None,
                {"status": report.end} if report.end and i == len(parts) - 1 else None,
                section if i == 0 else None,
                combined.ranks() if combined is not None and i == 0 else None,
            )
            for i, part in enumerate(parts)
        ]

    def _step_times(self, report: Report) -> list[float]:
        """Seconds since the step before, per step (NaN for the run's first)."""
        times = []
        for meta in report.steps:
            times.append(meta.time - self._last_time if self._last_time is not None else math.nan)
            self._last_time = meta.time
        return times

    def _batch(
        self,
        report: Report,
        steps: list[dict[str, Any]],
        origin: dict[str, Any] | None,
        end: dict[str, str] | None,
        histograms: dict[str, Any] | None = None,
        ranks: dict[str, Any] | None = None,
    ) -> Packed:
        batch = {"v": wire.VERSION, **self.header, "seq": self._seq}
        if self._seq > 0:
            batch["run"] = {k: v for k, v in batch["run"].items() if k != "config"}
        self._seq += 1
        batch.update(
            layers=report.layers,
            params=self.params,
            layer_stats=list(wire.LAYER_STATS),
            param_stats=list(wire.PARAM_STATS),
            steps=steps,
            nonfinite_origin=origin,
            end=end,
        )
        if histograms is not None:
            batch["histograms"] = histograms  # optional: old collectors ignore it (see layerwatch.wire)
        if ranks is not None:
            batch["ranks"] = ranks  # optional, like histograms: the ranks' spread over a combined report
        if report.preview:
            batch["preview"] = True  # optional: rows to judge now, stored from the regular report
        return Packed.of(batch)


def split_rows(steps: list[dict[str, Any]], max_rows: int) -> list[list[dict[str, Any]]]:
    """``steps`` in consecutive runs of at most ``max_rows`` layer and parameter rows each (a step is never cut:
    one step of any model the collector takes fits), always at least one run."""
    parts: list[list[dict[str, Any]]] = [[]]
    rows = 0
    for step in steps:
        size = len(step["layers"]) + len(step["params"])
        if parts[-1] and rows + size > max_rows:
            parts.append([])
            rows = 0
        parts[-1].append(step)
        rows += size
    return parts


@dataclass(frozen=True)
class Packed:
    """A batch as msgpack map entries without the map's header and its ``dropped`` entry."""

    entries: bytes
    count: int

    @classmethod
    def of(cls, batch: dict[str, Any]) -> Packed:
        entries = b"".join(_pack(key) + _pack(value) for key, value in batch.items() if key != "dropped")
        return cls(entries, sum(1 for key in batch if key != "dropped"))

    def encode(self, dropped: dict[str, int]) -> bytes:
        """What :func:`layerwatch.wire.encode` makes of the batch with these ``dropped`` counts."""
        packer = msgpack.Packer(use_bin_type=True)
        body = packer.pack_map_header(self.count + 1) + self.entries + _pack("dropped") + _pack(dropped)
        return gzip.compress(body, compresslevel=1)

    def __len__(self) -> int:
        return len(self.entries)


def _pack(value: Any) -> bytes:
    return msgpack.packb(value, use_bin_type=True)
