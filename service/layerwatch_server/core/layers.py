"""Which layers' statistics mean something on their own: shared by the rules, the Prometheus snapshot, the
runs API and the MLflow mirror, so it sits at the bottom of the collector."""

from __future__ import annotations

from collections.abc import Iterable

PRE_ACTIVATIONS = frozenset(
    {"Linear", "Bilinear", "Conv1d", "Conv2d", "Conv3d", "ConvTranspose1d", "ConvTranspose2d", "ConvTranspose3d"}
)


def dead_judged(layers: Iterable[tuple[int, str, str]]) -> set[str]:
    """Names of the layers, given as (index, name, type), whose dead_frac is a finding of its own. A Linear/Conv
    output counts as dead when never positive only because a functional ``F.relu`` may follow it: when the next
    watched layer (in execution order) is an activation module, that module reports the same units itself (or,
    for tanh/GELU..., "never positive" is no death at all); the model's last layer is an output head, whose
    outputs may well all be negative."""
    ordered = sorted(layers)
    judged = set()
    for i, (_, name, type_) in enumerate(ordered):
        if type_ not in PRE_ACTIVATIONS:
            judged.add(name)
        elif i + 1 < len(ordered) and ordered[i + 1][2] in PRE_ACTIVATIONS:
            judged.add(name)  # followed by no activation module: a functional one, if any, sits in between
    return judged
