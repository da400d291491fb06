"""Count the calls that read a tensor's value on the host: each one makes the CPU wait for the device.

    with HostReads() as reads:
        train_one_step()
    assert reads.calls == []

The client's own promise (no host reads on the training thread) is checked with this in its tests and in
``bench/client_overhead.py``; it works for any training loop. It sees calls made on the current thread only.
"""

from __future__ import annotations

import torch
from torch.overrides import TorchFunctionMode

HOST_READS = frozenset(
    {
        torch.Tensor.item,
        torch.Tensor.tolist,
        torch.Tensor.cpu,
        torch.Tensor.numpy,
        torch.Tensor.__bool__,
        torch.Tensor.__float__,
        torch.Tensor.__int__,
        torch.Tensor.nonzero,
        torch.nonzero,
    }
)


class HostReads(TorchFunctionMode):
    """A torch function mode that records the name of every host-reading call made under it."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in HOST_READS:
            self.calls.append(getattr(func, "__name__", str(func)))
        return func(*args, **(kwargs or {}))
