"""Service-test fixtures: a migrated database per module on SQLite and on the real PostgreSQL, an in-process
app over it, and tokens for it."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from fastapi.testclient import TestClient

from layerwatch_server.app import create_app
from layerwatch_server.core.config import Settings
from layerwatch_server.storage import tokens

from .dbs import fresh_database

BACKENDS = [pytest.param("sqlite"), pytest.param("postgresql", marks=pytest.mark.postgres)]


@pytest.fixture(scope="module", params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture(scope="module")
def db_url(backend: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A database at Alembic head (the migrations, not the models, define the schema in tests)."""
    from layerwatch_server.storage.migrations import upgrade

    with fresh_database(backend, str(tmp_path_factory.mktemp("db"))) as url:
        upgrade(url)
        yield url


@pytest.fixture(scope="module")
def engine(db_url: str):
    from layerwatch_server.storage.engine import make_engine

    eng = make_engine(db_url)
    yield eng
    eng.dispose()


@pytest.fixture(scope="module")
def settings(db_url: str) -> Settings:
    return Settings(db_url=db_url, scheduler=False, token_cache_s=0)


@pytest.fixture(scope="module")
def client(settings: Settings, engine):
    with TestClient(create_app(settings, engine), raise_server_exceptions=False) as c:
        yield c


@pytest.fixture(scope="module")
def token(engine):
    """token(project, scope) -> a fresh token string."""

    def make(project: str, scope: str = "write") -> str:
        return tokens.create_token(engine, project, scope)

    return make
