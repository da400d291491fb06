"""A crash-safe on-disk queue of encoded batches: the offline mode's output and the online mode's overflow.

Layout: one directory per (project, run, rank) holding segment files ``<start>-<pid>.lws``. A record is
``b"LWS1" | length (u32 LE) | crc32 (u32 LE) | payload``. Unreadable bytes (a torn write, a flipped bit)
cost only themselves: reading resumes at the next record whose header and CRC check out, and the bytes
skipped are copied into ``corrupt/`` for inspection. What has been delivered is remembered in
``<segment>.ack`` (the byte offset, replaced atomically; held in memory too, so a spool that can no
longer be written still moves on), and a segment is deleted once every readable record in it was
delivered. Batches the collector refused (see :mod:`layerwatch.delivery`) are set aside in ``rejected/``,
with the reason in ``rejected/reasons.jsonl``.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import struct
import threading
import time
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

log = logging.getLogger("layerwatch")

MAGIC = b"LWS1"
HEADER = struct.Struct("<4sII")
SUFFIX = ".lws"
SEGMENT_BYTES = 16 * 1024 * 1024
REJECTED = "rejected"
CORRUPT = "corrupt"
REASONS = "reasons.jsonl"


@dataclass(frozen=True)
class Corrupt:
    """Bytes ``[offset, end)`` of ``segment`` that hold no readable record; ``tail``: nothing readable follows."""

    segment: Path
    offset: int
    end: int
    tail: bool


def read_records(
    path: Path, start: int = 0, on_corrupt: Callable[[Corrupt], None] | None = None
) -> Iterator[tuple[int, bytes]]:
    """(offset after the record, payload) for each readable record of a segment from ``start``.

    Unreadable bytes are skipped up to the next record boundary, logged, and passed to ``on_corrupt``.
    """
    for item in scan(path, start):
        if isinstance(item, Corrupt):
            if on_corrupt is not None:
                on_corrupt(item)
            continue
        yield item


def scan(path: Path, start: int = 0) -> Iterator[tuple[int, bytes] | Corrupt]:
    """Records as (offset after it, payload), and a :class:`Corrupt` for each unreadable span between them."""
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        offset = start
        while offset < size:
            f.seek(offset)
            header = f.read(HEADER.size)
            payload = _payload(header, f.read, size - offset - HEADER.size)
            if payload is not None:
                offset += HEADER.size + len(payload)
                yield offset, payload
                continue
            end = _next_record(f, offset + 1, size)
            span = Corrupt(path, offset, end, tail=end == size)
            if span.tail:
                log.warning("layerwatch: %s: skipping a torn or corrupt tail at byte %d", path, offset)
            else:
                log.warning(
                    "layerwatch: %s: skipping %d unreadable bytes at byte %d; reading resumes at byte %d",
                    path,
                    end - offset,
                    offset,
                    end,
                )
            yield span
            offset = end


def _payload(header: bytes, read: Callable[[int], bytes], room: int) -> bytes | None:
    """The payload after ``header`` if the record is whole and its CRC matches, else None."""
    if len(header) < HEADER.size:
        return None
    magic, length, crc = HEADER.unpack(header)
    if magic != MAGIC or length > room:
        return None
    payload = read(length)
    return payload if len(payload) == length and zlib.crc32(payload) == crc else None


def _next_record(f: BinaryIO, start: int, size: int) -> int:
    """The offset of the first readable record at or after ``start`` (``size`` if none): a MAGIC whose CRC holds."""
    f.seek(start)
    data = f.read(size - start)
    rest = io.BytesIO(data)
    pos = data.find(MAGIC)
    while pos >= 0:
        rest.seek(pos)
        if _payload(rest.read(HEADER.size), rest.read, len(data) - pos - HEADER.size) is not None:
            return start + pos
        pos = data.find(MAGIC, pos + 1)
    return size


def _read_ack(segment: Path) -> int:
    try:
        return int(segment.with_suffix(".ack").read_text())
    except (OSError, ValueError):
        return 0


def _write_ack(segment: Path, offset: int) -> None:
    ack = segment.with_suffix(".ack")
    tmp = ack.with_suffix(".ack.tmp")
    tmp.write_text(str(offset))
    os.replace(tmp, ack)


def _size_of(segment: Path) -> int:
    try:
        return segment.stat().st_size
    except OSError:
        return SEGMENT_BYTES  # gone or unreadable: start a new segment


def _remove(segment: Path) -> None:
    for path in (segment, segment.with_suffix(".ack")):
        path.unlink(missing_ok=True)


def pending_records(directory: Path) -> int:
    """How many readable records under ``directory`` (one spool) still wait for delivery.

    Safe beside a live exporter: a segment it deletes (all delivered) between listing and reading counts 0.
    """
    return sum(_records_left(seg) for seg in segments(directory))


def _records_left(segment: Path) -> int:
    try:
        return sum(1 for _ in read_records(segment, _read_ack(segment)))
    except FileNotFoundError:
        return 0


def segments(directory: Path) -> list[Path]:
    """A spool directory's segments, oldest first (names start with a zero-padded time)."""
    try:
        return sorted(directory.glob(f"*{SUFFIX}")) if directory.is_dir() else []
    except OSError:
        return []


