"""``layerwatch-server`` commands that open an existing database: run in the wrong folder, they say where they
looked and how to name the database, and leave nothing behind."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from click.testing import CliRunner

from layerwatch_server.cli import main
from layerwatch_server.storage.migrations import upgrade


@pytest.fixture
def elsewhere(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty folder with no layerwatch-data/ in it, and no LAYERWATCH_* settings."""
    for key in list(os.environ):
        if key.startswith("LAYERWATCH_"):
            monkeypatch.delenv(key)
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.mark.parametrize(
    "args",
    [["token", "create", "--project", "p", "--scope", "write"], ["token", "revoke", "lw_x"], ["backfill-mlflow", "r"]],
)
def test_outside_the_data_folder_says_where_it_looked_and_creates_nothing(elsewhere: Path, args: list[str]):
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 1
    expected = elsewhere / "layerwatch-data" / "layerwatch.db"
    assert f"no layerwatch database at {expected} (the default" in result.output
    assert "--db sqlite:////full/path/to/layerwatch.db" in result.output and "LAYERWATCH_DB_URL" in result.output
    assert list(elsewhere.iterdir()) == []  # no empty database file, no folder


def test_an_empty_file_is_no_database(elsewhere: Path):
    (elsewhere / "lw.db").touch()
    result = CliRunner().invoke(
        main, ["token", "create", "--project", "p", "--scope", "read", "--db", "sqlite:///lw.db"]
    )
    assert result.exit_code == 1 and f"no layerwatch database at {elsewhere / 'lw.db'}." in result.output


def test_token_create_prints_the_token_alone_on_stdout(elsewhere: Path):
    upgrade(f"sqlite:///{elsewhere / 'layerwatch-data' / 'layerwatch.db'}")
    result = CliRunner().invoke(main, ["token", "create", "--project", "p", "--scope", "write"])
    assert result.exit_code == 0, result.output
    assert result.stdout.strip().startswith("lw_") and len(result.stdout.split()) == 1
