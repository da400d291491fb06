"""Background delivery: reports become batches on one thread, batches reach the collector on another.

Nothing here runs on the training thread except :meth:`Exporter.submit`, which never blocks: a full
report queue drops the report and counts it. Batches wait in a bounded in-memory queue; past its bound,
or when the collector cannot be reached, they spill to the on-disk spool, which is sent first (oldest
first) once the collector answers again. A batch leaves the spool only after the collector acknowledged it.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any

from layerwatch import transport, wire
from layerwatch.report import Report, first_nonfinite, translate, uncounted_nonfinite
from layerwatch.spool import Spool

log = logging.getLogger("layerwatch")

_STOP = object()


class Exporter:
    def __init__(
        self,
        header: dict[str, Any],
        params: list[dict[str, Any]],
        spool: Spool,
        url: str | None,
        token: str | None,
        timeout: float,
        max_queued_batches: int,
        max_backoff: float,
        on_response: Callable[[dict[str, Any]], None],
        on_uncounted_nonfinite: Callable[[], None] | None = None,
    ) -> None:
        self.header = header  # run, rank, host, pid: the same in every batch
        self.params = params  # the parameter registry, in every batch
        self.param_names = [p["name"] for p in params]
        self.spool = spool
        self.url, self.token, self.timeout = url, token, timeout
        self.max_queued = max_queued_batches
        self.max_backoff = max_backoff
        self.on_response = on_response
        self.on_uncounted_nonfinite = on_uncounted_nonfinite  # a NaN/Inf seen in a sum, not yet counted
        self.dropped_reports = 0
        self.delivered = 0
        self.last_error = ""
        self._seq = 0
        self._origin_sent = False
        self._first_batch = True
        self._weight_norms: dict[int, float] = {}
        self._reports: queue.Queue = queue.Queue(maxsize=32)
        self._batches: deque[bytes] = deque()
        self._lock = threading.Condition()
        self._stopping = threading.Event()
        self._offline = url is None
        self._rejected_warned = False
        self._threads = [threading.Thread(target=self._convert_loop, name="layerwatch-exporter", daemon=True)]
        if not self._offline:
            self._threads.append(threading.Thread(target=self._send_loop, name="layerwatch-sender", daemon=True))
        for thread in self._threads:
            thread.start()

    # -- training thread --------------------------------------------------------------------------------
    def submit(self, report: Report) -> None:
        try:
            self._reports.put_nowait(report)
        except queue.Full:
            self.dropped_reports += 1

    # -- report -> batch --------------------------------------------------------------------------------
    def _convert_loop(self) -> None:
        while True:
            report = self._reports.get()
            if report is _STOP:
                return
            try:
                self._enqueue(wire.encode(self._batch(report)))
            except Exception:
                self.dropped_reports += 1
                log.exception("layerwatch: could not build a batch; the report is dropped and counted")

    def _batch(self, report: Report) -> dict[str, Any]:
        if report.ready is not None:
            report.ready.synchronize()  # waits here, on this thread, never on the training thread
        values = report.flat.tolist() if report.flat is not None else []
        steps = translate(report, values, self._weight_norms)
        if self.on_uncounted_nonfinite is not None and uncounted_nonfinite(steps):
            self.on_uncounted_nonfinite()
            self.on_uncounted_nonfinite = None  # once: counting stays on for the rest of the run
        batch = {"v": wire.VERSION, **self.header, "seq": self._seq}
        if not self._first_batch:
            batch["run"] = {k: v for k, v in batch["run"].items() if k != "config"}
        self._first_batch = False
        self._seq += 1
        origin = None
        if not self._origin_sent:
            names = [layer["name"] for layer in report.layers]
            origin = first_nonfinite(steps, names, self.param_names, self.header["rank"])
            self._origin_sent = origin is not None
        batch.update(
            layers=report.layers,
            params=self.params,
            layer_stats=list(wire.LAYER_STATS),
            param_stats=list(wire.PARAM_STATS),
            steps=steps,
            nonfinite_origin=origin,
            end={"status": report.end} if report.end else None,
            dropped={"reports": self.dropped_reports, "batches": self.spool.dropped},
        )
        return batch

    def _enqueue(self, payload: bytes) -> None:
        with self._lock:
            if self._offline:
                self._to_spool(payload)
                return
            self._batches.append(payload)
            if len(self._batches) > self.max_queued:
                # Keep memory bounded: everything queued moves to disk, oldest first, order preserved.
                while self._batches:
                    self._to_spool(self._batches.popleft())
            self._lock.notify_all()

    def _to_spool(self, payload: bytes) -> None:
        if not self.spool.append(payload):
            log.error("layerwatch: spool at %s is full; a batch was dropped (counted)", self.spool.directory)

    # -- batch -> collector -----------------------------------------------------------------------------
    def _next(self) -> tuple[bytes, Callable[[], None]] | None:
        head = self.spool.head()
        if head is not None:
            segment, offset, payload = head
            return payload, lambda: self.spool.ack(segment, offset)
        with self._lock:
            if self._batches:
                payload = self._batches[0]
                return payload, self._pop_memory
        return None

    def _pop_memory(self) -> None:
        with self._lock:
            self._batches.popleft()

    def _send_loop(self) -> None:
        attempt = 0
        while True:
            item = self._next()
            if item is None:
                if self._stopping.is_set():
                    return
                with self._lock:
                    if not self._batches and not self._stopping.is_set():
                        self._lock.wait(timeout=1.0)
                continue
            payload, done = item
            result = transport.post_batch(self.url, payload, self.token, self.timeout)
            if result.ok:
                done()
                attempt = 0
                self.delivered += 1
                if result.body:
                    self.on_response(result.body)
                continue
            self.last_error = result.error
            if result.retryable:
                if attempt == 0 or attempt % 10 == 0:
                    log.warning("layerwatch: %s; retrying (data is kept)", result.error)
                self._spill_memory()
                if self._stopping.is_set():
                    return  # close() spools what is left; retrying would outlive the process
                self._stopping.wait(transport.backoff(attempt, result.retry_after, cap=self.max_backoff))
                attempt += 1
                continue
            self._rejected(result, payload, done)
            if self._offline:
                return

    def _spill_memory(self) -> None:
        """While the collector is unreachable, batches wait on disk rather than in memory."""
        with self._lock:
            while self._batches:
                self._to_spool(self._batches.popleft())

    def _rejected(self, result: transport.Delivery, payload: bytes, done: Callable[[], None]) -> None:
        if result.status in (401, 403):
            # Credentials will not fix themselves: stop sending, keep everything on disk for `layerwatch sync`.
            log.error(
                "layerwatch: the collector refused the token (%s). Monitoring data is spooled to %s; "
                "fix LAYERWATCH_TOKEN and upload it with `layerwatch sync %s`.",
                result.error,
                self.spool.directory,
                self.spool.directory,
            )
            with self._lock:
                self._offline = True
                self._spill_memory()
            self._stopping.set()
            return
        # The collector says this batch is malformed: keep it aside for a bug report, count it, move on.
        rejected = Spool(self.spool.directory / "rejected", self.spool.max_bytes)
        rejected.append(payload)
        done()
        self.dropped_reports += 1
        log.error("layerwatch: the collector rejected a batch (%s); kept in %s", result.error, rejected.directory)

    # -- lifecycle --------------------------------------------------------------------------------------
    def close(self, timeout: float) -> None:
        """Deliver what is queued within ``timeout`` seconds; whatever is left waits in the spool."""
        deadline = time.monotonic() + timeout
        self._reports.put(_STOP)
        self._threads[0].join(timeout=max(deadline - time.monotonic(), 0.1))
        if not self._offline:
            while (
                time.monotonic() < deadline
                and (self._batches or self.spool.pending_bytes)
                and not (self._stopping.is_set())
            ):
                time.sleep(0.05)
            self._stopping.set()
            with self._lock:
                self._lock.notify_all()
            self._threads[1].join(timeout=max(deadline - time.monotonic(), 0.1) + self.timeout)
        self._spill_memory()
        if self.spool.pending_bytes:
            log.warning(
                "layerwatch: %d bytes of monitoring data wait in %s; upload them with `layerwatch sync %s --url URL`",
                self.spool.pending_bytes,
                self.spool.directory,
                self.spool.directory,
            )
