"""A rank's batches judged in the order it made them, while several are on their way at once.

The alert rules read a rank's steps as a series (the loss against its recent history, ``for`` counts), so they
must see its batches in order. Storage does not mind, and a sender that keeps several batches in flight
(``layerwatch sync --in-flight N``) cannot promise the order in which they arrive. The contract:

- A batch may name the batch of the same run, rank and process (``pid``) that comes before it and may still be
  on its way: the request header ``Layerwatch-Follows: <seq>`` (``seq`` as in ``layerwatch.wire``). A batch
  without it (the exporter sends one batch at a time, in order) never waits.
- Such a batch is decoded and validated at once, then waits for its predecessor's turn to end (stored, rules
  evaluated, committed or failed: one refused as malformed ends its turn there) before its own write begins.
  It waits here, on the event loop: outside any database transaction (SQLite has one writer; a batch holding
  it while waiting for another would deadlock) and without a worker thread (the few stay free for the
  predecessor).
- The wait is short: once the predecessor has arrived (its body is in: the collector reads who sent a msgpack
  batch from its first bytes, before it queues for decoding) its turn is awaited, which its own write bounds; a
  predecessor that has not arrived within ``wait_s`` (lost, sent to another replica) is not waited for any
  longer: the batch goes on, and should the predecessor come after all, its steps are judged as late
  ones (see ``rules.evaluation``): nothing is skipped.

All state lives in this process, on the event loop's thread (no locks): the last turns of the ranks heard from
lately.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import AsyncIterator, Hashable, Iterator
from contextlib import asynccontextmanager, contextmanager

import anyio

log = logging.getLogger("layerwatch_server")

WAIT_S = 2.0  # for a predecessor to arrive: a sender's batches in flight leave it milliseconds apart
TURN_S = 60.0  # for an arrived predecessor to end its turn: only a bound, its write ends it long before
_KEPT_TURNS = 256  # per rank: far more than a sender keeps in flight (sync allows 32)
_KEPT_RANKS = 4096


class _Rank:
    """One (run, rank, process)'s turns: when each arrived and when each ended, by ``seq``."""

    __slots__ = ("active", "arrived", "ended")

    def __init__(self) -> None:
        self.arrived: dict[int, anyio.Event] = {}
        self.ended: dict[int, anyio.Event] = {}
        self.active = 0  # turns begun and not ended, waiting ones included

    @staticmethod
    def event(events: dict[int, anyio.Event], seq: int) -> anyio.Event:
        found = events.get(seq)
        if found is None:
            found = events[seq] = anyio.Event()
        return found

    def forget_old(self) -> None:
        for events in (self.arrived, self.ended):
            if len(events) > 2 * _KEPT_TURNS:
                for seq in sorted(events)[:-_KEPT_TURNS]:
                    if events[seq].is_set():  # an unset one has a waiter
                        del events[seq]


class Arrival:
    """The turns one request takes (see :meth:`Turns.arrival`)."""

    def __init__(self, turns: Turns) -> None:
        self.turns = turns
        self.taken: list[tuple[Hashable, int]] = []

    def mark(self, key: Hashable, seq: int) -> None:
        """``seq`` of ``key`` has arrived."""
        if (key, seq) not in self.taken:
            rank = self.turns.rank(key)
            rank.active += 1
            rank.event(rank.arrived, seq).set()
            self.taken.append((key, seq))

    async def after(self, key: Hashable, seq: int, follows: int | None) -> None:
        """Return in ``seq``'s turn: once ``follows`` (when given and earlier) has ended its own, or was not worth
        waiting for any longer."""
        self.mark(key, seq)
        if follows is not None and follows < seq:
            await self.turns.after(key, follows)

    def end(self) -> None:
        for key, seq in self.taken:
            rank = self.turns.rank(key)
            rank.event(rank.ended, seq).set()
            rank.active -= 1
            rank.forget_old()
        self.taken.clear()


class Turns:
    """Per (run, rank, process): a batch's turn begins once the batch it follows has ended its own."""

    def __init__(self, wait_s: float = WAIT_S, turn_s: float = TURN_S) -> None:
        self.wait_s, self.turn_s = wait_s, turn_s
        self._ranks: OrderedDict[Hashable, _Rank] = OrderedDict()
        self.waiting = 0  # turns waiting for their predecessor's now
        self.waited_out = 0  # predecessors not waited for any longer (never came in time)

    @asynccontextmanager
    async def turn(self, key: Hashable, seq: int, follows: int | None) -> AsyncIterator[None]:
        """The body runs in ``seq``'s turn: after ``follows`` (when given and earlier) has ended its own, or
        was not worth waiting for any longer."""
        with self.arrival(None) as arrival:
            await arrival.after(key, seq, follows)
            yield

    @contextmanager
    def arrival(self, head: tuple[Hashable, int] | None) -> Iterator[Arrival]:
        """A request from the moment its body is in: ``head`` (key, seq), where the body says so before it is
        decoded, has arrived from now on (a batch that follows it stops counting the time), and every turn the
        request takes ends with it, decoded or not (a batch refused as malformed holds back none after it)."""
        arrival = Arrival(self)
        if head is not None:
            arrival.mark(*head)
        try:
            yield arrival
        finally:
            arrival.end()

    async def after(self, key: Hashable, seq: int) -> None:
        """Return once ``seq`` of ``key`` has ended its turn, or has not arrived within ``wait_s``."""
        rank = self.rank(key)
        ended = rank.event(rank.ended, seq)
        if ended.is_set():
            return
        arrived = rank.event(rank.arrived, seq)
        self.waiting += 1
        try:
            with anyio.move_on_after(self.wait_s):
                await arrived.wait()
            if arrived.is_set():
                with anyio.move_on_after(self.turn_s):
                    await ended.wait()
        finally:
            self.waiting -= 1
        if not ended.is_set():
            self.waited_out += 1
            if not arrived.is_set() and rank.arrived.get(seq) is arrived:  # never came (lost, another replica's):
                del rank.arrived[seq]  # its unset events go, which forget_old keeps (they would pile up)
                rank.ended.pop(seq, None)
            log.info("batch %s of %r did not come within %.1f s: the batch after it goes on", seq, key, self.wait_s)

    def rank(self, key: Hashable) -> _Rank:
        rank = self._ranks.get(key)
        if rank is None:
            rank = self._ranks[key] = _Rank()
            while len(self._ranks) > _KEPT_RANKS:  # the least recently heard of, unless a turn is open there
                oldest, idle = next(iter(self._ranks.items()))
                if idle.active:
                    break
                del self._ranks[oldest]
        self._ranks.move_to_end(key)
        return rank
