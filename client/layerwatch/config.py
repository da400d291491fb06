"""The client's configuration: argument > environment variable > default.

Every setting has a ``LAYERWATCH_*`` variable so a cluster job is instrumented without touching its
launcher. A malformed variable is logged and its default used: a monitor must never stop a job.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger("layerwatch")

MODES = ("online", "offline", "disabled")


def _env_str(name: str) -> str | None:
    value = os.environ.get(name)
    return value if value not in (None, "") else None


def _env_parse(name: str, parse: Callable[[str], Any], default: Any, check: Callable[[Any], bool]) -> Any:
    raw = _env_str(name)
    if raw is None:
        return default
    try:
        value = parse(raw)
        if check(value):
            return value
    except ValueError:
        pass
    log.warning("layerwatch: ignoring %s=%r (invalid); using %r", name, raw, default)
    return default


def _env_list(name: str) -> list[str]:
    raw = _env_str(name)
    return [part.strip() for part in raw.split(",") if part.strip()] if raw else []


def _default_spool_dir() -> Path:
    cache = _env_str("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(cache) / "layerwatch" / "spool"


HISTOGRAM_STEPS = 100  # default spacing of per-layer histograms, rounded up to a multiple of every


@dataclass
class Config:
    """Resolved settings of one monitor. Build it with :meth:`resolve`."""

    url: str | None = None  # LAYERWATCH_URL
    token: str | None = None  # LAYERWATCH_TOKEN
    project: str = "default"  # LAYERWATCH_PROJECT
    run_name: str | None = None  # LAYERWATCH_RUN_NAME (default: the run key)
    run_key: str | None = None  # LAYERWATCH_RUN_KEY (default: from the job's environment)
    mode: str = "online"  # LAYERWATCH_MODE: online | offline | disabled
    every: int = 10  # LAYERWATCH_EVERY: steps per report (one device-to-host copy each)
    window: int | None = None  # LAYERWATCH_WINDOW: steps per dead-unit window (default: every)
    param_every: int | None = None  # LAYERWATCH_PARAM_EVERY: steps between full parameter stats (default: every)
    # LAYERWATCH_HISTOGRAM_EVERY: steps between per-layer histograms, taken at a report's last step (default: the
    # first multiple of every from 100 steps on: one per 10 reports at every=10); 0: off
    histogram_every: int | None = None
    eps: float = 0.0  # LAYERWATCH_EPS: |a| <= eps counts as zero / inactive
    sat_margin: float = 0.01  # LAYERWATCH_SAT_MARGIN: share of the half-range that counts as saturated
    include: list[str] = field(default_factory=list)  # LAYERWATCH_INCLUDE: comma-separated globs
    exclude: list[str] = field(default_factory=list)  # LAYERWATCH_EXCLUDE
    watch_params: bool = True  # LAYERWATCH_WATCH_PARAMS
    spool_dir: Path = field(default_factory=_default_spool_dir)  # LAYERWATCH_SPOOL_DIR
    spool_max_mb: float = 1024.0  # LAYERWATCH_SPOOL_MAX_MB
    max_queued_batches: int = 64  # LAYERWATCH_MAX_QUEUED_BATCHES: in memory before spilling to disk
    timeout: float = 10.0  # LAYERWATCH_TIMEOUT: seconds per HTTP request
    flush_timeout: float = 10.0  # LAYERWATCH_FLUSH_TIMEOUT: close() waits this long, then spools
    max_backoff: float = 30.0  # LAYERWATCH_MAX_BACKOFF: longest wait between retries, seconds
    loss_jump: float = 100.0  # LAYERWATCH_LOSS_JUMP: |loss| > this x its recent mean reports at once; 0: off
    # LAYERWATCH_PER_RANK: every rank sends its own rows; off (default): under torch.distributed rank 0 sends the
    # rows combined across ranks (layerwatch.ranks)
    per_rank: bool = False

    @property
    def window_steps(self) -> int:
        return self.window or self.every

    @property
    def param_every_steps(self) -> int:
        return self.param_every or self.every

    @property
    def histogram_every_steps(self) -> int:
        """0 when histograms are off. The default keeps their cost near 0.2% of a step on CPU (one per 10 steps
        measured 1.5-3% there; see docs/reference.md)."""
        if self.histogram_every is not None:
            return self.histogram_every
        return self.every * -(-HISTOGRAM_STEPS // self.every)

    @classmethod
    def resolve(cls, **given: Any) -> Config:
        """Arguments that are not None win; the rest come from the environment, then the defaults."""
        d = cls()
        env = {
            "url": _env_str("LAYERWATCH_URL"),
            "token": _env_str("LAYERWATCH_TOKEN"),
            "project": _env_str("LAYERWATCH_PROJECT") or d.project,
            "run_name": _env_str("LAYERWATCH_RUN_NAME"),
            "run_key": _env_str("LAYERWATCH_RUN_KEY"),
            "mode": _env_parse("LAYERWATCH_MODE", str.lower, None, MODES.__contains__),
            "every": _env_parse("LAYERWATCH_EVERY", int, d.every, lambda v: v >= 1),
            "window": _env_parse("LAYERWATCH_WINDOW", int, None, lambda v: v >= 1),
            "param_every": _env_parse("LAYERWATCH_PARAM_EVERY", int, None, lambda v: v >= 1),
            "histogram_every": _env_parse("LAYERWATCH_HISTOGRAM_EVERY", int, None, lambda v: v >= 0),
            "eps": _env_parse("LAYERWATCH_EPS", float, d.eps, lambda v: v >= 0),
            "sat_margin": _env_parse("LAYERWATCH_SAT_MARGIN", float, d.sat_margin, lambda v: 0 <= v < 1),
            "include": _env_list("LAYERWATCH_INCLUDE"),
            "exclude": _env_list("LAYERWATCH_EXCLUDE"),
            "watch_params": _env_parse("LAYERWATCH_WATCH_PARAMS", _parse_bool, d.watch_params, lambda v: True),
            "spool_dir": Path(_env_str("LAYERWATCH_SPOOL_DIR") or d.spool_dir),
            "spool_max_mb": _env_parse("LAYERWATCH_SPOOL_MAX_MB", float, d.spool_max_mb, lambda v: v > 0),
            "max_queued_batches": _env_parse(
                "LAYERWATCH_MAX_QUEUED_BATCHES", int, d.max_queued_batches, lambda v: v >= 1
            ),
            "timeout": _env_parse("LAYERWATCH_TIMEOUT", float, d.timeout, lambda v: v > 0),
            "flush_timeout": _env_parse("LAYERWATCH_FLUSH_TIMEOUT", float, d.flush_timeout, lambda v: v >= 0),
            "max_backoff": _env_parse("LAYERWATCH_MAX_BACKOFF", float, d.max_backoff, lambda v: v > 0),
            "loss_jump": _env_parse("LAYERWATCH_LOSS_JUMP", float, d.loss_jump, lambda v: v == 0 or v > 1),
            "per_rank": _env_parse("LAYERWATCH_PER_RANK", _parse_bool, d.per_rank, lambda v: True),
        }
        values = {k: (given[k] if given.get(k) is not None else v) for k, v in env.items()}
        unknown = set(given) - set(env)
        if unknown:
            raise TypeError(f"unknown layerwatch setting(s): {', '.join(sorted(unknown))}")
        values["spool_dir"] = Path(values["spool_dir"])
        if values["mode"] is None:
            values["mode"] = "online" if values["url"] else "offline"
        config = cls(**values)
        config.validate()
        return config

    def validate(self) -> None:
        """Refuse settings that cannot work, saying what to change (arguments are the user's code)."""
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        if self.mode == "online" and not self.url:
            raise ValueError("mode='online' needs a collector url (url= or LAYERWATCH_URL)")
        if self.every < 1:
            raise ValueError(f"every must be >= 1, got {self.every}")
        for name in ("window", "param_every"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        if self.histogram_every is not None and self.histogram_every < 0:
            raise ValueError(f"histogram_every must be >= 0 (0: off), got {self.histogram_every}")
        if self.eps < 0:
            raise ValueError(f"eps must be >= 0, got {self.eps}")
        if not (self.loss_jump == 0 or self.loss_jump > 1):
            raise ValueError(f"loss_jump must be 0 (off) or a factor above 1, got {self.loss_jump}")
        if not 0 <= self.sat_margin < 1:
            raise ValueError(f"sat_margin must be in [0, 1), got {self.sat_margin}")
        if self.url and not self.url.startswith(("http://", "https://")):
            raise ValueError(f"url must start with http:// or https://, got {self.url!r}")
        if isinstance(self.include, str) or isinstance(self.exclude, str):
            raise ValueError("include/exclude take a list of glob patterns, not a string")


def _parse_bool(raw: str) -> bool:
    lowered = raw.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise ValueError(raw)
