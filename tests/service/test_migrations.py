"""The Alembic revisions and the models describe the same schema, on every backend."""

from __future__ import annotations

from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import inspect

from layerwatch_server.storage.migrations import current_revisions, head_revisions, schema_problem
from layerwatch_server.storage.models import Base


def test_models_match_migrations(engine, db_url):
    with engine.connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn, opts={"compare_type": True}), Base.metadata)
    assert diff == [], f"models and migrations disagree; add an Alembic revision: {diff}"
    assert current_revisions(engine) == head_revisions(db_url)
    assert schema_problem(engine, db_url) is None


def test_series_query_is_indexed(engine):
    pk = inspect(engine).get_pk_constraint("layer_stats")["constrained_columns"]
    assert pk == ["run_id", "layer_id", "rank", "step"]
