"""Forward hooks that reduce each watched activation into preallocated device buffers.

A *layer* here is a watched module at one unit count: a module applied to outputs with different numbers
of units (a ReLU shared across a bottleneck block) gets one layer per unit count, the later ones named
``name#1``, ``name#2``; calls at the same unit count within a step (a ReLU reused twice, gradient
accumulation) are merged into one record. Layers are discovered on their first call.
"""

from __future__ import annotations

import logging
import math
import weakref
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.nn.utils.rnn import PackedSequence

from layerwatch import stats, wire
from layerwatch.histograms import Histograms
from layerwatch.layers import LayerSpec

log = logging.getLogger("layerwatch")

SILENT_STEPS = 3  # steps without any watched module firing before a warning says why that may be


@dataclass
class Layer:
    index: int
    name: str
    spec: LayerSpec
    unit_dim: int
    units: int
    shape: list[int]
    unit_offset: int  # where this layer's activity mask starts in the flat mask buffer
    called_in_window: bool = False
    # A Linear/Conv output that a watched activation module takes as its input: its units are measured
    # there, so it gets the distribution statistics only (no per-unit extremes, no zero count).
    feeds_activation: bool = False
    # Views into the recorder's buffers (rebuilt when they grow): this layer's record in each step slot,
    # and its units' running extremes. Built once, they spare each call a few tensor indexing ops.
    records: list[torch.Tensor] = field(default_factory=list, repr=False)
    high: torch.Tensor | None = field(default=None, repr=False)
    low: torch.Tensor | None = field(default=None, repr=False)

    def describe(self) -> dict:
        return {
            "index": self.index,
            "name": self.name,
            "type": self.spec.type,
            "kind": self.spec.kind,
            "shape": self.shape,
            "units": self.units,
        }


@dataclass
class StepCalls:
    """Host-side record of one step: which layers ran, in execution order, over how many elements."""

    order: list[int] = field(default_factory=list)
    elements: dict[int, int] = field(default_factory=dict)


