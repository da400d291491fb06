"""Background export: reports become batches on one thread, batches reach the collector on another.

Split the way OpenTelemetry's SDK splits a batch processor from its exporter: :class:`BatchBuilder`
(``batching.py``) makes a wire batch of a report, a :class:`~layerwatch.transport.Transport` carries it,
:mod:`layerwatch.delivery` says what an answer means, and this module only moves batches between memory,
the spool and the transport.

Nothing here runs on the training thread except :meth:`Exporter.submit`, which never blocks: a full report
queue drops the report and counts it. Batches wait in memory (at most ``max_queued_batches``); past that
bound, while the collector cannot be reached, or in offline mode, they move to the on-disk spool, which is
sent first (oldest first). A batch leaves the spool only once the collector acknowledged it. When the spool
cannot be written (read-only, full, no permission), batches stay in memory up to the bound, then the oldest
are dropped and counted, with one warning; spooling resumes as soon as a write succeeds. Nothing here
raises into the caller, from any thread.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any

from layerwatch import delivery
from layerwatch.batching import BatchBuilder, Packed
from layerwatch.delivery import Outcome
from layerwatch.report import Report
from layerwatch.spool import Spool
from layerwatch.transport import Delivery, Transport

log = logging.getLogger("layerwatch")

_STOP = object()


class Counters:
    """What happened to the run's data, counted from three threads. A report dropped before it became a
    batch, a batch dropped for lack of room, and a batch the collector refused are counted apart."""

    NAMES = ("delivered_batches", "dropped_reports", "dropped_batches", "rejected_batches")

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._values = dict.fromkeys(self.NAMES, 0)

    def add(self, name: str, n: int = 1) -> None:
        with self._lock:
            self._values[name] += n

    def __getitem__(self, name: str) -> int:
        with self._lock:
            return self._values[name]

    def snapshot(self) -> dict[str, int]:
        with self._lock:
            return dict(self._values)

    def wire(self) -> dict[str, int]:
        """The batch's ``dropped`` field (the collector ignores keys it does not store)."""
        with self._lock:
            v = self._values
            return {"reports": v["dropped_reports"], "batches": v["dropped_batches"], "rejected": v["rejected_batches"]}


