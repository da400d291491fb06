"""Alembic from code: upgrade to head, and tell whether a database is at head."""

from __future__ import annotations

import os
from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Engine, inspect

# alembic/ lives at the repository root (next to alembic.ini); a wheel carries it as layerwatch_server/migrations
# (see pyproject.toml). LAYERWATCH_ALEMBIC_DIR overrides both.
_PACKAGED = Path(__file__).resolve().parents[1] / "migrations"
_CHECKOUT = Path(__file__).resolve().parents[3] / "alembic"


def alembic_dir() -> Path:
    if os.environ.get("LAYERWATCH_ALEMBIC_DIR"):
        return Path(os.environ["LAYERWATCH_ALEMBIC_DIR"])
    return _PACKAGED if (_PACKAGED / "env.py").is_file() else _CHECKOUT


def alembic_config(db_url: str) -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(alembic_dir()))
    cfg.set_main_option("sqlalchemy.url", db_url.replace("%", "%%"))
    cfg.attributes["configure_logger"] = False
    return cfg


def upgrade(db_url: str, revision: str = "head") -> None:
    command.upgrade(alembic_config(db_url), revision)


def head_revisions(db_url: str) -> set[str]:
    return set(ScriptDirectory.from_config(alembic_config(db_url)).get_heads())


def current_revisions(engine: Engine) -> set[str]:
    with engine.connect() as conn:
        return set(MigrationContext.configure(conn).get_current_heads())


def is_empty(engine: Engine) -> bool:
    """True for a database with no tables at all (a brand-new embedded file)."""
    return not inspect(engine).get_table_names()


def schema_problem(engine: Engine, db_url: str) -> str | None:
    """None when the schema is at head; otherwise what is wrong and how to fix it."""
    current, heads = current_revisions(engine), head_revisions(db_url)
    if current == heads:
        return None
    return (
        f"database schema is at {sorted(current) or 'nothing'}, this server needs {sorted(heads)}; "
        f"run `layerwatch-server migrate --db <URL>` (or `alembic upgrade head`) first"
    )
