"""Per-layer histograms (the batch's optional ``histograms``): written in the batch's transaction, read per layer.

A batch's histograms go in with one statement, whatever their number (their rows travel as one JSON array, as
new series do in :mod:`layerwatch_server.storage.ingest`), after one more that registers their bin edges once
(by a hash of them). A re-sent step is a no-op: rows are keyed by (run, layer, kind, step), first wins.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from sqlalchemy import Connection, Engine, select

from layerwatch_server.core.batch import HistogramsIn
from layerwatch_server.storage.models import Run, histogram_edges, histograms
from layerwatch_server.storage.queries import BadQuery, NotFound

KINDS = ("activation", "gradient")
MAX_HISTOGRAMS = 100_000  # rows one answer reads at most (before downsampling)


def edges_id(edges: list[float]) -> str:
    return hashlib.sha256(json.dumps(edges).encode()).hexdigest()[:16]


def write(conn: Connection, run_id: str, section: HistogramsIn | None, pg: bool) -> int:
    """Store a batch's histograms in its transaction; the number of entries it carried."""
    if section is None or not section.layers:
        return 0
    key = edges_id(section.edges)
    mark = "%s" if pg else "?"
    conn.exec_driver_sql(
        f"INSERT INTO histogram_edges (id, edges) VALUES ({mark}, {mark}) ON CONFLICT DO NOTHING",
        (key, json.dumps(section.edges)),
    )
    rows = json.dumps([entry.model_dump() for entry in section.layers])
    conn.exec_driver_sql(_INSERT_PG if pg else _INSERT_SQLITE, (run_id, key, rows))
    return len(section.layers)


_INSERT_SQLITE = (
    "INSERT INTO histograms (run_id, edges_id, layer, kind, step, counts, nan) "
    "SELECT ?, ?, json_extract(value, '$.layer'), json_extract(value, '$.kind'), json_extract(value, '$.step'), "
    "json_extract(value, '$.counts'), json_extract(value, '$.nan') FROM json_each(?) WHERE true "
    "ON CONFLICT DO NOTHING"
)
_INSERT_PG = (
    "INSERT INTO histograms (run_id, edges_id, layer, kind, step, counts, nan) "
    "SELECT %s, %s, layer, kind, step, counts, nan "
    "FROM json_to_recordset(%s::json) AS r(layer text, kind text, step bigint, counts json, nan bigint) "
    "ON CONFLICT DO NOTHING"
)


def read(
    engine: Engine,
    run_id: str,
    *,
    layer: str,
    kind: str,
    start: int | None = None,
    end: int | None = None,
    max_points: int | None = None,
) -> dict[str, Any]:
    """``{"edges", "steps", "counts", "nan", "merged"}`` of one layer, in step order.

    With ``max_points``, consecutive histograms are summed in at most that many buckets of steps (each named by
    its last step, ``merged`` says how many it sums): like the series' min/max, a sum hides nothing that
    happened in a bucket (a NaN, a value in the overflow bin). Where a run's bins changed (a client of
    another version), the histograms with the bins of its latest one are answered."""
    if kind not in KINDS:
        raise BadQuery(f"kind {kind!r} is not one of {list(KINDS)}")
    table = histograms.c
    where = [table.run_id == run_id, table.layer == layer, table.kind == kind]
    if start is not None:
        where.append(table.step >= start)
    if end is not None:
        where.append(table.step <= end)
    with engine.connect() as conn:
        if conn.scalar(select(Run.id).where(Run.id == run_id)) is None:
            raise NotFound(f"run {run_id!r} not found")
        rows = conn.execute(
            select(table.step, table.edges_id, table.counts, table.nan)
            .where(*where)
            .order_by(table.step)
            .limit(MAX_HISTOGRAMS)
        ).all()
        if not rows:
            exists = select(table.step).where(table.run_id == run_id, table.layer == layer, table.kind == kind)
            if conn.scalar(exists.limit(1)) is None:
                raise NotFound(f"no {kind} histograms of layer {layer!r} in run {run_id!r}")
            return {"edges": [], "steps": [], "counts": [], "nan": [], "merged": []}
        latest = rows[-1].edges_id
        edges = conn.scalar(select(histogram_edges.c.edges).where(histogram_edges.c.id == latest))
    rows = [r for r in rows if r.edges_id == latest]
    steps = [r.step for r in rows]
    counts = [r.counts if isinstance(r.counts, list) else json.loads(r.counts) for r in rows]
    nan = [r.nan for r in rows]
    merged = [1] * len(rows)
    if max_points is not None and len(rows) > max_points:
        steps, counts, nan, merged = _sum_buckets(steps, counts, nan, max_points)
    return {"edges": edges, "steps": steps, "counts": counts, "nan": nan, "merged": merged}


def _sum_buckets(
    steps: list[int], counts: list[list[int]], nan: list[int], buckets: int
) -> tuple[list[int], list[list[int]], list[int], list[int]]:
    n = len(steps)
    out: tuple[list[int], list[list[int]], list[int], list[int]] = ([], [], [], [])
    for b in range(buckets):
        lo, hi = b * n // buckets, (b + 1) * n // buckets
        if lo == hi:
            continue
        out[0].append(steps[hi - 1])
        out[1].append([sum(column) for column in zip(*counts[lo:hi], strict=True)])
        out[2].append(sum(nan[lo:hi]))
        out[3].append(hi - lo)
    return out
