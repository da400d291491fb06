"""``layerwatch-server``: serve, migrate, token create/revoke."""

from __future__ import annotations

import gc
import logging
import sys
from pathlib import Path
from typing import Any

import click

try:
    from pydantic import ValidationError

    from layerwatch_server.core.config import ConfigError, Settings, load_settings
    from layerwatch_server.storage import migrations, tokens
    from layerwatch_server.storage.engine import make_engine
    from layerwatch_server.storage.models import ALL_PROJECTS, SCOPES
except ModuleNotFoundError as exc:  # `pip install layerwatch` installs this command, not what it needs
    if (exc.name or "").split(".")[0] in ("layerwatch", "layerwatch_server"):
        raise
    sys.exit(
        f"layerwatch-server: the collector needs packages the client install leaves out ({exc.name} is missing); "
        "install them with: pip install 'layerwatch[server]'"
    )

log = logging.getLogger("layerwatch_server")

_db = click.option("--db", "db_url", metavar="URL", help="Database URL [env LAYERWATCH_DB_URL].")
_config = click.option(
    "--config",
    "config_file",
    metavar="FILE",
    type=click.Path(dir_okay=False),
    help="YAML or TOML file with settings (names as in LAYERWATCH_*, lower case).",
)


def _settings(config_file: str | None, **flags: Any) -> Settings:
    try:
        return load_settings(config_file, **flags)
    except (ValidationError, ConfigError) as exc:
        raise click.ClickException(str(exc)) from None


def _shown(url: str) -> str:
    """A database/tracking URL fit for a log line: any password masked."""
    from sqlalchemy.engine import make_url

    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:
        return url.split("@")[-1] if "@" in url else url


def _existing_database(settings: Settings) -> None:
    """Refuse a SQLite file that is not there (or empty) before opening it, which would create it: a command
    run outside the folder that holds ``layerwatch-data/`` must say where it looked, not leave a file behind."""
    from sqlalchemy.engine import make_url

    url = make_url(settings.db_url)
    if url.get_backend_name() != "sqlite" or url.database in (None, "", ":memory:"):
        return
    path = Path(url.database).resolve()
    if path.is_file() and path.stat().st_size > 0:
        return
    where = " (the default, relative to this folder)" if settings.is_default_db else ""
    raise click.ClickException(
        f"no layerwatch database at {path}{where}. Run this in the folder where `layerwatch-server serve` runs "
        "(it keeps layerwatch-data/ there), or name the database: --db sqlite:////full/path/to/layerwatch.db "
        "or LAYERWATCH_DB_URL (postgresql+psycopg://... for PostgreSQL)"
    )


@click.group()
def main() -> None:
    """layerwatch collector: receives training statistics from layerwatch clients."""


@main.command()
@click.option("--host", default=None, help="Address to listen on [default 127.0.0.1].")
@click.option("--port", type=int, default=None, help="Port [default 8765].")
@_db
@_config
@click.option("--no-auth", is_flag=True, default=None, help="Disable tokens (local single-user use).")
@click.option("--force-no-auth", is_flag=True, default=None, help="Allow --no-auth on a non-loopback host.")
@click.option(
    "--mlflow-tracking-uri",
    default=None,
    help="Mirror runs to this MLflow; 'off' disables [env LAYERWATCH_MLFLOW_TRACKING_URI].",
)
def serve(**flags: Any) -> None:
    """Run the collector. Refuses a database whose schema is not at head.

    A brand-new embedded SQLite database (the default file, absent or empty) is migrated on the spot.
    """
    import uvicorn

    from layerwatch_server.app import create_app

    settings = _settings(**flags)
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    engine = make_engine(settings.db_url, timeout_s=settings.db_timeout_s, pool_size=settings.pool_size)
    try:
        if settings.is_default_db and migrations.is_empty(engine):
            log.info("new embedded database %s: creating the schema", settings.db_url)
            migrations.upgrade(settings.db_url)
        problem = migrations.schema_problem(engine, settings.db_url)
    except Exception as exc:
        raise click.ClickException(f"cannot open database {_shown(settings.db_url)}: {exc}") from None
    finally:
        engine.dispose()
    if problem:
        raise click.ClickException(problem)
    log.info(
        "layerwatch collector: database %s (schema at head), MLflow mirror %s, auth %s; listening on http://%s:%s",
        _shown(settings.db_url),
        _shown(settings.mlflow_uri) if settings.mlflow_uri else "off",
        "off" if settings.no_auth else "tokens (`layerwatch-server token create --project P --scope write|read`)",
        settings.host,
        settings.port,
    )
    app = create_app(settings)
    # What start-up imported and built lives as long as the process: freeze it out of the cyclic collector,
    # whose full passes otherwise walk all of it every few hundred batches (~60 ms each, ~1 ms a batch).
    # A batch's thousands of short-lived lists die by reference count; collecting the young generation
    # every 10,000 allocations instead of 700 stops walking them while they are still in use (measured
    # with gc.callbacks at 8 clients: 0.34 s -> 0.13 s of collection per ~600 batches).
    gc.freeze()
    gc.set_threshold(10_000, 10, 10)
    uvicorn.run(
        app,
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level.lower(),
        access_log=settings.access_log,
        timeout_graceful_shutdown=30,  # SIGTERM: stop accepting, let in-flight ingests commit
        limit_concurrency=max(256, settings.max_inflight * 8),  # hard cap on open connections
    )


