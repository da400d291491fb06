"""Batches within the collector's limits: a report with more rows than a batch may carry goes as several."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import layerwatch
from layerwatch import spool, wire
from layerwatch.batching import split_rows
from layerwatch_server.core.batch import MAX_ROWS, Batch


def test_the_client_knows_the_collectors_row_limit():
    assert wire.MAX_ROWS == MAX_ROWS


def rows(sizes: list[int]) -> list[dict]:
    return [{"step": i, "layers": [[0]] * n, "params": []} for i, n in enumerate(sizes)]


@pytest.mark.parametrize(
    ("sizes", "parts"),
    [
        ([3, 3, 3], [[0, 1, 2]]),  # fits: one batch
        ([4, 4, 4], [[0, 1], [2]]),
        ([10, 1, 9, 1], [[0], [1, 2], [3]]),  # exactly at the limit stays together
        ([11, 2], [[0], [1]]),  # a step over the limit alone is never cut (the collector refuses it anyway)
        ([], [[]]),  # a report without steps (the end of a run) is still one batch
    ],
)
def test_split_rows_keeps_steps_whole_and_in_order(sizes, parts):
    assert [[s["step"] for s in part] for part in split_rows(rows(sizes), 10)] == parts


def test_a_wide_model_with_a_long_every_is_sent_in_batches_the_collector_takes(tmp_path):
    """600 Linear layers and their 1,200 parameters: 1,800 rows a step, 54,000 in a report of every=30."""
    model = nn.Sequential(*(nn.Linear(2, 2) for _ in range(600)))
    mon = layerwatch.watch(model, mode="offline", spool_dir=str(tmp_path), every=30, config={"lr": 0.1})
    for _ in range(45):  # a full report and a half one, closed by the end of the run
        model(torch.randn(3, 2)).sum().backward()
        mon.step(loss=1.0)
        model.zero_grad()
    mon.close()
    batches = [wire.decode(p) for seg in spool.segments(mon.spool_dir) for _, p in spool.read_records(seg)]

    assert len(batches) == 3  # 54,000 rows in two, then the last 15 steps with the end
    for batch in batches:
        Batch.model_validate(batch)  # what the collector answers 422 for
        assert sum(len(s["layers"]) + len(s["params"]) for s in batch["steps"]) <= MAX_ROWS
    assert [b["seq"] for b in batches] == [0, 1, 2]
    assert [s["step"] for b in batches for s in b["steps"]] == list(range(45))
    assert batches[0]["steps"][-1]["step"] == 26  # 27 steps of 1,800 rows; the first report was split
    assert ["config" in b["run"] for b in batches] == [True, False, False]
    assert [b["end"] for b in batches] == [None, None, {"status": "finished"}]
