"""Which modules are watched, and what each one's output means (its kind, units and bounds).

Module types are recognised by class, walking the module's MRO: first the types users registered
(:func:`register_type`), then torch.nn's, then those of libraries the user's code has imported already
(Hugging Face transformers' activations and its ``Conv1D``). layerwatch never imports those libraries itself.
"""

from __future__ import annotations

import fnmatch
import sys
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass

from torch import nn

from layerwatch import wire


@dataclass(frozen=True)
class Kind:
    """What one module type's output is: how its units are read and what dead/saturated mean for it."""

    kind: str  # one of wire.KINDS
    bounds: tuple[float, float] | None = None  # (low, high) of a bounded output: sat_frac is measured
    nonneg: bool = False  # outputs are never negative
    activation: bool = True  # an activation (False: a Linear/Conv-like output, units measured after it)
    conv: bool = False  # units are channels (dim 1), not the last dim


# Kind names register_type accepts, as the Kind they stand for (bounded ones take their bounds as given).
KIND_NAMES: dict[str, Kind] = {
    "relu": Kind(wire.KIND_RELU),
    "bounded": Kind(wire.KIND_BOUNDED),
    "other": Kind(wire.KIND_OTHER),
    "gelu": Kind(wire.KIND_OTHER),
    "silu": Kind(wire.KIND_OTHER),
    "tanh": Kind(wire.KIND_BOUNDED, bounds=(-1.0, 1.0)),
    "sigmoid": Kind(wire.KIND_BOUNDED, bounds=(0.0, 1.0), nonneg=True),
    "linear": Kind(wire.KIND_RELU, activation=False),
    "conv": Kind(wire.KIND_RELU, activation=False, conv=True),
}

KindRule = Kind | Callable[[nn.Module], Kind]

_RELU = Kind(wire.KIND_RELU)
_RELU_NONNEG = Kind(wire.KIND_RELU, nonneg=True)
_OTHER = Kind(wire.KIND_OTHER)
_LINEAR = KIND_NAMES["linear"]
_CONV = KIND_NAMES["conv"]
_TANH = KIND_NAMES["tanh"]
_SIGMOID = KIND_NAMES["sigmoid"]


def _rnn(module: nn.Module) -> Kind:
    """An RNN's output sequence, (.., hidden * directions): LSTM/GRU/tanh-RNN outputs lie in (-1, 1)."""
    if getattr(module, "nonlinearity", "tanh") == "relu":
        return Kind(wire.KIND_RELU, nonneg=True, activation=False)
    return Kind(wire.KIND_BOUNDED, bounds=(-1.0, 1.0), activation=False)


TORCH_KINDS: dict[type[nn.Module], KindRule] = {
    nn.ReLU: _RELU_NONNEG,
    nn.ReLU6: Kind(wire.KIND_RELU, nonneg=True),  # a Hardtanh subclass, but of the ReLU family
    nn.LeakyReLU: _RELU,
    nn.PReLU: _RELU,
    nn.RReLU: _RELU,
    nn.Tanh: _TANH,
    nn.Sigmoid: _SIGMOID,
    nn.Hardtanh: lambda m: Kind(wire.KIND_BOUNDED, bounds=(float(m.min_val), float(m.max_val))),
    nn.Hardsigmoid: _SIGMOID,
    nn.ELU: _OTHER,
    nn.SELU: _OTHER,
    nn.CELU: _OTHER,
    nn.GELU: _OTHER,
    nn.SiLU: _OTHER,
    nn.Mish: _OTHER,
    nn.Softplus: Kind(wire.KIND_OTHER, nonneg=True),
    nn.Hardswish: _OTHER,
    **dict.fromkeys((nn.Conv1d, nn.Conv2d, nn.Conv3d), _CONV),
    **dict.fromkeys((nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d), _CONV),
    nn.Linear: _LINEAR,
    nn.Bilinear: _LINEAR,
    nn.RNN: _rnn,
    nn.LSTM: _rnn,
    nn.GRU: _rnn,
}

