from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest
import torch

_JOB_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "SLURM_PROCID", "SLURM_JOB_ID", "SLURM_STEP_ID", "TORCHELASTIC_RUN_ID")


@pytest.fixture(autouse=True)
def _quiet_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No developer LAYERWATCH_* settings, no job variables, no model hub, a spool of the test's own."""
    for key in list(os.environ):
        if key.startswith("LAYERWATCH_") or key in _JOB_VARS:
            monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("LAYERWATCH_SPOOL_DIR", str(tmp_path / "spool"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    logging.getLogger("layerwatch").setLevel(logging.INFO)
    torch.manual_seed(0)
