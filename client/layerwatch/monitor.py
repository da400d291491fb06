"""The monitor a training loop holds: ``step()`` after backward, ``close()`` at the end."""

from __future__ import annotations

import atexit
import logging
import os
import re
import socket
import sys
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from typing import Any

import torch
from torch import nn

from layerwatch import __version__
from layerwatch.alerts import Alert
from layerwatch.batching import BatchBuilder
from layerwatch.config import Config
from layerwatch.distributed import ParamStats, RankGradNorm, rank_and_world, run_key
from layerwatch.exporter import Exporter
from layerwatch.histograms import Histograms, RankSum, Snapshot, owned_gradients
from layerwatch.layers import let_compiled_code_see_hooks, select, unwrap
from layerwatch.ranks import RankReducer
from layerwatch.recorder import Recorder
from layerwatch.report import Report, StepMeta
from layerwatch.spool import Spool
from layerwatch.transport import HttpTransport
from layerwatch.tripwire import Trip, Tripwire

log = logging.getLogger("layerwatch")


class Monitor:
    """Hooks a model, reduces its statistics on the device each step, and reports every ``every`` steps.

    Nothing here waits for the device or the network: ``step()`` enqueues a few reductions and, once per
    report, one device-to-host copy; a background thread does the rest.
    """

    def __init__(
        self,
        model: nn.Module,
        config: Config,
        on_alert: Callable[[Alert], Any] | None = None,
        run_config: dict[str, Any] | None = None,
        types: Sequence[type[nn.Module]] | Mapping[type[nn.Module], str] | None = None,
        scaler: Any = None,
    ) -> None:
        self.config = config
        self.scaler = scaler  # a torch.amp.GradScaler: its overflows are skipped steps, its scale a statistic
        self.on_alert = on_alert
        self._closed = config.mode == "disabled"
        self._alerts: dict[str, Alert] = {}
        self._new_alerts: deque[Alert] = deque()
        self._alerts_lock = threading.Lock()
        self._local_open: dict[str, Alert] = {}  # rule -> the client's own alert its collector twin has not met
        self._absorbed: set[str] = set()  # collector alerts whose incident on_alert heard of locally
        self._next_step = 0
        self._recorded = 0  # steps recorded so far (step numbers may be the user's)
        self._window_pos = 0
        self._steps: list[StepMeta] = []
        self._step_tensors: list[torch.Tensor] = []
        self._dead: list[tuple[int, list[bool], torch.Tensor]] = []
        self._activity: list[torch.Tensor] = []  # the windows' packed unit activity, for the ranks to OR
        self._failed = False
        self.run_id: str | None = None  # the collector's id of this run, once it has answered
        if self._closed:
            return

        inner = unwrap(model)
        if let_compiled_code_see_hooks(model):
            log.info("layerwatch: torch.compile's caches reset: code compiled before watch() would not run its hooks")
        self.rank, self.world_size = rank_and_world()
        self.run_key = run_key(config.run_key)
        self.run_name = config.run_name or self.run_key
        self.recorder = Recorder(config.every, config.eps)
        watched = list(select(inner, types, config.include, config.exclude, config.sat_margin))
        self.recorder.attach(inner, watched)
        self._params = [(n, p) for n, p in inner.named_parameters() if p.requires_grad] if config.watch_params else []
        self._param_numel = [p.numel() for _, p in self._params]
        self._param_stats = ParamStats([p for _, p in self._params])
        self._histograms = Histograms.for_params([n for n, _ in self._params]) if config.histogram_every_steps else None
        self._snapshots: list[Snapshot] = []
        self._rank_sum = RankSum()
        self.recorder.histograms = self._histograms
        if self._histograms is not None and config.histogram_every_steps == 1:
            self._histograms.start()
        self.spool_dir = config.spool_dir / _safe(config.project) / _safe(self.run_key) / f"rank-{self.rank}"
        summary = {
            "model": type(inner).__name__,
            "parameters": sum(p.numel() for p in inner.parameters()),
            "trainable_parameters": sum(self._param_numel),
            "watched_modules": len(watched),
            "every": config.every,
            "window": config.window_steps,
            "eps": config.eps,
            "sat_margin": config.sat_margin,
            "per_rank": config.per_rank,
            "layerwatch": __version__,
            "torch": torch.__version__,
            "hparams": run_config or {},
        }
        header = {
            "run": {
                "key": self.run_key,
                "name": self.run_name,
                "project": config.project,
                "world_size": self.world_size,
                "config": summary,
            },
            "rank": self.rank,
            "host": socket.gethostname(),
            "pid": os.getpid(),
        }
        params = [
            {"index": i, "name": n, "shape": list(p.shape), "numel": p.numel()} for i, (n, p) in enumerate(self._params)
        ]
        online = config.mode == "online" and config.url is not None
        # The ranks' collectives, on the exporter thread (layerwatch.ranks): dead units OR-ed; unless per_rank, rank
        # 0 sends the job's rows, combined, with each rank's own gradient norm (a DDP comm hook measures it).
        self._ranks = RankReducer.for_job()
        self._combining = None if config.per_rank else self._ranks
        self._rank_grad = RankGradNorm(model) if self._combining is not None else None
        self._exporter = Exporter(
            BatchBuilder(header, params, on_uncounted_nonfinite=self._count_nonfinite, reducer=self._ranks),
            Spool(self.spool_dir, int(config.spool_max_mb * 1024 * 1024)),
            transport=HttpTransport(config.url, config.token, config.timeout) if online else None,
            max_queued_batches=config.max_queued_batches,
            max_backoff=config.max_backoff,
            on_response=self._on_response,
        )
        self._tripwire = Tripwire(config.loss_jump, cuda=_on_cuda(inner))
        me = weakref.ref(self)
        atexit.register(_close_at_exit, me)
        os.register_at_fork(after_in_child=lambda: _forget_in_child(me))
        where = config.url if config.mode == "online" else f"the spool at {self.spool_dir}"
        log.info("layerwatch: watching %d modules of %s, reporting to %s", len(watched), summary["model"], where)

    # -- the training loop's calls ----------------------------------------------------------------------
    def step(
        self,
        loss: torch.Tensor | float | None = None,
        lr: float | torch.Tensor | None = None,
        step: int | None = None,
        **scalars: torch.Tensor | float,
    ) -> None:
        """Record one optimisation step. Call after ``backward()`` and before ``zero_grad()``."""
        if self._closed:
            return
        self._dispatch_alerts()
        if self._failed:
            return
        values = _checked_scalars({"loss": loss, "lr": lr, **scalars})  # a caller's mistake is raised, not hidden
        try:
            self._record_step(values, step)
        except Exception:
            self._failed = True
            self.recorder.failed = True
            log.exception("layerwatch: monitoring disabled after an internal error; training continues")
        self._dispatch_alerts()  # the client's own alerts of this very step

    def _record_step(self, values: dict[str, torch.Tensor | float], step: int | None) -> None:
        number = self._next_step if step is None else int(step)
        self._next_step = number + 1
        meta = StepMeta(step=number, time=time.time(), calls=self.recorder.current)
        tensors: list[torch.Tensor] = []
        norms = None  # (params with a gradient,) gradient norms, for the tripwire
        if self._params:
            present = [(i, p) for i, (_, p) in enumerate(self._params) if p.grad is not None]
            if present:
                meta.params = [i for i, _ in present]
                # Gradient norms every step; the other parameter statistics once per `param_every` steps.
                meta.full_params = (self._recorded + 1) % self.config.param_every_steps == 0
                block = self._param_stats.record([p for _, p in present], meta.full_params)
                norms = block[: len(present)]  # the P_GRAD_NORM block comes first (squares while sharded)
                tensors.append(block)
        for name, value in values.items():
            if isinstance(value, torch.Tensor):
                tensors.append(value.detach().reshape(1).float())
                meta.tensor_scalars.append(name)
            else:
                meta.host_scalars[name] = value
        scale = self._loss_scale()
        if scale is not None:
            tensors.append(scale)
            meta.tensor_scalars.append("loss_scale")
        own = self._rank_grad.take() if self._rank_grad is not None else None
        if own is not None:
            tensors.append(own.reshape(1))
            meta.rank_grad = True
        self.recorder.end_step()
        self._tripwire.arm(number, self.recorder.step_sums(meta.calls), norms, values.get("loss"), scale)
        self._recorded += 1
        if self._histograms is not None:
            self._take_histograms(number)
        self._steps.append(meta)
        self._step_tensors.extend(tensors)
        self._window_pos += 1
        if self._window_pos >= self.config.window_steps:
            self._close_window()
        # A NaN or a loss jump seen by now (this step on CPU; on CUDA a step whose check has landed) sends the
        # steps so far at once instead of at the interval's end; the next interval starts after them. When ranks
        # combine their reports, those must come at the same steps on every rank: this rank sends a preview of its
        # own instead (no collective), and the interval goes on to its regular, combined report.
        tripped = self._raise_local(self._tripwire.poll())
        if len(self._steps) >= self.config.every or (tripped and self._combining is None):
            self._report()
        elif tripped:
            self._preview()

    def _loss_scale(self) -> torch.Tensor | None:
        """The GradScaler's current scale, copied on the device (the scaler updates its own in place), or None
        without an enabled scaler that has scaled a loss yet."""
        scaler = self.scaler
        current = getattr(scaler, "_scale", None)  # torch.amp.GradScaler's scale tensor, made at its first scale()
        if not isinstance(current, torch.Tensor) or not getattr(scaler, "_enabled", True):
            return None
        return current.detach().reshape(1).float().clone()

    def _close_window(self) -> None:
        self._window_pos = 0
        # Packed for the ranks to OR on the exporter thread; not the last partial window, which close() sends as is.
        dead, words, called = self.recorder.dead_fractions(pack=self._ranks is not None and not self._closed)
        if dead is not None and self._steps:
            self._dead.append((len(self._steps) - 1, called, dead))
            if words is not None:
                self._activity.append(words)

    def _report(self, end: str | None = None) -> None:
        """Pack the interval into one buffer, start its copy to the host, hand it to the exporter."""
        raw = self.recorder.take_raw()
        self._param_stats.combine(self._steps, self._step_tensors)  # sharded parameters: across ranks
        # The run's last report starts no collective: its dead-unit windows are this rank's own.
        activity = self._activity if end is None else []
        self._submit(
            raw,
            self._steps,
            self._step_tensors + activity,
            end=end,
            histograms=self._snapshots if self.rank == 0 else [],  # every rank holds the global counts
            combine=self._combining is not None and end is None,  # the last partial interval: per rank
            activity=[words.numel() for words in activity],
        )
        self._steps, self._step_tensors, self._dead, self._snapshots, self._activity = [], [], [], [], []

    def _preview(self) -> None:
        """This rank's steps of the interval so far, copied (its buffers and steps stay for the regular report), for
        the collector to raise the alert from now: per-rank rows marked ``preview``, which it judges but does not
        store (the combined report stores those steps). Sharded gradient norms wait for the per-step gathers every
        rank started already; nothing here starts a collective."""
        raw = self.recorder.take_raw(keep=True)
        steps = [replace(meta) for meta in self._steps]  # the combined report rewrites its steps' calls
        tensors = list(self._step_tensors)
        self._param_stats.combine(steps, tensors, keep=True)
        self._submit(raw, steps, tensors, preview=True)

    def _submit(
        self, raw: torch.Tensor | None, steps: list[StepMeta], tensors: list[torch.Tensor], **kind: Any
    ) -> None:
        """One report to the exporter: the raw sums, the dead-unit windows and the step tensors concatenated into
        a new buffer (the recorder's go on) whose copy to the host starts now; ``kind`` are the Report's flags."""
        parts = ([raw] if raw is not None else []) + [d for _, _, d in self._dead] + tensors
        flat, ready = None, None
        if parts:
            flat = torch.cat([p.to(parts[0].device, non_blocking=True) for p in parts])
            flat, ready = _to_host(flat)
        layers = self.recorder.layers
        self._exporter.submit(
            Report(
                steps=steps,
                layers=[layer.describe() for layer in layers],
                bounded=[layer.spec.sat is not None for layer in layers],
                dead_windows=[(pos, called) for pos, called, _ in self._dead],
                param_numel=self._param_numel,
                flat=flat,
                ready=ready,
                **kind,
            )
        )

    def _take_histograms(self, number: int) -> None:
        """After a histogram step: its counts (activations, then this rank's gradients), summed over the ranks;
        and whether the coming step is one. Steps are counted alike on every rank, so the sums pair up."""
        histograms = self._histograms
        assert histograms is not None
        if histograms.due:
            names = [layer.name for layer in self.recorder.layers]
            grads = owned_gradients(list(enumerate(p for _, p in self._params)))
            self._snapshots.append(histograms.take(number, names, grads, self._rank_sum))
        if (self._recorded + 1) % self.config.histogram_every_steps == 0:
            histograms.start()

    # -- alerts -------------------------------------------------------------------------------------------
    @property
    def alerts(self) -> list[Alert]:
        """The run's alerts, latest state of each: the collector's, and the client's own (local) until the collector's
        alert for the same incident replaces them."""
        with self._alerts_lock:
            return list(self._alerts.values())

    def _raise_local(self, trips: list[Trip]) -> bool:
        """The client's own alert for each incident the tripwire opened, for on_alert within this step()."""
        for trip in trips:
            non_finite = trip.kind == "non_finite"
            rule = "non_finite" if non_finite else "loss_spike"
            alert = Alert(
                id=f"local-{rule}-{trip.step}",
                rule=rule,
                state="firing",
                severity="critical" if non_finite else "warning",
                run_id=self.run_id,
                step=trip.step,
                value=trip.loss,
                threshold=None if non_finite or trip.typical is None else self.config.loss_jump * trip.typical,
                message=trip.message(self.config.loss_jump),
                source="local",
            )
            then = "as this rank's preview (the combined report follows)" if self._combining else "now"
            log.warning("layerwatch: %s; reporting the steps so far %s", alert.message, then)
            with self._alerts_lock:
                self._alerts[alert.id] = alert
                self._local_open[rule] = alert
                self._new_alerts.append(alert)
        return bool(trips)

    def _on_response(self, body: dict[str, Any]) -> None:  # sender thread
        if isinstance(body.get("run_id"), str):
            self.run_id = body["run_id"]
        for data in body.get("alerts") or []:
            if not isinstance(data, dict):
                continue
            alert = Alert.from_dict(data)
            with self._alerts_lock:
                if self._alerts.get(alert.id) != alert:
                    self._alerts[alert.id] = alert
                    if not self._heard_locally(alert):
                        self._new_alerts.append(alert)

    def _heard_locally(self, alert: Alert) -> bool:
        """Whether on_alert heard of this collector alert's incident from the client's own alert (under the lock).

        The first open (pending/firing) collector alert of a rule within one report interval of a local alert of
        that rule is the same incident: it replaces the local one in ``alerts``, and it and its later open states
        make no second on_alert call; its resolution (or a later re-opening) is passed on as usual."""
        if alert.id in self._absorbed:
            if alert.state in ("pending", "firing"):
                return True
            self._absorbed.discard(alert.id)
            return False
        local = self._local_open.get(alert.rule)
        if local is None or alert.state not in ("pending", "firing"):
            return False
        if alert.step is not None and local.step is not None and abs(alert.step - local.step) > self.config.every:
            return False
        del self._local_open[alert.rule]
        self._alerts.pop(local.id, None)
        self._absorbed.add(alert.id)
        return True

    def _count_nonfinite(self) -> None:  # exporter thread, once
        log.warning("layerwatch: a NaN/Inf appeared; counting non-finite values element by element from now on")
        self.recorder.count_nonfinite = True

    def _dispatch_alerts(self) -> None:
        """Callbacks run here, on the training thread, so they may checkpoint or raise to stop training."""
        while self._new_alerts:
            alert = self._new_alerts.popleft()
            if self.on_alert is not None:
                self.on_alert(alert)

    # -- lifecycle ---------------------------------------------------------------------------------------
    def close(self, status: str = "finished") -> None:
        """Flush the last partial interval, mark the run ended, remove every hook. Safe to call twice."""
        if self._closed:
            return
        self._closed = True
        try:
            if not self._failed and self._window_pos:
                # The last partial window per rank: a rank that stops early must not start a collective that
                # the others, still training, would not match (the last report carries no activity to OR).
                self._close_window()
            self._report(end=status)
        except Exception:
            log.exception("layerwatch: could not send the last report")
        finally:
            try:
                self.recorder.detach()
            except Exception:
                log.exception("layerwatch: could not remove every hook")
            self._exporter.close(self.config.flush_timeout)  # never raises
            if self._rank_grad is not None:
                self._rank_grad.closed = True  # the comm hook stays (DDP cannot remove one): all-reduce only
            if self._ranks is not None:
                self._ranks.release()
            self._dispatch_alerts_quietly()

    def _dispatch_alerts_quietly(self) -> None:
        try:
            self._dispatch_alerts()
        except Exception:
            log.exception("layerwatch: an on_alert callback raised during close()")

    def force_flush(self, timeout: float | None = None) -> bool:
        """Wait until every report so far is delivered (offline: spooled); False if that did not happen in time.

        Waits at most ``timeout`` seconds (default: ``flush_timeout``). Steps recorded since the last report
        are not a report yet; ``close()`` sends them.
        """
        if self.config.mode == "disabled":
            return True
        return self._exporter.force_flush(self.config.flush_timeout if timeout is None else timeout)

    @property
    def stats(self) -> dict[str, Any]:
        """Delivery counters (see docs/reference.md, "Delivery"): what was delivered, dropped, set aside, waits."""
        if self.config.mode == "disabled":
            return {}
        exporter = self._exporter
        return {
            **exporter.counters.snapshot(),  # delivered_batches, dropped_reports, dropped_batches, rejected_batches
            "held_batches": exporter.held_batches,
            "spooled_bytes": exporter.spool.pending_bytes,
            "corrupt_records": len(exporter.spool.corrupt),
            "last_error": exporter.last_error,
        }

    def __enter__(self) -> Monitor:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close("finished")
        else:
            self.close("killed" if issubclass(exc_type, KeyboardInterrupt) else "failed")


