"""layerwatch: per-layer training health for PyTorch, computed on the device, reported in the background.

    mon = layerwatch.watch(model, run_name="resnet-lr0.4", project="vision", url="http://collector:8765")
    ...
    loss.backward()
    mon.step(loss=loss, lr=opt.param_groups[0]["lr"])

Imports are lazy so that ``layerwatch.wire`` (the collector's only import from here) does not load torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

__all__ = ["Alert", "Config", "Monitor", "__version__", "register_type", "watch"]

if TYPE_CHECKING:
    from collections.abc import Callable, Mapping, Sequence

    from torch import nn

    from layerwatch.alerts import Alert
    from layerwatch.config import Config
    from layerwatch.monitor import Monitor


def watch(
    model: nn.Module,
    run_name: str | None = None,
    project: str | None = None,
    url: str | None = None,
    token: str | None = None,
    *,
    mode: str | None = None,
    every: int | None = None,
    window: int | None = None,
    param_every: int | None = None,
    eps: float | None = None,
    sat_margin: float | None = None,
    include: Sequence[str] | None = None,
    exclude: Sequence[str] | None = None,
    types: Sequence[type[nn.Module]] | Mapping[type[nn.Module], str] | None = None,
    watch_params: bool | None = None,
    run_key: str | None = None,
    spool_dir: str | None = None,
    config: dict[str, Any] | None = None,
    rules: dict[str, Any] | None = None,
    on_alert: Callable[[Alert], Any] | None = None,
    scaler: Any = None,
    **settings: Any,
) -> Monitor:
    """Start monitoring ``model``. Every setting falls back to its ``LAYERWATCH_*`` variable, then a default.

    ``types`` replaces the watched module types: a list of classes, or ``{class: kind}`` (kinds as in
    :func:`register_type`). ``config`` holds hyper-parameters shown with the run; ``rules`` holds per-run
    alert-rule overrides (e.g. ``{"dead_units": {"threshold": 0.3}}``); ``on_alert`` is called on the training
    thread, inside ``step()``, for each new or changed alert the collector returns. ``scaler``: the run's
    ``torch.amp.GradScaler`` (fp16 mixed precision): its overflow steps are reported as skipped (``overflow``,
    ``loss_scale`` per step), not as NaN/Inf, unless the scale collapses below 1.
    """
    from layerwatch.config import Config
    from layerwatch.monitor import Monitor

    resolved = Config.resolve(
        url=url,
        token=token,
        project=project,
        run_name=run_name,
        run_key=run_key,
        mode=mode,
        every=every,
        window=window,
        param_every=param_every,
        eps=eps,
        sat_margin=sat_margin,
        include=list(include) if include is not None else None,
        exclude=list(exclude) if exclude is not None else None,
        watch_params=watch_params,
        spool_dir=spool_dir,
        **settings,
    )
    run_config = dict(config or {})
    if rules:
        run_config["rules"] = rules
    return Monitor(model, resolved, on_alert=on_alert, run_config=run_config, types=types, scaler=scaler)


def register_type(
    cls: type[nn.Module], kind: str = "other", *, bounds: tuple[float, float] | None = None, nonneg: bool = False
) -> None:
    """Watch modules of type ``cls`` by default, as ``kind`` (relu, other/gelu/silu, bounded/tanh/sigmoid with
    ``bounds``, linear, conv): ``layerwatch.register_type(MyAct, kind="gelu")``. Call before ``watch()``."""
    from layerwatch.layers import register_type as register

    register(cls, kind, bounds=bounds, nonneg=nonneg)


def __getattr__(name: str) -> Any:
    if name == "Monitor":
        from layerwatch.monitor import Monitor

        return Monitor
    if name == "Config":
        from layerwatch.config import Config

        return Config
    if name == "Alert":
        from layerwatch.alerts import Alert

        return Alert
    raise AttributeError(f"module 'layerwatch' has no attribute {name!r}")
