"""Alembic environment for the collector schema (``layerwatch_server.storage.models``)."""

from __future__ import annotations

from logging.config import fileConfig

from alembic import context
from sqlalchemy import Connection, Engine, text

from layerwatch_server.core.config import load_settings
from layerwatch_server.storage import partitions
from layerwatch_server.storage.engine import make_engine, writer
from layerwatch_server.storage.models import Base

config = context.config
if config.config_file_name is not None and config.attributes.get("configure_logger", True):
    fileConfig(config.config_file_name, disable_existing_loggers=False)

target_metadata = Base.metadata


def database_url() -> str:
    url = config.get_main_option("sqlalchemy.url") or context.get_x_argument(as_dictionary=True).get("db")
    return url or load_settings().db_url  # LAYERWATCH_DB_URL, then the default SQLite file


def run_with(connection: Connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=target_metadata,
        render_as_batch=connection.dialect.name == "sqlite",  # SQLite cannot ALTER most things
        compare_type=True,
        include_name=partitions.include_name,  # made at run time, not by revisions
    )
    with context.begin_transaction():
        if connection.dialect.name == "postgresql":
            # Replicas that all run `migrate` on start-up take turns; the later ones find nothing to do.
            connection.execute(text("SELECT pg_advisory_xact_lock(7262)"))
        context.run_migrations()


def run_migrations_online() -> None:
    connection = config.attributes.get("connection")
    if connection is not None:  # handed over by a caller (tests, compare_metadata)
        run_with(connection)
        return
    engine: Engine = make_engine(database_url())
    try:
        with writer(engine).connect() as conn:  # reads the version, then writes: hold SQLite's lock throughout
            run_with(conn)
    finally:
        engine.dispose()


if context.is_offline_mode():
    context.configure(url=database_url(), target_metadata=target_metadata, literal_binds=True)
    with context.begin_transaction():
        context.run_migrations()
else:
    run_migrations_online()
