"""What the framework callbacks share: one monitor's lifecycle, with every failure kept away from training.

A callback runs inside someone else's training loop, so nothing here may raise into it, with one exception:
the user's own ``on_alert`` callback, which is allowed to stop training on purpose (that is its point).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from typing import Any

log = logging.getLogger("layerwatch")


class Session:
    """Starts, steps and closes one :class:`layerwatch.Monitor` on behalf of a framework callback."""

    def __init__(self, framework: str, watch_kwargs: dict[str, Any]) -> None:
        self.framework = framework
        self.watch_kwargs = dict(watch_kwargs)
        self.monitor: Any = None  # layerwatch.Monitor once started
        self.last_step: int | None = None
        self._user_on_alert: Callable[[Any], Any] | None = self.watch_kwargs.pop("on_alert", None)
        self._alert_error: BaseException | None = None

    def start(
        self,
        model: Any,
        default_run_name: str | None = None,
        default_config: dict[str, Any] | None = None,
        scaler: Any = None,
    ) -> None:
        """Watch ``model``. The framework's run name, hyper-parameters and fp16 GradScaler (its overflows are skipped
        steps, not NaN incidents) fill in only what the user left unset."""
        if self.monitor is not None:
            self.close("finished")  # a second fit()/train() with the same callback is a new run
        self.last_step = None
        try:
            import layerwatch

            kwargs = dict(self.watch_kwargs)
            if kwargs.get("run_name") is None and not os.environ.get("LAYERWATCH_RUN_NAME") and default_run_name:
                kwargs["run_name"] = default_run_name
            if kwargs.get("config") is None and default_config:
                kwargs["config"] = default_config
            if kwargs.get("scaler") is None and scaler is not None:
                kwargs["scaler"] = scaler
            if self._user_on_alert is not None:
                kwargs["on_alert"] = self._on_alert
            self.monitor = layerwatch.watch(model, **kwargs)
        except Exception:
            self.monitor = None
            log.exception("layerwatch: could not start monitoring (%s); training continues unmonitored", self.framework)

    def step(self, step: int, loss: Any = None, lr: Any = None, **scalars: Any) -> None:
        """One optimizer step; a repeated step number (several optimizers in one step) is recorded once."""
        if self.monitor is None or step == self.last_step:
            return
        self.last_step = step
        self.guard(lambda: self.monitor.step(loss=loss, lr=lr, step=step, **scalars))

    def close(self, status: str = "finished") -> None:
        monitor, self.monitor = self.monitor, None
        if monitor is not None:
            self.guard(lambda: monitor.close(status))

    def guard(self, call: Callable[[], Any]) -> None:
        """Run ``call``; log what it raises, except what the user's on_alert raised, which goes through."""
        self._alert_error = None
        try:
            call()
        except Exception as exc:
            if exc is self._alert_error:
                raise
            log.exception("layerwatch: error in the %s integration; training continues", self.framework)
        finally:
            self._alert_error = None

    def _on_alert(self, alert: Any) -> Any:
        assert self._user_on_alert is not None
        try:
            return self._user_on_alert(alert)
        except BaseException as exc:
            self._alert_error = exc
            raise


def exit_status(exception: BaseException) -> str:
    """The run's end status for an exception that stopped training."""
    return "killed" if isinstance(exception, KeyboardInterrupt) else "failed"


def first_lr(optimizer: Any) -> Any:
    """The first parameter group's learning rate (a float, or a 0-d tensor passed on without a host sync)."""
    groups = getattr(optimizer, "param_groups", None)
    if groups:
        return groups[0].get("lr")
    return None
