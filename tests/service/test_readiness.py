"""/readyz says not ready while the database cannot take writes; batches meanwhile get 503 (retry later), and
both recover once it can."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import create_engine, text

from layerwatch_server.app import create_app
from layerwatch_server.core.config import Settings
from layerwatch_server.storage.migrations import upgrade

from .batches import make_batch, post, unique
from .dbs import fresh_pg_database
from .test_ingest import count_rows


@pytest.fixture
def small_disk(tmp_path: Path):
    """An 8 MiB tmpfs (mounting needs root; skipped where it is not permitted)."""
    disk = tmp_path / "disk"
    disk.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(disk)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip()}")
    yield disk
    subprocess.run(["umount", "-l", str(disk)], check=False)


def _fill(path: Path) -> None:
    with open(path, "wb") as f:
        try:
            while True:
                f.write(bytes(65536))
                f.flush()
        except OSError:  # ENOSPC: the disk is full
            pass


def test_readyz_and_ingest_with_a_full_sqlite_disk(small_disk):
    url = f"sqlite:///{small_disk}/lw.db"
    upgrade(url)
    settings = Settings(db_url=url, no_auth=True, scheduler=False, min_free_mb=1, mlflow_tracking_uri="off")
    with TestClient(create_app(settings), raise_server_exceptions=False) as client:
        assert client.get("/readyz").status_code == 200
        assert post(client, make_batch("k", steps=range(10))).status_code == 202
        _fill(small_disk / "filler")

        ready = client.get("/readyz")
        assert ready.status_code == 503 and "MiB free" in ready.json()["detail"], ready.text
        big = make_batch("k", steps=range(10, 200), n_layers=50)
        refused = post(client, big)
        assert refused.status_code == 503 and "Retry-After" in refused.headers, refused.text  # a retry will do
        assert client.get("/readyz").status_code == 503  # still: the failed batch freed WAL room, not disk

        (small_disk / "filler").unlink()
        assert client.get("/readyz").status_code == 200
        stored = post(client, big)
        assert stored.status_code == 202, stored.text
        assert count_rows(client.app.state.lw.engine, stored.json()["run_id"]) == (200, 9540, 9540)


@pytest.mark.postgres
def test_readyz_with_a_read_only_postgresql_database():
    """A database that only reads (as a standby after a fail-over) answers SELECT 1: only a write tells."""
    with fresh_pg_database() as url:
        upgrade(url)
        name = url.rsplit("/", 1)[1]
        admin = create_engine(url, isolation_level="AUTOCOMMIT")
        settings = Settings(db_url=url, no_auth=True, scheduler=False, mlflow_tracking_uri="off")
        app = create_app(settings)
        try:
            with TestClient(app, raise_server_exceptions=False) as client:
                assert client.get("/readyz").status_code == 200
                with admin.connect() as conn:
                    conn.execute(text(f'ALTER DATABASE "{name}" SET default_transaction_read_only = on'))
                app.state.lw.engine.dispose()  # new connections read the setting

                ready = client.get("/readyz")
                assert ready.status_code == 503 and "cannot take writes" in ready.json()["detail"], ready.text
                assert "ReadOnlySqlTransaction" in ready.json()["detail"]
                batch = make_batch(unique("k"), project=unique())
                assert post(client, batch).status_code == 503

                with admin.connect() as conn:
                    conn.execute(text(f'ALTER DATABASE "{name}" SET default_transaction_read_only = off'))
                app.state.lw.engine.dispose()
                assert client.get("/readyz").status_code == 200
                assert post(client, batch).status_code == 202
        finally:
            admin.dispose()