def _checked_scalars(values: dict[str, Any]) -> dict[str, torch.Tensor | float]:
    """The step's scalars without the Nones; a value that is not one number is refused, naming it."""
    checked: dict[str, torch.Tensor | float] = {}
    for name, value in values.items():
        if value is None:
            continue
        if isinstance(value, torch.Tensor):
            if value.numel() != 1:
                raise ValueError(f"step({name}=...) takes a scalar, got a tensor of shape {tuple(value.shape)}")
            checked[name] = value
        elif isinstance(value, int | float) and not isinstance(value, bool):
            checked[name] = float(value)
        else:
            raise TypeError(f"step({name}=...) takes a number or a 0-d tensor, got {type(value).__name__}")
    return checked


def _to_host(flat: torch.Tensor) -> tuple[torch.Tensor, Any]:
    if flat.device.type == "cuda":
        host = torch.empty(flat.shape, dtype=flat.dtype, pin_memory=True)
        host.copy_(flat, non_blocking=True)
        event = torch.cuda.Event()
        event.record()
        return host, event
    return (flat, None) if flat.device.type == "cpu" else (flat.cpu(), None)


def _on_cuda(model: nn.Module) -> bool:
    parameter = next(model.parameters(), None)
    return parameter is not None and parameter.is_cuda


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name)[:128] or "_"


def _close_at_exit(ref: weakref.ref) -> None:
    monitor = ref()
    if monitor is None or monitor._closed:
        return
    # An uncaught exception ending the script leaves sys.last_exc (3.12) / sys.last_type behind.
    last = getattr(sys, "last_exc", None) or getattr(sys, "last_value", None)
    if last is None:
        monitor.close("finished")
    else:
        monitor.close("killed" if isinstance(last, KeyboardInterrupt) else "failed")


def _forget_in_child(ref: weakref.ref) -> None:
    """A forked child (a DataLoader worker) has no exporter threads: it must not report or flush."""
    monitor = ref()
    if monitor is not None:
        monitor._closed = True
        if hasattr(monitor, "recorder"):
            monitor.recorder.failed = True