class Exporter:
    def __init__(
        self,
        builder: BatchBuilder,
        spool: Spool,
        transport: Transport | None,
        max_queued_batches: int,
        max_backoff: float,
        on_response: Callable[[dict[str, Any]], None],
    ) -> None:
        self.builder = builder
        self.spool = spool
        self.transport = transport  # None: offline, everything goes to the spool
        self.max_queued = max_queued_batches
        self.max_backoff = max_backoff
        self.on_response = on_response
        self.counters = Counters()
        self.last_error = ""
        self._reports: queue.Queue = queue.Queue(maxsize=32)
        self._memory: deque[Packed] = deque()  # batches not yet spooled or sent, oldest first
        self._inflight: Packed | None = None  # a memory batch the sender holds
        self._cond = threading.Condition()  # guards the three above and the flags below; notified on progress
        self._unreachable = False  # the last attempt failed in a way worth retrying: new batches go to disk
        self._halted = transport is None  # not sending (offline, or the collector said the job is misconfigured)
        self._spool_error = ""  # why the spool refused the last write; "" while it takes them
        self._spool_warned = False
        self._spilled = 0  # batches moved to the spool so far: wakes a sender that found nothing to send
        self._attempts = 0
        self._stopping = threading.Event()
        self._closed = False
        self._converter = threading.Thread(target=self._convert_loop, name="layerwatch-exporter", daemon=True)
        self._sender = threading.Thread(target=self._send_loop, name="layerwatch-sender", daemon=True)
        self._converter.start()
        if not self._halted:
            self._sender.start()

    @property
    def held_batches(self) -> int:
        """Batches waiting in memory (not yet in the spool or delivered)."""
        with self._cond:
            return len(self._memory) + (self._inflight is not None)

    # -- training thread --------------------------------------------------------------------------------
    def submit(self, report: Report) -> None:
        """Hand over a report; never blocks. Any time, from any thread; after close() it is dropped and counted."""
        if self._closed:
            self.counters.add("dropped_reports")
            return
        try:
            self._reports.put_nowait(report)
        except queue.Full:
            self.counters.add("dropped_reports")

    # -- report -> batch --------------------------------------------------------------------------------
    def _convert_loop(self) -> None:
        while True:
            item = self._reports.get()
            if item is _STOP:
                return
            if isinstance(item, threading.Event):  # force_flush: everything before it is converted
                item.set()
                continue
            try:
                with self._cond:
                    self._make_room()
                batches = self.builder.build(item)
            except Exception:
                self.counters.add("dropped_reports")
                log.exception("layerwatch: could not build a batch; the report is dropped and counted")
                continue
            for packed in batches:  # one, or several when the report has more rows than a batch may carry
                try:
                    with self._cond:
                        self._make_room()
                    self._enqueue(packed)
                except Exception:  # a bug here must not end the exporter for the rest of the run
                    self.counters.add("dropped_batches")
                    log.exception("layerwatch: could not queue a batch; it is dropped and counted")

    def _make_room(self) -> None:
        """At the bound, move memory to disk, or drop the oldest (before building, so memory stays bounded)."""
        if len(self._memory) < self.max_queued:
            return
        self._spill()
        while len(self._memory) >= self.max_queued:
            self._memory.popleft()
            self.counters.add("dropped_batches")
            if not self._spool_warned:
                self._spool_warned = True
                log.warning(
                    "layerwatch: cannot write the spool at %s (%s) and %d batches already wait in memory: "
                    "dropping the oldest (%d so far), counted in stats['dropped_batches'] and sent to the "
                    "collector. Spooling resumes when the directory takes writes again.",
                    self.spool.directory,
                    self._spool_error,
                    self.max_queued,
                    self.counters["dropped_batches"],
                )

    def _enqueue(self, packed: Packed) -> None:
        with self._cond:
            self._memory.append(packed)
            if self._halted or self._unreachable:
                self._spill()
            self._cond.notify_all()

    def _spill(self) -> bool:
        """Memory to the spool, oldest first, order kept, until a write fails. True when memory is empty."""
        while self._memory:
            try:
                written = self.spool.append(self._memory[0].encode(self.counters.wire()))
                error = "" if written else f"its cap of {self.spool.max_bytes} bytes is reached"
            except OSError as exc:
                error = str(exc)
            if error:
                if not self._spool_error:
                    log.info(
                        "layerwatch: the spool at %s refuses writes (%s); batches wait in memory",
                        self.spool.directory,
                        error,
                    )
                self._spool_error = error
                return False
            if self._spool_error:
                log.info("layerwatch: the spool at %s takes writes again", self.spool.directory)
                self._spool_error, self._spool_warned = "", False
            self._memory.popleft()
            self._spilled += 1
        return True

    # -- batch -> collector -----------------------------------------------------------------------------
    def _send_loop(self) -> None:
        while not self._stopping.is_set():
            try:
                if not self._send_next():
                    return
            except Exception:  # a bug here must not end delivery for the rest of the run
                log.exception("layerwatch: unexpected error while sending; retrying")
                with self._cond:
                    if self._inflight is not None:
                        self._memory.appendleft(self._inflight)
                        self._inflight = None
                self._stopping.wait(1.0)

    def _send_next(self) -> bool:
        """Send the oldest batch (spool first, then memory). False when the sender should stop."""
        spilled = self._spilled
        head = self.spool.head()
        if head is None:
            with self._cond:
                if self._memory:
                    self._inflight = self._memory.popleft()
                elif self._spilled == spilled and not self._stopping.is_set():
                    self._cond.wait(timeout=1.0)  # the timeout only guards against a spool we cannot read
                    return True
                else:
                    return True
        payload = head[2] if head is not None else self._inflight.encode(self.counters.wire())
        outcome, result = delivery.deliver(self.transport, payload, self._wait_to_retry, max_backoff=self.max_backoff)
        if outcome is Outcome.DELIVERED:
            self._delivered(result)
        elif outcome is Outcome.POISON:
            self._set_aside(payload, result)  # before the ack: a crash in between re-sends, never loses it
        with self._cond:
            if outcome in (Outcome.DELIVERED, Outcome.POISON):
                if head is not None:
                    self.spool.ack(head[0], head[1])
                self._inflight = None
            elif self._inflight is not None:  # not delivered: back to the front, for the spool or close()
                self._memory.appendleft(self._inflight)
                self._inflight = None
            self._cond.notify_all()
        if outcome is Outcome.KEEP:
            self._keep(result)
            return False
        return outcome is not Outcome.RETRY or not self._stopping.is_set()

    def _wait_to_retry(self, delay: float, result: Delivery) -> bool:
        """Between attempts: later batches go to disk; a memory batch joins them there (False: send the head)."""
        self.last_error = result.error
        if self._attempts == 0 or self._attempts % 10 == 0:
            log.warning("layerwatch: %s; retrying (data is kept)", result.error)
        self._attempts += 1
        with self._cond:
            self._unreachable = True
            if self._inflight is not None:
                self._memory.appendleft(self._inflight)
                self._inflight = None
                spilled = self._spilled
                self._spill()
                if self._spilled > spilled:
                    return False  # it is the spool's head now: send from there
                self._inflight = self._memory.popleft()  # the spool refused it: keep retrying it from memory
            else:
                self._spill()
        return not self._stopping.wait(delay)

    def _delivered(self, result: Delivery) -> None:
        self.counters.add("delivered_batches")
        with self._cond:
            self._unreachable = False
        self._attempts = 0
        if result.body:
            try:
                self.on_response(result.body)
            except Exception:
                log.exception("layerwatch: handling the collector's answer failed")

    def _set_aside(self, payload: bytes, result: Delivery) -> None:
        self.counters.add("rejected_batches")
        kept = self.spool.set_aside(payload, result.error)
        log.error(
            "layerwatch: the collector refused a batch (%s); %s, and the next batches go on",
            result.error,
            f"it is kept in {self.spool.directory / 'rejected'}" if kept else "it could not be kept",
        )

    def _keep(self, result: Delivery) -> None:
        """The job is misconfigured (token, URL): stop sending; everything waits in the spool for `layerwatch sync`."""
        self.last_error = result.error
        what = "refused the token" if result.status in (401, 403) else "has no ingest endpoint at this URL"
        fix = "LAYERWATCH_TOKEN" if result.status in (401, 403) else "LAYERWATCH_URL"
        log.error(
            "layerwatch: the collector %s (%s). Monitoring data is spooled to %s; fix %s and upload it with "
            "`layerwatch sync %s`.",
            what,
            result.error,
            self.spool.directory,
            fix,
            self.spool.directory,
        )
        with self._cond:
            self._halted = True
            self._spill()
            self._cond.notify_all()

    # -- lifecycle --------------------------------------------------------------------------------------
    def force_flush(self, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds until every report submitted so far is delivered (offline: spooled)."""
        try:
            deadline = time.monotonic() + timeout
            if not self._closed:
                converted = threading.Event()
                try:
                    self._reports.put(converted, timeout=timeout)
                except queue.Full:
                    return False
                if not converted.wait(max(deadline - time.monotonic(), 0)):
                    return False
            with self._cond:
                self._cond.wait_for(self._settled, max(deadline - time.monotonic(), 0))
                return self._done()
        except Exception:
            log.exception("layerwatch: force_flush failed")
            return False

    def _done(self) -> bool:
        if self.transport is None:
            return not self._memory
        return not self._memory and self._inflight is None and self.spool.pending_bytes == 0

    def _settled(self) -> bool:
        """Nothing more will happen without new reports: all done, or sending stopped."""
        return self._done() or (self.transport is not None and (self._halted or not self._sender.is_alive()))

    def close(self, timeout: float) -> None:
        """Deliver what is queued within ``timeout`` seconds; what is left waits in the spool. Never raises."""
        if self._closed:
            return
        self._closed = True
        try:
            self._close(time.monotonic() + timeout)
        except Exception:
            log.exception("layerwatch: closing the exporter failed; training continues")

    def _close(self, deadline: float) -> None:
        def left() -> float:
            return max(deadline - time.monotonic(), 0.1)

        with contextlib.suppress(queue.Full):  # a stuck converter: join() below gives up in time
            self._reports.put(_STOP, timeout=left())
        self._converter.join(timeout=left())
        if self._sender.is_alive():
            with self._cond:
                self._cond.wait_for(self._settled, deadline - time.monotonic())
            self._stopping.set()
            with self._cond:
                self._cond.notify_all()
            self._sender.join(timeout=left())
        with self._cond:
            if self._inflight is not None:  # the sender is stuck in a request: keep a copy (a re-send is a no-op)
                self._memory.appendleft(self._inflight)
            self._spill()
            lost = len(self._memory)
            self._memory.clear()
        if lost:
            self.counters.add("dropped_batches", lost)
        dropped = self.counters["dropped_batches"]
        if dropped:
            log.warning(
                "layerwatch: %d batches were dropped in all because the spool at %s could not take them (%s)",
                dropped,
                self.spool.directory,
                self._spool_error or "it recovered later",
            )
        if self.spool.pending_bytes:
            log.warning(
                "layerwatch: %d bytes of monitoring data wait in %s; upload them with `layerwatch sync %s --url URL`",
                self.spool.pending_bytes,
                self.spool.directory,
                self.spool.directory,
            )
