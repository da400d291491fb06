"""Which modules are watched, and what each one's output means (its kind, units and bounds)."""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

from torch import nn

from layerwatch import wire

# Order matters: ReLU6 subclasses Hardtanh but belongs to the ReLU family.
RELU_FAMILY: tuple[type[nn.Module], ...] = (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.PReLU, nn.RReLU)
BOUNDED: tuple[type[nn.Module], ...] = (nn.Tanh, nn.Sigmoid, nn.Hardtanh, nn.Hardsigmoid)
OTHER_ACTIVATIONS: tuple[type[nn.Module], ...] = (
    nn.ELU,
    nn.SELU,
    nn.CELU,
    nn.GELU,
    nn.SiLU,
    nn.Mish,
    nn.Softplus,
    nn.Hardswish,
)
CONV: tuple[type[nn.Module], ...] = (
    nn.Conv1d,
    nn.Conv2d,
    nn.Conv3d,
    nn.ConvTranspose1d,
    nn.ConvTranspose2d,
    nn.ConvTranspose3d,
)
LINEAR: tuple[type[nn.Module], ...] = (nn.Linear, nn.Bilinear)
DEFAULT_TYPES: tuple[type[nn.Module], ...] = RELU_FAMILY + BOUNDED + OTHER_ACTIVATIONS + CONV + LINEAR
# Outputs that are never negative: their minimum is not needed, which saves a pass over each output.
NONNEGATIVE: tuple[type[nn.Module], ...] = (nn.ReLU, nn.ReLU6, nn.Sigmoid, nn.Hardsigmoid, nn.Softplus)


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


def kind_of(module: nn.Module) -> str:
    if isinstance(module, RELU_FAMILY + CONV + LINEAR):
        return wire.KIND_RELU
    if isinstance(module, BOUNDED):
        return wire.KIND_BOUNDED
    return wire.KIND_OTHER


def saturation_band(module: nn.Module, margin: float) -> tuple[float, float] | None:
    """(center, threshold) so that |a - center| >= threshold is 'within margin of a bound'.

    The margin is relative to the half-range: 0.01 means the outer 1% on either side
    (|tanh| >= 0.99, sigmoid <= 0.005 or >= 0.995).
    """
    if isinstance(module, RELU_FAMILY):
        return None
    if isinstance(module, nn.Tanh):
        low, high = -1.0, 1.0
    elif isinstance(module, nn.Sigmoid | nn.Hardsigmoid):
        low, high = 0.0, 1.0
    elif isinstance(module, nn.Hardtanh):
        low, high = float(module.min_val), float(module.max_val)
    else:
        return None
    half = (high - low) / 2
    return (low + half, half * (1 - margin))


def select(
    model: nn.Module,
    types: Sequence[type[nn.Module]] | None,
    include: Iterable[str] = (),
    exclude: Iterable[str] = (),
    sat_margin: float = 0.01,
) -> Iterator[tuple[nn.Module, LayerSpec]]:
    """Modules to hook, in registration order, named as in ``model.named_modules()``.

    A module is watched when its type is one of ``types`` (default: activations, Linear, Conv), its name
    matches one of the ``include`` globs (when any are given), and it matches none of ``exclude``.
    """
    watched_types = tuple(types) if types is not None else DEFAULT_TYPES
    include, exclude = list(include), list(exclude)
    for name, module in model.named_modules():
        if not name or not isinstance(module, watched_types):
            continue
        if include and not any(fnmatch.fnmatchcase(name, p) for p in include):
            continue
        if any(fnmatch.fnmatchcase(name, p) for p in exclude):
            continue
        yield (
            module,
            LayerSpec(
                name=name,
                type=type(module).__name__,
                kind=kind_of(module),
                conv=isinstance(module, CONV),
                nonneg=isinstance(module, NONNEGATIVE),
                sat=saturation_band(module, sat_margin),
                activation=not isinstance(module, CONV + LINEAR),
            ),
        )


def unwrap(model: nn.Module) -> nn.Module:
    """The user's model inside DDP / DataParallel wrappers, so layer names match their code."""
    while isinstance(model, nn.DataParallel | nn.parallel.DistributedDataParallel):
        model = model.module
    return model