def spools_under(root: Path) -> list[Path]:
    """Every spool directory under ``root`` that holds segments, not counting set-aside folders."""
    found = {seg.parent for seg in root.rglob(f"*{SUFFIX}")}
    return sorted(d for d in found if d.name not in (REJECTED, CORRUPT))


class Spool:
    """Append at the tail, read and acknowledge at the head. Thread-safe; bounded by ``max_bytes``.

    ``append`` answers False when the cap leaves no room and raises ``OSError`` when the disk refuses the
    write (read-only, full, no permission); what was half written is taken back, so the segment stays
    readable. Nothing else here raises for a disk that misbehaves.
    """

    def __init__(self, directory: Path, max_bytes: int) -> None:
        self.directory = directory
        self.max_bytes = max_bytes
        self.corrupt: list[Corrupt] = []  # unreadable spans found (and set aside) by this instance
        self._lock = threading.Lock()
        self._writer: Path | None = None
        self._acks: dict[Path, int] = {}
        self._rejected: Spool | None = None
        try:
            self._size = sum(p.stat().st_size - _read_ack(p) for p in segments(directory))
        except OSError:
            self._size = 0

    @property
    def pending_bytes(self) -> int:
        return self._size

    def append(self, payload: bytes) -> bool:
        """Write one record durably enough to survive the process (flushed, not fsynced). False if full."""
        record = HEADER.pack(MAGIC, len(payload), zlib.crc32(payload)) + payload
        with self._lock:
            if self._size + len(record) > self.max_bytes:
                return False
            if self._writer is None or _size_of(self._writer) >= SEGMENT_BYTES:
                self.directory.mkdir(parents=True, exist_ok=True)
                self._writer = self.directory / f"{time.time_ns():020d}-{os.getpid()}{SUFFIX}"
            writer = self._writer
            with open(writer, "ab", buffering=0) as f:  # unbuffered: a failed write fails here, not at close
                before = f.tell()
                try:
                    view = memoryview(record)
                    while view:
                        view = view[f.write(view) :]
                except OSError:
                    self._take_back(f, writer, before)
                    raise
            self._size += len(record)
            return True

    def _take_back(self, f: BinaryIO, writer: Path, before: int) -> None:
        """A failed write leaves no half record behind; the next append starts a fresh segment."""
        self._writer = None
        try:
            f.truncate(before)
            if before == 0:
                writer.unlink(missing_ok=True)
        except OSError:
            pass  # reading skips what is left, up to the next record boundary

    def head(self) -> tuple[Path, int, bytes] | None:
        """The oldest undelivered record as (segment, offset after it, payload), or None."""
        with self._lock:
            for segment in segments(self.directory):
                start = self._acked(segment)
                try:
                    for item in scan(segment, start):
                        if not isinstance(item, Corrupt):
                            return segment, item[0], item[1]
                        if item.tail and segment == self._writer:
                            break  # our own tail: never skip what we may still be writing
                        self._set_corrupt_aside(item)
                        self._ack_locked(segment, item.end)
                    else:
                        if segment != self._writer:
                            self._size -= max(segment.stat().st_size - self._acked(segment), 0)
                            _remove(segment)  # every readable record in it was delivered
                            self._acks.pop(segment, None)
                except OSError as exc:
                    log.warning("layerwatch: cannot read the spool segment %s: %s", segment, exc)
            return None

    def pending(self) -> Iterator[tuple[Path, int, bytes | None]]:
        """Every undelivered record, oldest first, as (segment, offset after it, payload), for a reader that keeps
        several in flight and acknowledges them in order itself. An unreadable span is set aside as it is met and
        comes as a record without payload (None): acknowledge it in its turn. Delivered segments are removed by
        the next :meth:`head`."""
        for segment in segments(self.directory):
            try:
                for item in scan(segment, self._acked(segment)):
                    if not isinstance(item, Corrupt):
                        yield segment, item[0], item[1]
                        continue
                    if item.tail and segment == self._writer:
                        break  # our own tail: never skip what we may still be writing
                    with self._lock:
                        self._set_corrupt_aside(item)
                    yield segment, item.end, None
            except OSError as exc:
                log.warning("layerwatch: cannot read the spool segment %s: %s", segment, exc)

    def ack(self, segment: Path, offset: int) -> None:
        with self._lock:
            self._ack_locked(segment, offset)

    def _acked(self, segment: Path) -> int:
        return max(self._acks.get(segment, 0), _read_ack(segment))

    def _ack_locked(self, segment: Path, offset: int) -> None:
        before = self._acked(segment)
        self._acks[segment] = offset
        self._size -= offset - before
        # Remembered in memory either way; if the file write fails, a restart sends the record again (a no-op).
        with contextlib.suppress(OSError):
            _write_ack(segment, offset)

    def _set_corrupt_aside(self, span: Corrupt) -> None:
        self.corrupt.append(span)
        target = self.directory / CORRUPT / f"{span.segment.stem}-{span.offset}.bin"
        try:
            target.parent.mkdir(exist_ok=True)
            with open(span.segment, "rb") as f:
                f.seek(span.offset)
                target.write_bytes(f.read(span.end - span.offset))
        except OSError as exc:
            log.warning("layerwatch: could not keep the unreadable bytes of %s aside: %s", span.segment, exc)

    def set_aside(self, payload: bytes, reason: str) -> bool:
        """Keep a batch the collector refused in ``rejected/``, with why; False if that could not be written."""
        try:
            if self._rejected is None:
                self._rejected = Spool(self.directory / REJECTED, self.max_bytes)
            if not self._rejected.append(payload):
                return False
            note_rejection(self._rejected.directory, reason, len(payload))
            return True
        except OSError as exc:
            log.warning("layerwatch: could not set a refused batch aside in %s: %s", self.directory / REJECTED, exc)
            return False


def note_rejection(directory: Path, reason: str, size: int) -> None:
    """Say why a batch kept in ``directory`` (a ``rejected/`` folder) was refused."""
    with open(directory / REASONS, "a") as f:
        f.write(json.dumps({"time": time.time(), "reason": reason, "bytes": size}) + "\n")


def rejected_reasons(directory: Path) -> list[str]:
    """The reasons recorded for the batches set aside in ``directory`` (a ``rejected/`` folder), oldest first."""
    reasons = []
    try:
        lines = (directory / REASONS).read_text().splitlines()
    except OSError:
        return []
    for line in lines:
        try:
            reasons.append(str(json.loads(line)["reason"]))
        except (ValueError, KeyError, TypeError):
            continue
    return reasons
