"""Collector settings: one object, CLI flag > ``LAYERWATCH_*`` env var > config file > default.

Every option is documented once, here, as a field. A config file (YAML or TOML) uses the same names
without the prefix (``db_url: postgresql+psycopg://...``). Unsafe combinations are refused at start-up.
"""

from __future__ import annotations

import ipaddress
from pathlib import Path
from typing import Any

from pydantic import Field, model_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
    YamlConfigSettingsSource,
)

from layerwatch import wire

DEFAULT_DATA_DIR = Path("layerwatch-data")
DEFAULT_DB_URL = f"sqlite:///{DEFAULT_DATA_DIR / 'layerwatch.db'}"


class ConfigError(ValueError):
    """A setting that cannot work; the message says what to change."""


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="LAYERWATCH_", extra="forbid", validate_default=True)

    db_url: str = Field(DEFAULT_DB_URL, description="SQLAlchemy URL; SQLite file by default.")
    host: str = Field("127.0.0.1", description="Address to listen on.")
    port: int = Field(8765, ge=0, le=65535, description="Port to listen on (0: any free port).")
    no_auth: bool = Field(False, description="Disable tokens (single-user local setup only).")
    force_no_auth: bool = Field(False, description="Allow no_auth on a non-loopback host.")
    log_level: str = Field("info", description="Python/uvicorn log level.")
    access_log: bool = Field(False, description="Log every request (off: ingest is ~100 requests/s).")

    max_inflight: int = Field(32, ge=1, description="Concurrent ingest requests before answering 429.")
    retry_after_s: int = Field(1, ge=1, description="Retry-After sent with 429/503.")
    db_timeout_s: float = Field(10.0, gt=0, description="Wait for a DB lock/connection before 503.")
    pool_size: int = Field(8, ge=1, description="PostgreSQL connection pool size.")
    token_cache_s: float = Field(30.0, ge=0, description="How long a verified token is trusted in memory.")
    min_free_mb: float = Field(
        64.0, ge=0, description="SQLite: /readyz says not ready while the database's disk has less free space (MiB)."
    )

    scheduler: bool = Field(True, description="Run the in-process scheduler (retention, rule hooks).")
    retention_days: float = Field(30.0, gt=0, description="Raw per-step rows older than this are rolled up.")
    rollup_bucket_steps: int = Field(100, ge=2, description="Steps per rollup bucket.")
    retention_interval_s: float = Field(3600.0, gt=0, description="Seconds between retention ticks.")
    job_interval_s: float = Field(60.0, gt=0, description="Seconds between rule-hook ticks.")
    rules_file: Path | None = Field(None, description="Alerting YAML: rules, per-project overrides, channels, routes.")

    # MLflow mirror (layerwatch_server.mirrors); see docs/production.md
    mlflow_tracking_uri: str | None = Field(
        None,
        description="Where runs are mirrored: an MLflow tracking URI (http://mlflow:5000, sqlite:///...), or "
        "'off'. Default: sqlite mlflow.db next to a SQLite database (`mlflow ui --backend-store-uri` it); off "
        "with PostgreSQL.",
    )
    mlflow_interval_s: float = Field(2.0, gt=0, description="Seconds between mirror ticks.")
    mlflow_stride: int = Field(1, ge=1, description="Mirror steps that are multiples of this (sparse stats always).")
    mlflow_layer_stats: list[str] = Field(["dead_frac", "act_std"], description="Per-layer stats mirrored.")
    mlflow_param_stats: list[str] = Field(["grad_norm"], description="Per-parameter stats mirrored.")
    mlflow_max_keys: int = Field(1000, ge=0, description="Per-layer/parameter metric keys per MLflow run.")
    mlflow_max_metrics_s: float = Field(
        1000.0, gt=0, description="Metric values sent per second at most; a faster run is sent downsampled."
    )
    mlflow_image_interval_s: float = Field(
        300.0, ge=0, description="Least seconds between a run's pictures in MLflow (and at its end)."
    )

    # Prometheus /metrics (layerwatch_server.observability)
    metrics_layer_stats: list[str] = Field(["dead_frac"], description="Per-layer gauges.")
    metrics_param_stats: list[str] = Field([], description="Per-parameter gauges.")
    metrics_max_layers: int = Field(
        16, ge=0, description="Layers (and params) per run exposed, in model order (run-level gauges cover all)."
    )
    metrics_layer_regex: str = Field("", description="Only layers/params whose name matches (re.search).")
    metrics_stale_s: float = Field(900.0, gt=0, description="Drop a run's series when it sent nothing this long.")
    metrics_ended_s: float = Field(300.0, ge=0, description="Keep an ended run's series this long.")

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return (
            init_settings,
            env_settings,
            YamlConfigSettingsSource(settings_cls),
            TomlConfigSettingsSource(settings_cls),
        )

    @model_validator(mode="after")
    def _refuse_unsafe(self) -> Settings:
        if self.no_auth and not self.force_no_auth and not is_loopback(self.host):
            raise ConfigError(
                f"no_auth on non-loopback host {self.host!r} would expose every run to the network; "
                "bind to 127.0.0.1, create tokens (`layerwatch-server token create`), "
                "or pass --force-no-auth if you really mean it"
            )
        for name in ("mlflow_layer_stats", "metrics_layer_stats", "mlflow_param_stats", "metrics_param_stats"):
            known = wire.LAYER_STATS if "layer" in name else wire.PARAM_STATS
            unknown = [s for s in getattr(self, name) if s not in known]
            if unknown:
                raise ConfigError(f"{name}: unknown statistic(s) {unknown}; known: {list(known)}")
        return self

    @property
    def mlflow_uri(self) -> str | None:
        """The MLflow tracking URI to mirror to, or None when mirroring is off."""
        uri = self.mlflow_tracking_uri
        if uri is not None:
            return None if uri.strip().lower() in ("", "off", "none", "false", "0") else uri
        if not self.is_sqlite or ":memory:" in self.db_url:
            return None
        db_file = Path(self.db_url.split("///", 1)[1])
        return f"sqlite:///{db_file.parent / 'mlflow.db'}"

    @property
    def is_sqlite(self) -> bool:
        return self.db_url.startswith("sqlite")

    @property
    def is_default_db(self) -> bool:
        return self.db_url == DEFAULT_DB_URL


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def load_settings(config_file: str | Path | None = None, **overrides: Any) -> Settings:
    """Settings from ``overrides`` (CLI flags; None means "not given"), env, then ``config_file``."""
    given = {k: v for k, v in overrides.items() if v is not None}
    if config_file is None:
        return Settings(**given)
    path = Path(config_file)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    key = "toml_file" if path.suffix.lower() == ".toml" else "yaml_file"
    file_settings = type("FileSettings", (Settings,), {"model_config": {**Settings.model_config, key: path}})
    return file_settings(**given)
