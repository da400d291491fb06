"""``layerwatch show RUN --map``: the collector's health map as coloured cells, for a terminal on a login node.

One row per layer in model order, one cell per column of steps; a cell shows the layer's worst statistic there:
the larger of ``dead_frac`` and ``sat_frac`` (green below 0.1, yellow below 0.5, red from 0.5 on, grey dot where
nothing was measured), a marker where an alert began.
"""

from __future__ import annotations

from typing import Any

from rich.text import Text

LABEL = 24  # characters of a layer's name
CELL = "█"
ONSET = "▼"


def colour(value: float | None) -> str:
    if value is None:
        return "grey50"
    return "green" if value < 0.1 else "yellow" if value < 0.5 else "red"


def worst(data: dict[str, Any]) -> tuple[list[str], list[list[float | None]], set[tuple[int, int]]]:
    """Rows (layer names), the worst fraction of each cell, and the alert onsets, from the health map's panels."""
    panels = {panel["stat"]: panel for panel in data.get("panels", [])}
    dead, sat = panels.get("dead_frac"), panels.get("sat_frac")
    if dead is None or sat is None:
        return [], [], set()
    cells = [
        [max((v for v in pair if isinstance(v, int | float)), default=None) for pair in zip(a, b, strict=True)]
        for a, b in zip(dead["values"], sat["values"], strict=True)
    ]
    onsets = {(row, col) for panel in (dead, sat) for row, col in panel.get("onsets", [])}
    return list(dead["rows"]), cells, onsets


def lines(data: dict[str, Any]) -> list[Text]:
    rows, cells, onsets = worst(data)
    if not rows:
        return [Text("no layer statistics yet")]
    steps = data.get("steps") or []
    out = [Text(f"{'worst of dead_frac, sat_frac':<{LABEL}}  steps {steps[0]}..{steps[-1]}", style="bold")]
    for i, (name, values) in enumerate(zip(rows, cells, strict=True)):
        line = Text(f"{name[-LABEL:]:>{LABEL}}  ")
        for j, value in enumerate(values):
            mark = ONSET if (i, j) in onsets else CELL if value is not None else "·"
            line.append(mark, style=colour(value) if mark != ONSET else "bold cyan")
        out.append(line)
    out.append(Text(f"{'':<{LABEL}}  ") + Text("< 0.1", "green") + "  " + Text("< 0.5", "yellow") + "  ")
    out[-1].append_text(Text(">= 0.5", "red") + "  " + Text("· not measured", "grey50") + "  ")
    out[-1].append_text(Text(f"{ONSET} alert began", "bold cyan"))
    return out