class Recorder:
    """Owns the hooks and the device buffers: (layers, every, RAW_WIDTH) sums and per-unit window extremes."""

    def __init__(self, every: int, eps: float) -> None:
        self.every = every
        self.eps = eps
        # NaN/Inf are counted element by element once a report has shown one (set by the exporter thread);
        # until then a finite sum proves there are none, which saves a pass over every activation.
        self.count_nonfinite = False
        self._scratch = stats.Scratch()
        self._last: tuple[weakref.ref, Layer] | None = None  # the output recorded last and its layer
        self.layers: list[Layer] = []
        self._by_module: dict[int, dict[int, Layer]] = {}
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        self._raw: torch.Tensor | None = None  # (capacity, every, RAW_WIDTH) float32
        self._high: torch.Tensor | None = None  # (unit capacity,) running max of each unit in the window
        self._low: torch.Tensor | None = None  # (unit capacity,) running min (non-ReLU kinds only)
        self._segments: torch.Tensor | None = None  # (units,) layer index of each unit
        self._positive_only: torch.Tensor | None = None  # (units,) bool: active means > eps
        self._units: torch.Tensor | None = None  # (layers,) units per layer, float
        self.slot = 0
        self.current = StepCalls()
        self.window_calls: list[StepCalls] = []
        self.failed = False
        self.watched = 0  # modules hooked
        self.saw_no_grad = False  # a hook fired under no_grad (a validation pass)
        # Calls skipped under no_grad since the last training forward began, per module (see _recompute).
        self._skipped: dict[nn.Module, int] = {}
        self.steps_unheard: int | None = 0  # steps with no layer recorded yet; None once warned
        # Calls traced by torch.compile since the last fold: (module, spec, shape, unit dim, record, unit max,
        # unit min), and the unit dim and shape of the last one (for the next one's unit dim).
        self._traced: list[tuple] = []
        self.compiled = False  # a compiled graph has traced the hooks
        self._said_eager = False  # the warning that some hook runs eagerly in a compiled model was given
        self._traced_shape: tuple[int, tuple[int, ...]] | None = None  # (unit dim, shape)
        self.histograms: Histograms | None = None  # per-layer distributions at histogram steps (Monitor sets it)

    # -- hooks ---------------------------------------------------------------------------------------
    def attach(self, model: nn.Module, watched: list[tuple[nn.Module, LayerSpec]]) -> None:
        # Before each forward (a micro-batch), fold what compiled graphs traced: traced calls append to one
        # list whose length the compiled graph guards, so it must start every forward empty. The hook is
        # excluded from compilation: torch.compile(model) runs the hooks of a model class of your own outside
        # its graph. A torch.nn container (nn.Sequential) compiled whole is traced with its own hooks: there
        # the hook would break the graph before its children, whose hooks dynamo would then compile one by
        # one, so it is left out, and such a model recompiles once per micro-batch under gradient accumulation.
        if not type(model).__module__.startswith("torch.nn."):
            self._handles.append(model.register_forward_pre_hook(torch.compiler.disable(self._start_forward)))
        for module, spec in watched:
            self._handles.append(module.register_forward_hook(self._hook_for(spec)))
        self.watched = len(watched)

    def _start_forward(self, module: nn.Module, inputs: tuple) -> None:
        if torch.is_grad_enabled():
            self._skipped.clear()  # a training forward begins: the no_grad calls before it were validation
        if self._traced:
            self.fold()

    def _recompute(self, module: nn.Module) -> bool:
        """Whether a call inside backward is the only one of its forward: reentrant checkpointing runs the
        forward under no_grad and records nothing, then recomputes it in backward, which is recorded instead.
        (Non-reentrant checkpointing runs the forward with grad, so its recompute is skipped.)"""
        skipped = self._skipped.get(module, 0)
        if skipped:
            self._skipped[module] = skipped - 1
        return skipped > 0

    def detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def _hook_for(self, spec: LayerSpec):
        def hook(module: nn.Module, inputs: tuple, output: object) -> None:
            # Validation passes (no_grad / inference_mode) are not training steps, and the forward that
            # activation checkpointing recomputes inside backward was recorded already.
            if self.failed:
                return
            if not torch.is_grad_enabled():
                if not torch.compiler.is_compiling():  # (a compiled graph would guard on the count)
                    self.saw_no_grad = True
                    self._skipped[module] = self._skipped.get(module, 0) + 1
                return
            tensor = output if isinstance(output, torch.Tensor) else _first_tensor(output)
            if tensor is None or not tensor.is_floating_point() or tensor.numel() == 0:
                return
            if torch.compiler.is_compiling():
                self._trace(module, spec, tensor)
                return
            if _in_backward() and not self._recompute(module):
                return
            try:
                if self._traced:
                    self.fold()
                if self.compiled and not self._said_eager:
                    self._said_eager = True
                    log.warning(
                        "layerwatch: %s runs outside the compiled graphs (a graph break, or a part not compiled): "
                        "its statistics take the eager path (the same figures, not fused into the model's kernels)",
                        spec.name,
                    )
                source = None
                if spec.activation and inputs and self._last is not None:
                    source = self._note_input(inputs[0])
                layer = self._record(module, spec, tensor.detach(), source)
                self._last = (weakref.ref(tensor), layer)
            except Exception:  # never let the monitor break the forward pass
                self.failed = True
                log.exception("layerwatch: activation statistics disabled after an error in %s", spec.name)

        return hook

    def _trace(self, module: nn.Module, spec: LayerSpec, output: torch.Tensor) -> None:
        """The hook as torch.compile traces it: fresh tensors only, kept for :meth:`fold` after the step.

        Writing into the recorder's buffers from a compiled graph is what aot_autograd refuses (mutated views
        of graph inputs), so the reductions stay in the graph, where inductor fuses them into the model's own
        kernels, and the bookkeeping runs eagerly on their results: a few tiny copies per layer and step.

        No tensor is kept across hooks (it would become an extra graph output aliasing the model's own, which
        aot_autograd mishandled on GPT-2), so a traced Linear does not learn that it feeds an activation: it
        keeps its zero_frac and dead_frac, figures the eager path leaves to the activation."""
        a = output.detach()
        dim = unit_dim(spec, tuple(a.shape), self._traced_shape)
        record, unit_max, unit_min = stats.activation_record(
            a,
            dim,
            self.eps,
            spec.sat,
            spec.nonneg,
            positive_only=_positive_only(spec),
            count_finite=self.count_nonfinite,
        )
        self._traced.append((module, spec, tuple(a.shape), dim, record, unit_max, unit_min))
        self._traced_shape = (dim, tuple(a.shape))

    def fold(self) -> None:
        """Account the records traced in compiled graphs since the last fold, in their execution order."""
        self.compiled = True
        traced = list(self._traced)
        self._traced.clear()  # the same list: a new one would fail the compiled graph's guards
        self._traced_shape = None
        for module, spec, shape, dim, record, unit_max, unit_min in traced:
            numel = math.prod(shape)
            units = shape[dim] if shape else 1
            layer = self._by_module.get(id(module), {}).get(units) or self._new_layer(
                module, spec, shape, dim, record.device
            )
            if layer.feeds_activation:  # known from eager calls: measured as there, no zero count or unit extremes
                record = record.clone()
                record[stats.RAW_NONZERO] = math.nan
                unit_max = unit_min = None
            self._account(layer, record, unit_max, unit_min, numel, merge=layer.index in self.current.elements)

    def _note_input(self, source: object) -> Layer | None:
        """The layer whose output, recorded just before, is this activation's input, or None.

        A Linear/Conv output that feeds an activation module has its units measured there, after the
        activation, from its next call on."""
        assert self._last is not None
        output, previous = self._last
        if source is not output():
            return None
        if not previous.spec.activation and not previous.feeds_activation:
            previous.feeds_activation = True
            # Its first call was measured in full before this was known: drop that zero count as well, so that
            # its zero_frac is null on every step, not 0 on the first one only.
            previous.records[self.slot][stats.RAW_NONZERO] = math.nan
        return previous

    def _record(self, module: nn.Module, spec: LayerSpec, a: torch.Tensor, source: Layer | None = None) -> Layer:
        unit_dim = self._unit_dim(spec, a)
        units = a.shape[unit_dim] if a.dim() else 1
        layer = self._by_module.get(id(module), {}).get(units) or self._new_layer(
            module, spec, tuple(a.shape), unit_dim, a.device
        )
        if self.histograms is not None and self.histograms.due:
            self.histograms.add_activation(layer.index, a)
        elements = self.current.elements
        merge = layer.index in elements
        elsewhere = a.device != layer.records[self.slot].device
        record = torch.empty(stats.RAW_WIDTH, device=a.device) if merge or elsewhere else layer.records[self.slot]
        full = not layer.feeds_activation
        known_max = None
        # max(relu(z)) = max(max(z), 0) for z recorded once this step (one call: its element count is ours)
        once = source is not None and elements.get(source.index) == a.numel()
        if once and spec.type == "ReLU" and not (merge or elsewhere) and self.eps == 0:
            known_max = source.records[self.slot][stats.RAW_MAX].clamp(min=0)
        unit_max, unit_min = stats.activation_raw(
            a,
            layer.unit_dim,
            self.eps,
            spec.sat,
            record,
            spec.nonneg,
            positive_only=_positive_only(spec),
            per_unit=full,
            zeros=full,
            count_finite=self.count_nonfinite,
            known_max=known_max,
            scratch=self._scratch,
        )
        if merge or elsewhere:  # otherwise activation_raw wrote into the buffer already
            self._account(layer, record, unit_max, unit_min, a.numel(), merge)
            return layer
        self._account(layer, None, unit_max, unit_min, a.numel(), merge)
        return layer

    def _account(
        self,
        layer: Layer,
        record: torch.Tensor | None,
        unit_max: torch.Tensor | None,
        unit_min: torch.Tensor | None,
        elements: int,
        merge: bool,
    ) -> None:
        """Put one call's record (None: written in place already) and unit extremes into the step's buffers."""
        device = layer.records[self.slot].device
        if record is not None and record.device != device:
            record = record.to(device, non_blocking=True)
            unit_max = unit_max.to(device, non_blocking=True) if unit_max is not None else None
            unit_min = unit_min.to(device, non_blocking=True) if unit_min is not None else None
        if merge and record is not None:
            stats.merge_raw(layer.records[self.slot], record)
        elif record is not None:
            layer.records[self.slot].copy_(record)
        # Running per-unit extremes over the window; fmax/fmin let a NaN neither kill nor revive a unit.
        if unit_max is not None:
            torch.fmax(layer.high, unit_max, out=layer.high)
        if unit_min is not None:
            torch.fmin(layer.low, unit_min, out=layer.low)
        counts = self.current.elements
        if merge:
            counts[layer.index] += elements
        else:
            counts[layer.index] = elements
            self.current.order.append(layer.index)
        layer.called_in_window = True

    def _unit_dim(self, spec: LayerSpec, a: torch.Tensor) -> int:
        previous = self.layers[self.current.order[-1]] if self.current.order else None
        return unit_dim(spec, tuple(a.shape), (previous.unit_dim, tuple(previous.shape)) if previous else None)

    def _new_layer(
        self, module: nn.Module, spec: LayerSpec, shape: tuple[int, ...], unit_dim: int, device: torch.device
    ) -> Layer:
        per_module = self._by_module.setdefault(id(module), {})
        name = spec.name if not per_module else f"{spec.name}#{len(per_module)}"
        units = shape[unit_dim] if shape else 1
        offset = self.layers[-1].unit_offset + self.layers[-1].units if self.layers else 0
        layer = Layer(len(self.layers), name, spec, unit_dim, units, list(shape), offset)
        self.layers.append(layer)
        per_module[units] = layer
        self._grow(device)
        return layer

    def _grow(self, device: torch.device) -> None:
        """Reallocate the buffers when a new layer does not fit (a handful of times, at the start)."""
        count, units = len(self.layers), self.layers[-1].unit_offset + self.layers[-1].units
        raw, high, low = self._raw, self._high, self._low
        if raw is None or count > raw.shape[0]:
            bigger = torch.zeros(max(16, 2 * count), self.every, stats.RAW_WIDTH, device=device)
            if raw is not None:
                bigger[: raw.shape[0]] = raw
            self._raw = bigger
        if high is None or low is None or units > high.numel():
            size = max(1024, 2 * units)
            self._high = torch.full((size,), -math.inf, device=self._raw.device)
            self._low = torch.full((size,), math.inf, device=self._raw.device)
            if high is not None and low is not None:
                self._high[: high.numel()] = high
                self._low[: low.numel()] = low
        for layer in self.layers:
            layer.records = list(self._raw[layer.index].unbind(0))
            layer.high = self._high.narrow(0, layer.unit_offset, layer.units)
            layer.low = self._low.narrow(0, layer.unit_offset, layer.units)
        self._segments = None

    # -- steps and windows -----------------------------------------------------------------------------
    def end_step(self) -> None:
        if self._traced:
            self.fold()
        if not self.layers and self.steps_unheard is not None:
            self.steps_unheard += 1
            if self.steps_unheard >= SILENT_STEPS:
                self.steps_unheard = None
                self._warn_unheard()
        self.window_calls.append(self.current)
        self.current = StepCalls()
        self.slot += 1

    def _warn_unheard(self) -> None:
        if self.watched == 0:
            reason = "no module matched: check the include/exclude patterns and types (see docs/reference.md)"
        elif self.saw_no_grad:
            reason = "their forward passes ran under torch.no_grad()/inference_mode(), which count as validation"
        else:
            reason = (
                "the model trained is not the module given to watch() (a copy, or one rebuilt by a wrapper "
                "after watch(): watch the model you call, wrapped or not)"
            )
        log.warning("layerwatch: %d steps and none of %d watched modules ran: %s", SILENT_STEPS, self.watched, reason)

    def take_raw(self, keep: bool = False) -> torch.Tensor | None:
        """The report's raw sums, (layers, slots, RAW_WIDTH) flattened, and a fresh slot cursor (``keep``: the
        cursor stays, for a look at the interval so far)."""
        slots = self.slot
        if not keep:
            self.slot = 0
        if self._raw is None or not self.layers or slots == 0:
            return None
        return self._raw[: len(self.layers), :slots].reshape(-1)

    # -- the per-step tripwire (layerwatch.tripwire) -------------------------------------------------------
    _sums_index: tuple[tuple[int, ...], torch.Tensor] | None = None  # layers of the last partial step, on device

    def step_sums(self, calls: StepCalls) -> torch.Tensor | None:
        """The activation sums the step that just ended (``calls``; after end_step) wrote, on the device: non-finite
        exactly when a NaN/Inf passed one of its layers. Slots of layers that did not run hold older steps' sums."""
        if self._raw is None or not calls.order or self.slot == 0:
            return None
        column = self._raw[: len(self.layers), self.slot - 1, stats.RAW_SUM]  # (layers,)
        if len(calls.order) == len(self.layers):
            return column
        key = tuple(sorted(calls.order))
        if self._sums_index is None or self._sums_index[0] != key:
            index = torch.tensor(key, pin_memory=column.is_cuda)  # pinned: the upload does not wait
            self._sums_index = (key, index.to(column.device, non_blocking=True))
        return column.index_select(0, self._sums_index[1])

    def dead_fractions(self, pack: bool = False) -> tuple[torch.Tensor | None, torch.Tensor | None, list[bool]]:
        """End of a dead-unit window: per layer the share of units never active on this rank, with ``pack`` also
        the units active here as :func:`stats.pack_bits` words (for the ranks to OR on the exporter thread: a
        unit is dead only if no rank's share made it active); then a fresh window."""
        if self._high is None or self._low is None or not self.layers:
            return None, None, []
        total = self.layers[-1].unit_offset + self.layers[-1].units
        high, low = self._high[:total], self._low[:total]
        if self._segments is None:
            # Rebuilt only when the layout changes: an upload from a Python list would block the host.
            sizes = torch.tensor([layer.units for layer in self.layers])
            positive = torch.tensor([_positive_only(layer.spec) for layer in self.layers])
            self._segments = torch.repeat_interleave(torch.arange(len(self.layers)), sizes).to(high.device)
            self._positive_only = torch.repeat_interleave(positive, sizes).to(high.device)
            self._units = sizes.float().to(high.device)
        active = (high > self.eps) | (~self._positive_only & (low < -self.eps))
        words = stats.pack_bits(active) if pack else None
        dead = torch.zeros(len(self.layers), device=high.device)
        dead.index_add_(0, self._segments, (~active).float())
        dead /= self._units
        called = [layer.called_in_window and not layer.feeds_activation for layer in self.layers]
        self._high.fill_(-math.inf)
        self._low.fill_(math.inf)
        for layer in self.layers:
            layer.called_in_window = False
        return dead, words, called