# Classes of libraries recognised once the user's code has imported them: module -> {class name: kind}.
LIBRARY_KINDS: dict[str, dict[str, KindRule]] = {
    "transformers.activations": {
        **dict.fromkeys(
            (
                "GELUActivation",
                "NewGELUActivation",
                "FastGELUActivation",
                "QuickGELUActivation",
                "AccurateGELUActivation",
                "GELUTanh",
                "PytorchGELUTanh",
                "SiLUActivation",
                "MishActivation",
                "XIELUActivation",
            ),
            _OTHER,
        ),
        "ClippedGELUActivation": lambda m: Kind(wire.KIND_BOUNDED, bounds=(float(m.min), float(m.max))),
        "ReLUSquaredActivation": _RELU_NONNEG,
        "SqrtSoftplusActivation": Kind(wire.KIND_OTHER, nonneg=True),
        "LaplaceActivation": _SIGMOID,  # a CDF: (0, 1)
    },
    "transformers.pytorch_utils": {"Conv1D": _LINEAR},  # GPT-2's Linear with a transposed weight
}

_registered: dict[type[nn.Module], Kind] = {}
_library_cache: dict[str, tuple[object, dict[type, KindRule]]] = {}


def register_type(
    cls: type[nn.Module], kind: str = "other", *, bounds: tuple[float, float] | None = None, nonneg: bool = False
) -> None:
    """Watch every module of type ``cls`` (and its subclasses) by default, with the meaning of ``kind``.

    ``kind``: ``relu`` (active means output > eps), ``other``/``gelu``/``silu`` (active means |output| > eps),
    ``bounded`` with ``bounds=(low, high)``, ``tanh`` or ``sigmoid`` (also measures sat_frac), ``linear``
    or ``conv`` (a pre-activation output whose units are its last dim, or its channels). ``nonneg``: the
    outputs are never negative (saves a pass). A registration overrides the built-in kind of a type."""
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        raise TypeError(f"register_type takes an nn.Module subclass, got {cls!r}")
    base = KIND_NAMES.get(kind)
    if base is None:
        raise ValueError(f"unknown kind {kind!r}; use one of {', '.join(KIND_NAMES)}")
    bounds = bounds if bounds is not None else base.bounds
    if base.kind == wire.KIND_BOUNDED and bounds is None:
        raise ValueError(f"kind {kind!r} needs bounds=(low, high): the range its outputs saturate at")
    if bounds is not None and not bounds[0] < bounds[1]:
        raise ValueError(f"bounds must be (low, high) with low < high, got {bounds!r}")
    kind_of_cls = wire.KIND_BOUNDED if bounds is not None and base.activation else base.kind
    _registered[cls] = Kind(kind_of_cls, bounds, nonneg or base.nonneg, base.activation, base.conv)


def _library_kinds() -> dict[type, KindRule]:
    """The recognised classes of the libraries loaded now, by class (rebuilt when a module object changes)."""
    found: dict[type, KindRule] = {}
    for module_name, by_name in LIBRARY_KINDS.items():
        module = sys.modules.get(module_name)
        if module is None:
            continue
        cached = _library_cache.get(module_name)
        if cached is None or cached[0] is not module:
            classes = {getattr(module, n, None): rule for n, rule in by_name.items()}
            classes.pop(None, None)
            cached = _library_cache[module_name] = (module, classes)
        found.update(cached[1])
    return found


def kind_of(module: nn.Module, extra: Mapping[type, KindRule] | None = None) -> Kind | None:
    """The module's kind, or None when its type is not recognised. ``extra`` (the ``types=`` mapping) first."""
    tables = [t for t in (extra, _registered, TORCH_KINDS, _library_kinds()) if t]
    for cls in type(module).__mro__:
        for table in tables:
            rule = table.get(cls)
            if rule is not None:
                return rule(module) if callable(rule) else rule
    return None


@dataclass(frozen=True)
class LayerSpec:
    """What the statistics of one watched module need to know about it."""

    name: str
    type: str
    kind: str  # one of wire.KINDS
    conv: bool  # the unit dim is the channel dim (1), not the last
    nonneg: bool  # outputs are never negative (ReLU, sigmoid, ...): active means > eps, no minimum needed
    sat: tuple[float, float] | None  # (center, threshold) for bounded activations
    activation: bool = False  # an activation module (not a Linear/Conv output)


def saturation_band(bounds: tuple[float, float] | None, margin: float) -> tuple[float, float] | None:
    """(center, threshold) so that |a - center| >= threshold is 'within margin of a bound'.

    The margin is relative to the half-range: 0.01 means the outer 1% on either side
    (|tanh| >= 0.99, sigmoid <= 0.005 or >= 0.995).
    """
    if bounds is None:
        return None
    low, high = bounds
    half = (high - low) / 2
    return (low + half, half * (1 - margin))


