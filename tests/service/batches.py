"""Test batches built the way the client builds them (``layerwatch.wire``)."""

from __future__ import annotations

import math
import time
import uuid
from typing import Any

from layerwatch import wire

N_PARAMS_PER_LAYER = 1


def unique(prefix: str = "p") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def value(step: int, layer: int, stat: int) -> float:
    """A deterministic, distinguishable value per (step, layer, stat)."""
    return step * 1000.0 + layer + stat / 10.0


def make_batch(
    run_key: str,
    rank: int = 0,
    steps: range | list[int] = range(10),
    n_layers: int = 4,
    *,
    project: str = "proj",
    world_size: int | None = None,
    overrides: dict[tuple[int, int, str], float | None] | None = None,
    end: str | None = None,
    seq: int = 0,
) -> dict[str, Any]:
    """A valid v1 batch: ``n_layers`` layers and one parameter each, every statistic set.

    ``overrides[(step, layer, stat)]`` replaces one value (NaN, Inf, None...).
    """
    overrides = overrides or {}
    layers = [
        {
            "index": i,
            "name": f"blocks.{i}.fc",
            "type": "Linear",
            "kind": wire.KINDS[i % 3],
            "shape": [-1, 16],
            "units": 16,
        }
        for i in range(n_layers)
    ]
    params = [{"index": i, "name": f"blocks.{i}.fc.weight", "shape": [16, 16], "numel": 256} for i in range(n_layers)]
    step_rows = []
    for s in steps:
        layer_rows = [
            [i, *(overrides.get((s, i, st), value(s, i, k)) for k, st in enumerate(wire.LAYER_STATS))]
            for i in range(n_layers)
        ]
        param_rows = [[i, *(value(s, i, k) for k in range(len(wire.PARAM_STATS)))] for i in range(n_layers)]
        step_rows.append(
            {
                "step": s,
                "time": time.time(),
                "loss": overrides.get((s, -1, "loss"), 1.0 / (s + 1)),
                "lr": 1e-3,
                "grad_norm_total": 2.0,
                "scalars": {"tokens_per_s": float(s), "weird": math.inf},
                "layers": layer_rows,
                "params": param_rows,
            }
        )
    return {
        "v": wire.VERSION,
        "run": {
            "key": run_key,
            "name": f"run {run_key}",
            "project": project,
            "world_size": world_size or rank + 1,
            "config": {"lr": 1e-3, "layers": n_layers},
        },
        "rank": rank,
        "host": "testhost",
        "pid": 1234,
        "seq": seq,
        "layers": layers,
        "params": params,
        "layer_stats": list(wire.LAYER_STATS),
        "param_stats": list(wire.PARAM_STATS),
        "steps": step_rows,
        "nonfinite_origin": None,
        "end": {"status": end} if end else None,
        "dropped": {"reports": 0, "batches": 0},
    }


def post(client: Any, batch: dict[str, Any], token: str | None = None, **kw: Any) -> Any:
    headers = {"Content-Type": wire.CONTENT_TYPE, "Content-Encoding": "gzip"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    headers.update(kw.pop("headers", {}))
    return client.post("/api/v1/ingest", content=kw.pop("body", None) or wire.encode(batch), headers=headers, **kw)