def unit_dim(spec: LayerSpec, shape: tuple[int, ...], previous: tuple[int, tuple[int, ...]] | None) -> int:
    """Where an output's units are: channels (dim 1) for conv outputs, the last dim for Linear-like outputs
    (a ConvNeXt Linear on a channels-last map included). An activation takes the unit dim of the output
    recorded just before it when their shapes match (its input, or a BatchNorm of it), else channels for a
    map of 4+ dims and the last dim otherwise. ``previous``: (unit dim, shape) of that output."""
    if len(shape) <= 1:
        return 0
    if spec.conv:
        return 1
    if spec.activation:
        if previous is not None and previous[1][1:] == shape[1:]:
            return previous[0]
        if len(shape) >= 4:
            return 1
    return len(shape) - 1


def _positive_only(spec: LayerSpec) -> bool:
    """Active means output > eps (ReLU family, Linear/Conv, never-negative outputs), else |output| > eps."""
    return spec.kind == wire.KIND_RELU or spec.nonneg


def _in_backward() -> bool:
    """Inside an autograd backward pass: where torch.utils.checkpoint (reentrant or not) recomputes forwards."""
    return torch._C._current_graph_task_id() != -1


def _first_tensor(output: object) -> torch.Tensor | None:
    """The output tensor of a module returning several things: an RNN's (output, h_n), MHA's (output, weights);
    an RNN's PackedSequence output is its packed data, (total steps, units)."""
    if isinstance(output, PackedSequence):
        return output.data
    if isinstance(output, list | tuple):
        if output and isinstance(output[0], PackedSequence):
            return output[0].data
        for item in output:
            if isinstance(item, torch.Tensor):
                return item
    return None
