"""PyTorch Lightning: ``Trainer(callbacks=[LayerwatchCallback(project="vision")])``.

Hook mapping (one ``Monitor.step()`` per optimizer step, whatever ``accumulate_grad_batches`` is):

- ``on_fit_start``: ``layerwatch.watch(pl_module, **watch_kwargs)``; the run name defaults to the logger's name.
- ``on_before_backward``: adds the loss being backpropagated (a device tensor, never ``.item()``-ed). Lightning
  has already divided it by ``accumulate_grad_batches``, so the sum over the micro-batches of one optimizer step
  is that step's loss; a GradScaler's scale is divided back out.
- ``on_before_optimizer_step``: ``mon.step(loss=..., lr=first param group's lr, step=trainer.global_step)``. It
  runs after the last backward of the step and before ``optimizer.step()`` and ``zero_grad()``, so the gradients
  seen are the accumulated ones the optimizer is about to apply.
- ``on_fit_end``: ``mon.close("finished")``; ``on_exception``: ``mon.close("failed")`` (``"killed"`` for Ctrl-C).

Every rank runs the callback and reports as its own rank of one run (the client derives the shared run key).
Importing this module imports Lightning (``lightning.pytorch``, else ``pytorch_lightning``); ``import
layerwatch`` never does.
"""

from __future__ import annotations

from typing import Any

try:
    import lightning.pytorch as pl
except ImportError:  # only the standalone package installed
    import pytorch_lightning as pl  # type: ignore[no-redef]

from layerwatch.integrations._session import Session, exit_status, first_lr

__all__ = ["LayerwatchCallback"]

_HPARAM_TYPES = (bool, int, float, str, type(None))


class LayerwatchCallback(pl.Callback):
    """Monitors the LightningModule being fitted; takes the keyword arguments of :func:`layerwatch.watch`."""

    def __init__(self, **watch_kwargs: Any) -> None:
        super().__init__()
        self._session = Session("lightning", watch_kwargs)
        self._loss: Any = None  # device tensor: the losses backpropagated since the last optimizer step

    @property
    def monitor(self) -> Any:
        """The running :class:`layerwatch.Monitor` (None before fit and after it ends)."""
        return self._session.monitor

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._loss = None
        scaler = getattr(getattr(trainer, "precision_plugin", None), "scaler", None)  # 16-mixed: a GradScaler
        self._session.start(
            pl_module, _logger_name(trainer), _hparams(pl_module, self._session.watch_kwargs), scaler=scaler
        )

    def on_before_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: Any) -> None:
        if self._session.monitor is not None:
            self._session.guard(lambda: self._add_loss(trainer, loss))

    def _add_loss(self, trainer: pl.Trainer, loss: Any) -> None:
        loss = loss.detach()
        scaler = getattr(getattr(trainer, "precision_plugin", None), "scaler", None)
        if scaler is not None:  # 16-bit AMP hands callbacks the scaled loss
            scale = getattr(scaler, "_scale", None)
            loss = loss / scale.to(loss.device) if scale is not None else None
        if loss is None or self._loss is None:
            self._loss = loss
        else:
            self._loss = self._loss + loss

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any) -> None:
        if self._session.monitor is None:
            return
        loss, self._loss = self._loss, None
        optimizers = trainer.optimizers
        lr = first_lr(optimizers[0] if optimizers else optimizer)
        self._session.step(trainer.global_step, loss=loss, lr=lr)

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._session.close("finished")

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._session.close(exit_status(exception))

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        # Safety net: fit always tears down; by then on_fit_end or on_exception has closed the run.
        if stage == "fit":
            self._session.close("finished")


def _logger_name(trainer: pl.Trainer) -> str | None:
    try:
        logger = trainer.logger
        name = getattr(logger, "name", None) if logger is not None else None
        return str(name) if name else None
    except Exception:  # a logger that must contact a server to know its name is not worth failing for
        return None


def _hparams(pl_module: pl.LightningModule, watch_kwargs: dict[str, Any]) -> dict[str, Any] | None:
    """The module's simple hyper-parameters as the run's config, unless the user passed ``config=``."""
    if watch_kwargs.get("config") is not None:
        return None
    try:
        return {str(k): v for k, v in dict(pl_module.hparams).items() if isinstance(v, _HPARAM_TYPES)} or None
    except Exception:
        return None