def _types_table(types: Sequence[type[nn.Module]] | Mapping[type[nn.Module], str] | None) -> dict[type, KindRule]:
    """``types=`` as {class: kind}: a mapping names each kind; a sequence keeps each class's known kind."""
    if types is None or not isinstance(types, Mapping):
        return {}
    table: dict[type, KindRule] = {}
    for cls, name in types.items():
        base = KIND_NAMES.get(name)
        if base is None:
            raise ValueError(f"types: unknown kind {name!r} for {cls.__name__}; use one of {', '.join(KIND_NAMES)}")
        table[cls] = base
    return table


def select(
    model: nn.Module,
    types: Sequence[type[nn.Module]] | Mapping[type[nn.Module], str] | None,
    include: Iterable[str] = (),
    exclude: Iterable[str] = (),
    sat_margin: float = 0.01,
) -> Iterator[tuple[nn.Module, LayerSpec]]:
    """Modules to hook, in registration order, named as in ``model.named_modules()``.

    A module is watched when its type is one of ``types`` (default: every recognised type), its name matches
    one of the ``include`` globs (when any are given), and it matches none of ``exclude``.

    ``nn.MultiheadAttention`` never calls its ``out_proj`` as a module (it passes the weights to a
    function), so a hook there would never fire: the attention module's output, which is exactly out_proj's
    output, is watched under out_proj's name instead.
    """
    extra = _types_table(types)
    only = tuple(types) if types is not None else None
    include, exclude = list(include), list(exclude)
    attention = {id(m.out_proj): m for m in model.modules() if isinstance(m, nn.MultiheadAttention)}
    for name, module in model.named_modules():
        name = _original_name(name)
        if not name or (only is not None and not isinstance(module, only)):
            continue
        kind = kind_of(module, extra)
        if kind is None and only is not None:
            kind = _OTHER  # a type asked for by the user, of no known kind
        if kind is None or (include and not any(fnmatch.fnmatchcase(name, p) for p in include)):
            continue
        if any(fnmatch.fnmatchcase(name, p) for p in exclude):
            continue
        hooked = attention.get(id(module), module)
        yield (
            hooked,
            LayerSpec(
                name=name,
                type=type(module).__name__,
                kind=kind.kind,
                conv=kind.conv,
                nonneg=kind.nonneg,
                sat=saturation_band(kind.bounds, sat_margin) if kind.activation else None,
                activation=kind.activation,
            ),
        )


def _original_name(name: str) -> str:
    """A module name without torch.compile's ``_orig_mod`` segments (a compiled submodule)."""
    return ".".join(part for part in name.split(".") if part != "_orig_mod")


def unwrap(model: nn.Module) -> nn.Module:
    """The user's model inside DDP / DataParallel / torch.compile wrappers, so layer names match their code."""
    while True:
        if isinstance(model, nn.DataParallel | nn.parallel.DistributedDataParallel):
            model = model.module
        elif _is_compiled_wrapper(model):
            model = model._orig_mod
        else:
            return model


def _is_compiled_wrapper(model: nn.Module) -> bool:
    """torch.compile's OptimizedModule, recognised without importing torch._dynamo (seconds to import)."""
    frames = sys.modules.get("torch._dynamo.eval_frame")
    return frames is not None and isinstance(model, frames.OptimizedModule)


def compiled(model: nn.Module) -> bool:
    """Whether torch.compile wraps the model or a part of it (its hooks then need a recompile to be seen)."""
    if sys.modules.get("torch._dynamo.eval_frame") is None:
        return False
    return any(
        _is_compiled_wrapper(m) or getattr(m, "_compiled_call_impl", None) is not None for m in model.modules()
    ) or _is_compiled_wrapper(model)


def let_compiled_code_see_hooks(model: nn.Module) -> bool:
    """Make torch.compile'd code run the hooks about to be added; True when that took dropping its caches.

    By default dynamo does not guard on module hooks: code compiled before they were added (this model
    compiled before watch(), or another instance of its class) would run without them, silently. With hook
    guards on, later compilations notice hooks; code compiled before is dropped (``torch._dynamo.reset()``:
    everything compiled recompiles once at its next call)."""
    import torch._dynamo

    torch._dynamo.config.skip_nnmodule_hook_guards = False
    frames = getattr(sys.modules.get("torch._dynamo.convert_frame"), "FRAME_COUNTER", 0)
    if frames or compiled(model):
        torch._dynamo.reset()
        return True
    return False
