"""Property run against /openapi.json: whatever schemathesis generates, the collector never answers 5xx.

The app is built at import time because schemathesis parametrizes from a loaded schema; its SQLite
file lives in a temporary directory removed when the module finishes.
"""

from __future__ import annotations

import shutil
import tempfile

import pytest
import schemathesis
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, settings

from layerwatch_server.app import create_app
from layerwatch_server.core.config import Settings
from layerwatch_server.storage.engine import make_engine
from layerwatch_server.storage.migrations import upgrade

from .batches import make_batch, post

_DIR = tempfile.mkdtemp(prefix="lw-fuzz-")
_URL = f"sqlite:///{_DIR}/fuzz.db"
upgrade(_URL)
_ENGINE = make_engine(_URL)
APP = create_app(Settings(db_url=_URL, no_auth=True, scheduler=False), _ENGINE)
schema = schemathesis.openapi.from_asgi("/openapi.json", APP)


@pytest.fixture(scope="module", autouse=True)
def _database():
    with TestClient(APP) as client:  # one real run, so run paths can hit something
        post(client, make_batch("fuzz", steps=range(3), project="fuzz"))
    yield
    _ENGINE.dispose()
    shutil.rmtree(_DIR, ignore_errors=True)


@schema.parametrize()
@settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
def test_no_server_errors(case):
    response = case.call()
    assert response.status_code < 500, f"{case.method} {case.path} -> {response.status_code}: {response.text}"
