"""The people-facing CLI's formatting (its commands run against a real collector in tests/test_end_to_end.py)."""

from __future__ import annotations

import datetime as dt

import pytest
from rich.console import Console
from rich.table import Table

from layerwatch.cli import _ago, _fmt

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
