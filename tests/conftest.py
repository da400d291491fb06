"""Settings for the whole suite."""

from __future__ import annotations

import os

import torch

# The models here are tiny: a second torch thread per process only fights the other processes (collectors,
# gloo ranks, helpers) for a 2-core machine's CPU, and torch's spinning threads make a loaded machine's steps
# many times slower. One thread in this process, and in every process it starts (spawned ranks, examples).
os.environ.setdefault("OMP_NUM_THREADS", "1")
torch.set_num_threads(1)
