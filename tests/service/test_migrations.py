"""The Alembic revisions and the models describe the same schema, on every backend."""

from __future__ import annotations

from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import inspect

from layerwatch_server.storage import partitions
from layerwatch_server.storage.migrations import current_revisions, head_revisions, schema_problem
from layerwatch_server.storage.models import Base


def test_models_match_migrations(engine, db_url):
    with engine.connect() as conn:
        diff = compare_metadata(
            MigrationContext.configure(conn, opts={"compare_type": True, "include_name": partitions.include_name}),
            Base.metadata,
        )
    assert diff == [], f"models and migrations disagree; add an Alembic revision: {diff}"
    assert current_revisions(engine) == head_revisions(db_url)
    assert schema_problem(engine, db_url) is None


def test_series_query_is_indexed(engine):
    pk = inspect(engine).get_pk_constraint("layer_stats")["constrained_columns"]
    # PostgreSQL: then the partition key, which a partitioned table's primary key must hold
    assert pk == ["run_id", "layer_id", "rank", "step"] + (["day"] if engine.dialect.name == "postgresql" else [])


def test_wheel_lists_every_package_and_ships_the_migrations():
    """pyproject.toml lists packages by hand (alembic/ ships as layerwatch_server.migrations): a new
    package on disk must be added there, or the wheel would leave it out."""
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    root = Path(__file__).resolve().parents[2]
    tool = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]
    on_disk = {
        ".".join(p.parent.relative_to(base).parts)
        for base in (root / "client", root / "service")
        for p in base.rglob("__init__.py")
    }
    shipped = set(tool["packages"])
    assert on_disk | {"layerwatch_server.migrations", "layerwatch_server.migrations.versions"} == shipped
    assert tool["package-dir"]["layerwatch_server.migrations"] == "alembic"
    assert (root / "alembic" / "env.py").is_file() and any((root / "alembic" / "versions").glob("0001_*.py"))