@main.command()
@_db
@_config
def migrate(**flags: Any) -> None:
    """Bring the database to the current schema (Alembic upgrade head)."""
    settings = _settings(**flags)
    click.echo(f"migrating {_shown(settings.db_url)} to the current schema ...", err=True)
    try:
        migrations.upgrade(settings.db_url)
    except Exception as exc:
        raise click.ClickException(f"cannot migrate {_shown(settings.db_url)}: {exc}") from None
    click.echo(f"database at {sorted(migrations.head_revisions(settings.db_url))}", err=True)


@main.command("backfill-mlflow")
@click.argument("run_id")
@click.option("--mlflow-tracking-uri", default=None, help="Target MLflow [env LAYERWATCH_MLFLOW_TRACKING_URI].")
@_db
@_config
def backfill_mlflow(run_id: str, **flags: Any) -> None:
    """Re-mirror RUN_ID from the database into a new MLflow run (e.g. on a new MLflow server)."""
    from layerwatch_server.mirrors.mlflow_mirror import from_settings

    settings = _settings(**flags)
    _existing_database(settings)
    mirror = from_settings(settings)
    if mirror is None:
        raise click.ClickException("MLflow mirroring is off; pass --mlflow-tracking-uri")
    engine = make_engine(settings.db_url)
    try:
        last = mirror.backfill(engine, run_id)
    except LookupError as exc:
        raise click.ClickException(str(exc)) from None
    finally:
        engine.dispose()
    click.echo(f"run {run_id} mirrored to {settings.mlflow_uri} up to step {last}", err=True)


@main.command()
@click.option("--mlflow-tracking-uri", default=None, help="Target MLflow [env LAYERWATCH_MLFLOW_TRACKING_URI].")
@_db
@_config
def mirror(**flags: Any) -> None:
    """Run the MLflow mirror alone, in the foreground (a Deployment of its own; `serve` runs it as a child)."""
    from layerwatch_server.mirrors.process import job_from_settings, serve

    settings = _settings(**flags)
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    _existing_database(settings)
    job = job_from_settings(settings)
    if job is None:
        raise click.ClickException("MLflow mirroring is off; pass --mlflow-tracking-uri")
    serve(job)


@main.group()
def token() -> None:
    """Manage API tokens."""


@token.command("create")
@click.option("--project", required=True, help=f"Project name, or '{ALL_PROJECTS}' (admin only) for all.")
@click.option("--scope", type=click.Choice(SCOPES), required=True, help="write: ingest; read: queries; admin: both.")
@_db
@_config
def token_create(project: str, scope: str, **flags: Any) -> None:
    """Create a token and print it once (only its SHA-256 is stored).

    The token alone goes to stdout: ``export LAYERWATCH_TOKEN=$(layerwatch-server token create ...)``.
    """
    settings = _settings(**flags)
    _existing_database(settings)
    engine = make_engine(settings.db_url)
    try:
        problem = migrations.schema_problem(engine, settings.db_url)
        if problem:
            raise click.ClickException(problem)
        value = tokens.create_token(engine, project, scope)
    except ValueError as exc:
        raise click.ClickException(str(exc)) from None
    finally:
        engine.dispose()
    click.echo(f"{scope} token for project {project!r} (shown once, store it now):", err=True)
    click.echo(value)


@token.command("revoke")
@click.argument("value")
@_db
@_config
def token_revoke(value: str, **flags: Any) -> None:
    """Revoke a token (servers forget it within LAYERWATCH_TOKEN_CACHE_S seconds)."""
    settings = _settings(**flags)
    _existing_database(settings)
    engine = make_engine(settings.db_url)
    try:
        if not tokens.revoke_token(engine, value):
            raise click.ClickException("no such active token")
    finally:
        engine.dispose()
    click.echo("revoked", err=True)


if __name__ == "__main__":
    sys.exit(main())
