"""The people-facing CLI's formatting (its commands run against a real collector in tests/test_end_to_end.py)."""

from __future__ import annotations

import datetime as dt

import click
import pytest
from rich.console import Console
from rich.table import Table

from layerwatch.cli import _ago, _fmt, _run_path, _shown_kind

NOW = dt.datetime(2026, 11, 22, 12, 0, tzinfo=dt.timezone.utc).timestamp()


@pytest.mark.parametrize(
    ("iso", "shown"),
    [
        ("2026-11-22T11:59:18Z", "42 s ago"),
        ("2026-11-22T11:55:00.5+00:00", "4 min ago"),
        ("2026-11-22T09:00:00Z", "3 h ago"),
        ("2026-11-20T11:00:00Z", "2 d ago"),
        ("2026-11-22T12:00:05Z", "0 s ago"),  # a collector clock slightly ahead
        (None, "-"),
        ("yesterday", "yesterday"),
    ],
)
def test_last_seen_reads_as_an_age(iso, shown):
    assert _ago(iso, now=NOW) == shown


@pytest.mark.parametrize(
    ("value", "shown"),
    [("resnet[lr=0.1]", "resnet[lr=0.1]"), ("a[bold]b", "a[bold]b"), ([128, 64], "[128, 64]"), (0.123456, "0.1235")],
)
def test_table_cells_show_names_as_they_are(value, shown):
    """Rich reads `[...]` in a cell as markup: a run called `resnet[lr=0.1]` must not lose its brackets."""
    console = Console(width=80, record=True)
    table = Table()
    table.add_column("x")
    table.add_row(_fmt(value))
    console.print(table)
    assert shown in console.export_text()


@pytest.mark.parametrize(
    ("pasted", "path"),
    [
        ("3cf51fa73b2e", "/api/v1/runs/3cf51fa73b2e"),
        ("3cf51fa7…", "/api/v1/runs/3cf51fa7"),  # rich's ellipsis, pasted from a narrow table
        ("3cf51fa7... ", "/api/v1/runs/3cf51fa7"),
        ("run é/1", "/api/v1/runs/run%20%C3%A9%2F1"),  # anything else is quoted, never a UnicodeEncodeError
    ],
)
def test_a_pasted_run_id_becomes_a_path(pasted, path):
    assert _run_path(pasted) == path


def test_an_empty_run_id_is_refused():
    with pytest.raises(click.BadParameter):
        _run_path(" … ")


def test_layers_are_shown_as_what_they_are():
    layers = [{"type": "Conv2d", "kind": "relu"}, {"type": "ReLU", "kind": "relu"}, {"type": "Linear", "kind": "relu"}]
    assert [_shown_kind(layer, last=i == 2) for i, layer in enumerate(layers)] == ["conv", "relu", "output"]
    assert _shown_kind({"type": "Linear", "kind": "relu"}, last=False) == "linear"
    assert _shown_kind({"type": "Tanh", "kind": "bounded"}, last=True) == "bounded"
