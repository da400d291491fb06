from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from layerwatch import spool, wire
from tests.client.fake_collector import FakeCollector


@pytest.fixture(autouse=True)
def _quiet_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Tests never inherit a developer's LAYERWATCH_* settings, and spool into their own directory."""
    import os

    for key in list(os.environ):
        if key.startswith("LAYERWATCH_") or key in ("RANK", "WORLD_SIZE", "SLURM_PROCID", "SLURM_JOB_ID"):
            monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("LAYERWATCH_SPOOL_DIR", str(tmp_path / "spool"))
    logging.getLogger("layerwatch").setLevel(logging.INFO)
    torch.manual_seed(0)


@pytest.fixture
def collector() -> Iterator[FakeCollector]:
    server = FakeCollector()
    yield server
    server.stop()


def read_spool(directory: Path) -> list[dict[str, Any]]:
    """Every batch spooled under ``directory``, decoded, in write order per rank."""
    batches = []
    for segment in sorted(directory.rglob(f"*{spool.SUFFIX}")):
        for _, payload in spool.read_records(segment):
            batches.append(wire.decode(payload))
    return batches


def layer_rows(batches: list[dict[str, Any]], layer: str) -> dict[int, dict[str, Any]]:
    """step -> {stat: value} for one layer across batches."""
    rows: dict[int, dict[str, Any]] = {}
    for batch in batches:
        names = {entry["index"]: entry["name"] for entry in batch["layers"]}
        for step in batch["steps"]:
            for row in step["layers"]:
                if names[row[0]] == layer:
                    rows[step["step"]] = dict(zip(batch["layer_stats"], row[1:], strict=True))
    return rows
