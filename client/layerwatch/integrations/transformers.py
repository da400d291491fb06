"""Hugging Face Transformers: ``Trainer(..., callbacks=[LayerwatchCallback(project="nlp")])``.

Hook mapping (one ``Monitor.step()`` per optimizer step, whatever ``gradient_accumulation_steps`` is):

- ``on_train_begin``: ``layerwatch.watch(model, **watch_kwargs)``; run name defaults to ``args.run_name``.
- ``on_pre_optimizer_step`` (transformers >= 4.45): ``mon.step(step=state.global_step, lr=..., loss=...)``. It runs
  after the last backward of the step (and after gradient clipping) and before ``optimizer.step()`` and
  ``zero_grad()``. Older versions have only ``on_optimizer_step`` (after the update, before ``zero_grad()``),
  which is used there instead.
- ``on_train_end``: ``mon.close("finished")``.

**The loss.** The Trainer keeps each step's loss on the device and only averages it into ``logs["loss"]`` (one
host sync) every ``logging_steps``. The callback never adds a sync of its own, so it reports that logged value:
the mean loss over the last logging interval, attached to the first step recorded after the log (one step
late); steps in between carry no loss. Use ``logging_steps=1`` for a loss on every step. The log at the last
step has no step after it: at ``on_train_end`` it goes out with a step of its own, numbered as the Trainer
numbers that log (``global_step``), carrying that loss only.

**The learning rate** is the first param group's lr as the optimizer is about to use it (the scheduler steps
after the optimizer).

**Failures.** ``TrainerCallback`` has no exception hook: when ``train()`` raises, the monitor's exit handler
closes the run as ``failed`` when the exception ends the script; code that catches it and goes on should call
``callback.close("failed")``.
"""

from __future__ import annotations

from typing import Any

from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from layerwatch.integrations._session import Session, first_lr

__all__ = ["LayerwatchCallback"]

_HAS_PRE_OPTIMIZER_STEP = hasattr(TrainerCallback, "on_pre_optimizer_step")
# Training arguments worth showing with the run (the full set is ~150 fields).
_ARGS_SHOWN = (
    "learning_rate",
    "lr_scheduler_type",
    "warmup_steps",
    "weight_decay",
    "max_grad_norm",
    "per_device_train_batch_size",
    "gradient_accumulation_steps",
    "num_train_epochs",
    "max_steps",
    "seed",
    "bf16",
    "fp16",
)


class LayerwatchCallback(TrainerCallback):
    """Monitors the model a ``transformers.Trainer`` trains; takes the keyword arguments of :func:`layerwatch.watch`."""

    def __init__(self, **watch_kwargs: Any) -> None:
        self._session = Session("transformers", watch_kwargs)
        self._logged_loss: float | None = None

    @property
    def monitor(self) -> Any:
        """The running :class:`layerwatch.Monitor` (None before training and after it ends)."""
        return self._session.monitor

    def close(self, status: str = "finished") -> None:
        """End the run now (e.g. ``"failed"`` after catching an exception from ``train()``); safe to repeat."""
        self._session.close(status)

    def on_train_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        self._logged_loss = None
        model = kwargs.get("model")
        if model is None:
            return
        hparams = {name: getattr(args, name, None) for name in _ARGS_SHOWN}
        config = {k: (v if isinstance(v, bool | int | float | str) else str(v)) for k, v in hparams.items()}
        scaler = getattr(kwargs.get("optimizer"), "scaler", None)  # accelerate's optimizer holds fp16's GradScaler
        self._session.start(model, getattr(args, "run_name", None) or None, config, scaler=scaler)

    def on_pre_optimizer_step(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        self._step(state, kwargs)

    def on_optimizer_step(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        if not _HAS_PRE_OPTIMIZER_STEP:
            self._step(state, kwargs)

    def _step(self, state: TrainerState, kwargs: dict[str, Any]) -> None:
        if self._session.monitor is None:
            return
        lr = first_lr(kwargs.get("optimizer"))
        if lr is None:
            lr = _scheduler_lr(kwargs.get("lr_scheduler"))
        loss, self._logged_loss = self._logged_loss, None
        self._session.step(state.global_step, loss=loss, lr=lr)

    def on_log(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        logs: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        loss = (logs or {}).get("loss")
        if isinstance(loss, int | float):  # training logs only: eval logs say "eval_loss"
            self._logged_loss = float(loss)

    def on_train_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        loss, self._logged_loss = self._logged_loss, None
        if loss is not None:  # logged at the last step: no step follows to carry it
            self._session.step(state.global_step, loss=loss)
        self._session.close("finished")


def _scheduler_lr(scheduler: Any) -> float | None:
    """The scheduler's current lr, for optimizers that hide their param groups (never raises)."""
    try:
        return scheduler.get_last_lr()[0] if scheduler is not None else None
    except Exception:
        return None
