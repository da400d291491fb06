"""The import direction of the client and the collector, as an executable check (issue #17).

Each module (client) or package (collector) has a tier; an import may only point to a lower tier, so the graph
has no cycles and nothing reaches up. Imports under ``if TYPE_CHECKING:`` are annotations, not dependencies,
and are not counted. The collector's sideways and upward edges that exist today are listed in ``COLLECTOR_DEBT``:
the check fails when a new one appears, and when a listed one is gone (so the list only shrinks).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CLIENT = ROOT / "client" / "layerwatch"
COLLECTOR = ROOT / "service" / "layerwatch_server"

# The client: monitor -> recorder -> stats, monitor -> exporter -> (spool | transport | wire).
CLIENT_TIERS: dict[str, int] = {
    **dict.fromkeys(["wire", "stats", "alerts", "config", "syncs", "tripwire", "spool", "terminal_map"], 0),
    **dict.fromkeys(["transport", "layers", "distributed"], 1),
    **dict.fromkeys(["delivery", "histograms"], 2),
    "recorder": 3,
    "report": 4,  # the bridge: a recorded interval as the batch builder reads it
    "ranks": 5,  # a report's rows combined across ranks, on the exporter thread
    "batching": 6,
    "exporter": 7,
    "monitor": 8,
    **dict.fromkeys(["__init__", "cli", "integrations"], 9),
}

# The collector: cli -> app -> api -> (rules | mirrors | notify | jobs | observability) -> pictures -> storage -> core.
COLLECTOR_TIERS: dict[str, int] = {
    "core": 0,
    "storage": 1,
    "pictures": 2,  # renders what storage holds; the mirror logs its images
    **dict.fromkeys(["rules", "mirrors", "notify", "jobs", "observability"], 3),
    "api": 4,
    "app": 5,
    "cli": 6,
    "__init__": 6,
}
# Edges that break the direction, to be removed (never added to). Paid off by issue #17: keep it empty.
COLLECTOR_DEBT: set[tuple[str, str]] = set()


def _imports(path: Path, package: str) -> set[str]:
    """Dotted names of the first-party modules ``path`` imports at run time (relative imports resolved)."""
    tree = ast.parse(path.read_text(), str(path))
    typing_only: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            typing_only.update(id(child) for stmt in node.body for child in ast.walk(stmt))
    names: set[str] = set()
    for node in ast.walk(tree):
        if id(node) in typing_only:
            continue
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module is not None:
            if node.level:
                raise AssertionError(f"{path}: use absolute imports ({ast.unparse(node)})")
            # `from pkg import mod` imports pkg.mod when mod is a module of pkg.
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
            names.add(node.module)
    return {n for n in names if n == package or n.startswith(package + ".")}


def _unit(dotted: str, package: str, root: Path) -> str | None:
    """The tiered unit a dotted name belongs to: its first component under the package, if that exists."""
    parts = dotted.split(".")[1:]
    if not parts:
        return None  # the package root's namespace (e.g. __version__): the facade, imported lazily
    head = parts[0]
    return head if (root / head).is_dir() or (root / f"{head}.py").exists() else None


def _edges(root: Path, package: str) -> set[tuple[str, str]]:
    edges = set()
    for path in root.rglob("*.py"):
        relative = path.relative_to(root).parts
        source = relative[0].removesuffix(".py")
        for dotted in _imports(path, package):
            target = _unit(dotted, package, root)
            if target is not None and target != source:
                edges.add((source, target))
    return edges


def _upward(edges: set[tuple[str, str]], tiers: dict[str, int]) -> set[tuple[str, str]]:
    unknown = {unit for edge in edges for unit in edge if unit not in tiers}
    assert not unknown, f"give these modules a tier in tests/test_layering.py: {sorted(unknown)}"
    return {(a, b) for a, b in edges if tiers[b] >= tiers[a]}


def _listed(edges: set[tuple[str, str]]) -> str:
    return ", ".join(f"{a} -> {b}" for a, b in sorted(edges))


def test_client_modules_import_only_downward() -> None:
    wrong = _upward(_edges(CLIENT, "layerwatch"), CLIENT_TIERS)
    assert not wrong, f"client imports that point up or sideways: {_listed(wrong)}"


def test_collector_packages_import_only_downward_but_for_the_listed_debt() -> None:
    wrong = _upward(_edges(COLLECTOR, "layerwatch_server"), COLLECTOR_TIERS)
    new = wrong - COLLECTOR_DEBT
    assert not new, f"new collector imports that point up or sideways: {_listed(new)}"
    paid = COLLECTOR_DEBT - wrong
    assert not paid, f"these edges are gone: remove them from COLLECTOR_DEBT: {_listed(paid)}"


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        ("from layerwatch import stats, wire\n", {"stats", "wire"}),
        ("from layerwatch.recorder import StepCalls\n", {"recorder"}),
        ("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from layerwatch.monitor import Monitor\n", set()),
        ("def f():\n    from layerwatch.exporter import Exporter\n", {"exporter"}),
        ("from layerwatch import __version__\n", set()),
    ],
)
def test_the_check_reads_imports_as_python_does(tmp_path: Path, source: str, expected: set[str]) -> None:
    module = tmp_path / "probe.py"
    module.write_text(source)
    units = {_unit(d, "layerwatch", CLIENT) for d in _imports(module, "layerwatch")} - {None}
    assert units == expected
