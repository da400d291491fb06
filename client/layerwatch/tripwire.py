"""The per-step tripwire: whether a step went NaN/Inf or its loss jumped, known on the host within a step.

Reports leave every ``every`` steps, but a NaN at the first step of an interval should not wait for the last:
each step poisons optimizer state and checkpoints. Each step the tripwire reduces, on the device, what the
client computes anyway (the activation sums of the step's layers, the gradient norms, the loss) to a few
numbers: ``0 * x`` summed is 0, or NaN exactly when some ``x`` is NaN/Inf. Those numbers travel to the host
without anyone waiting: on CUDA an asynchronous copy into a pinned row and an event that later polls ask with
``query()``; on CPU the numbers are there as soon as they are computed. The loss jump is judged on the host
from the losses that come back this way, so it costs the device nothing.

Mixed precision: a ``torch.amp.GradScaler`` makes Inf/NaN gradients on purpose now and then (fp16 overflows at
its current loss scale; it skips that optimizer step and halves the scale). Given the scaler, a step whose only
non-finite values are its gradients is such an overflow, not an incident, while the scale stays at or above
``MIN_LOSS_SCALE``; below it the gradients overflow even unscaled, and the overflow is a NaN/Inf incident (the
scale collapses after ~17 overflows in a row from fp16's usual 2**16). A non-finite loss or activation always is.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass
from typing import Any

import torch

# A probe's place in the host row, and what it names in an alert (the NaN origin's `pass` words).
FORWARD, BACKWARD, LOSS = range(3)
MIN_LOSS_SCALE = 1.0  # a loss scale below it means a collapse (DeepSpeed's min_loss_scale default stops there)
_WHERE = ("forward pass", "backward pass", "loss")
_ORDER = ("forward pass", "loss", "backward pass")  # as a step computes them
ROWS = 64  # steps in flight on CUDA: more than a device can lag behind its host (queued kernels cap it)
LOSS_WINDOW = 100  # losses whose largest magnitude is the "recent typical loss" (llm-foundry looks back 100)


@dataclass(frozen=True)
class Trip:
    """One step whose numbers came back wrong: ``kind`` is ``non_finite`` or ``loss_jump``."""

    step: int
    kind: str
    loss: float | None
    typical: float | None = None  # loss jumps: the largest |loss| of the recent steps it is compared with
    where: tuple[str, ...] = ()  # non-finite: which of the forward pass, backward pass, loss showed it
    scale: float | None = None  # a GradScaler's loss scale at that step, when one was given

    def message(self, loss_jump: float) -> str:
        if self.kind == "non_finite" and self.scale is not None and self.where == (_WHERE[BACKWARD],):
            return (
                f"gradient overflow at step {self.step} with the loss scale down to {self.scale:.3g}, below "
                f"{MIN_LOSS_SCALE:g}: the gradients are non-finite unscaled (the client's own per-step check)"
            )
        if self.kind == "non_finite":
            hint = ""
            if self.where == (_WHERE[BACKWARD],) and self.loss is not None and math.isfinite(self.loss):
                hint = "; with fp16 mixed precision, pass the GradScaler to watch(scaler=...): its overflows are no NaN"
            return f"NaN/Inf at step {self.step} (in: {', '.join(self.where)}; the client's own per-step check{hint})"
        ratio = abs(self.loss) / self.typical if self.loss is not None and self.typical else math.inf
        return (
            f"loss {self.loss:.4g} at step {self.step} is {ratio:.3g}x the largest of the last {LOSS_WINDOW} losses "
            f"({self.typical:.4g}; the client's own per-step check, loss_jump={loss_jump:g})"
        )


class LossJump:
    """Host-side: |loss| above ``factor`` x the largest |loss| of the last LOSS_WINDOW finite losses.

    The recent *largest* loss is the typical level a healthy run returns to: against it the worst healthy batch
    measured 3.7x (a classifier near zero loss, batch size 2, that still misclassifies now and then), against the
    recent mean 41x; a divergence jumps 1e3-1e6x in a step. Magnitudes make it sign-blind (a loss that may be
    negative jumps when its size does); a recent maximum of zero judges nothing (no scale to compare with); it is
    judged from the second loss on, as a loss 100x the first ones is catastrophic at any stage. 0 switches it off.
    """

    def __init__(self, factor: float, window: int = LOSS_WINDOW) -> None:
        self.factor = factor
        self._recent: deque[float] = deque(maxlen=window)

    def judge(self, loss: float) -> float | None:
        """The recent largest |loss| when ``loss`` jumped above ``factor`` times it, else None."""
        if not math.isfinite(loss):
            return None  # the non-finite check speaks for it; the history stays clean
        size = abs(loss)
        typical = max(self._recent, default=0.0)
        self._recent.append(size)
        return typical if self.factor > 0 and typical > 0 and size > self.factor * typical else None


@dataclass
class _Pending:
    step: int
    row: int
    event: Any  # torch.cuda.Event, or None when the numbers were read at once
    where: tuple[int, ...]  # probe kinds in the row's first columns, then the loss when `has_loss`
    has_loss: bool
    host_loss: float | None  # a loss given as a Python number
    has_scale: bool = False  # the row's last column is a GradScaler's loss scale


class Tripwire:
    """Arms one check per step (device work only) and hands back, later, the steps that tripped it."""

    def __init__(self, loss_jump: float, cuda: bool = False) -> None:
        self.jump = LossJump(loss_jump)
        self.skipped = 0  # steps not checked because ROWS were in flight (their NaN carries to the next step)
        self.overflows = 0  # steps read back as a GradScaler's overflow (skipped by the scaler, not incidents)
        self._pending: deque[_Pending] = deque()
        self._free = list(range(ROWS - 1, -1, -1))
        self._carry: torch.Tensor | None = None
        self._open: str | None = None  # the kind of the incident the last read step belongs to
        self._host: torch.Tensor | None = None
        self._rows: Any = None  # numpy view of _host: reading it is a plain memory read, not a tensor call
        self._events: list[Any] = []
        self._allocate(cuda)

    def _allocate(self, cuda: bool) -> None:
        self._host = torch.empty(ROWS, 4, pin_memory=cuda)  # (steps in flight, probes + loss + loss scale)
        self._rows = self._host.numpy()
        self._events = [torch.cuda.Event() for _ in range(ROWS)] if cuda else []

    def arm(
        self,
        step: int,
        forward: torch.Tensor | None,
        backward: torch.Tensor | None,
        loss: torch.Tensor | float | None,
        scale: torch.Tensor | None = None,
    ) -> None:
        """Queue this step's check: ``forward`` the step's activation sums, ``backward`` its gradient norms,
        ``loss`` its loss, ``scale`` a GradScaler's loss scale (a one-element tensor); each may be None."""
        probes = [(k, t) for k, t in ((FORWARD, forward), (BACKWARD, backward)) if t is not None and t.numel()]
        loss_t = loss if isinstance(loss, torch.Tensor) else None
        host_loss = float(loss) if loss is not None and loss_t is None else None
        if not probes and loss_t is None:
            if host_loss is not None:
                self._pending.append(_Pending(step, -1, None, (), False, host_loss))
            return
        device = (probes[0][1] if probes else loss_t).device
        parts = [t.to(device, non_blocking=True).mul(0).sum() for _, t in probes]  # 0, or NaN on a NaN/Inf
        if loss_t is not None:
            parts.append(loss_t.detach().to(device, non_blocking=True).reshape(()).float())
        if scale is not None:
            parts.append(scale.detach().to(device, non_blocking=True).reshape(()).float())
        if self._carry is not None:  # 0, or NaN: a step that found no free row had a NaN/Inf
            parts[0] = parts[0] + self._carry
        numbers = torch.stack(parts)
        on_cuda = device.type == "cuda"
        if on_cuda and not self._events:
            self._allocate(cuda=True)  # the model moved to the GPU after watch()
        if not self._free:  # the device lags ROWS steps behind: let the next step carry this one's NaN
            self.skipped += 1
            lost = numbers.mul(0).sum()
            self._carry = lost if self._carry is None else self._carry + lost
            return
        self._carry = None
        row = self._free.pop()
        target = self._host[row, : numbers.numel()]
        event = None
        if on_cuda:
            target.copy_(numbers, non_blocking=True)
            event = self._events[row]
            event.record()
        else:
            target.copy_(numbers)
        kinds = tuple(k for k, _ in probes)
        self._pending.append(_Pending(step, row, event, kinds, loss_t is not None, host_loss, scale is not None))

    def poll(self) -> list[Trip]:
        """The checks that have reached the host, oldest first, that tripped; never waits for the device."""
        trips: list[Trip] = []
        while self._pending:
            pending = self._pending[0]
            if pending.event is not None and not pending.event.query():
                break  # later steps finish later on the same stream
            self._pending.popleft()
            trip = self._read(pending)
            if trip is not None:
                trips.append(trip)
        return trips

    def _read(self, p: _Pending) -> Trip | None:
        width = len(p.where) + p.has_loss + p.has_scale
        values = [float(v) for v in self._rows[p.row, :width]] if p.row >= 0 else []
        if p.row >= 0:
            self._free.append(p.row)
        scale = values.pop() if p.has_scale else None
        loss = values[-1] if p.has_loss else p.host_loss
        where = [_WHERE[k] for k, v in zip(p.where, values, strict=False) if not math.isfinite(v)]
        if loss is not None and not math.isfinite(loss):
            where.append(_WHERE[LOSS])
        if scale is not None and where == [_WHERE[BACKWARD]] and scale >= MIN_LOSS_SCALE:
            self.overflows += 1  # the scaler skips this step and lowers its scale: no incident
            where = []
        typical = self.jump.judge(loss) if loss is not None else None  # every finite loss joins the history
        kind = "non_finite" if where else "loss_jump" if typical is not None else None
        opened, self._open = kind is not None and kind != self._open, kind  # one trip per run of such steps
        if not opened:
            return None
        if where:
            return Trip(p.step, "non_finite", loss, where=tuple(w for w in _ORDER if w in where), scale=scale)
        return Trip(p.step, kind, loss, typical)
