"""A crash-safe on-disk queue of encoded batches: the offline mode's output and the online mode's overflow.

Layout: one directory per (project, run, rank) holding segment files ``<start>-<pid>.lws``. A record is
``b"LWS1" | length (u32 LE) | crc32 (u32 LE) | payload``; a torn or corrupt tail (the process was killed
mid-write) ends a segment's readable part and is skipped with a warning, never fatal. What has been
delivered is remembered in ``<segment>.ack`` (the byte offset, replaced atomically), and a segment that is
fully delivered and no longer written is deleted.
"""

from __future__ import annotations

import logging
import os
import struct
import threading
import time
import zlib
from collections.abc import Iterator
from pathlib import Path

log = logging.getLogger("layerwatch")

MAGIC = b"LWS1"
HEADER = struct.Struct("<4sII")
SUFFIX = ".lws"
SEGMENT_BYTES = 16 * 1024 * 1024


def read_records(path: Path, start: int = 0) -> Iterator[tuple[int, bytes]]:
    """(offset after the record, payload) for each intact record of a segment from ``start``."""
    with open(path, "rb") as f:
        f.seek(start)
        offset = start
        while True:
            header = f.read(HEADER.size)
            if not header:
                return
            if len(header) < HEADER.size:
                log.warning("layerwatch: %s: skipping a truncated record header at byte %d", path, offset)
                return
            magic, length, crc = HEADER.unpack(header)
            payload = f.read(length) if magic == MAGIC else b""
            if magic != MAGIC or len(payload) < length or zlib.crc32(payload) != crc:
                log.warning("layerwatch: %s: skipping a torn or corrupt tail at byte %d", path, offset)
                return
            offset += HEADER.size + length
            yield offset, payload


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


def _remove(segment: Path) -> None:
    for path in (segment, segment.with_suffix(".ack")):
        path.unlink(missing_ok=True)


def pending_records(directory: Path) -> int:
    """How many records under ``directory`` (one spool) still wait for delivery."""
    return sum(1 for seg in segments(directory) for _ in read_records(seg, _read_ack(seg)))


def segments(directory: Path) -> list[Path]:
    """A spool directory's segments, oldest first (names start with a zero-padded time)."""
    return sorted(directory.glob(f"*{SUFFIX}")) if directory.is_dir() else []


class Spool:
    """Append at the tail, read and acknowledge at the head. Thread-safe; bounded by ``max_bytes``."""

    def __init__(self, directory: Path, max_bytes: int) -> None:
        self.directory = directory
        self.max_bytes = max_bytes
        self.dropped = 0  # batches refused because the spool was full
        self._lock = threading.Lock()
        self._writer: Path | None = None
        self._size = sum(p.stat().st_size - _read_ack(p) for p in segments(directory))

    @property
    def pending_bytes(self) -> int:
        return self._size

    def append(self, payload: bytes) -> bool:
        """Write one record durably enough to survive the process (flushed, not fsynced). False if full."""
        record = HEADER.pack(MAGIC, len(payload), zlib.crc32(payload)) + payload
        with self._lock:
            if self._size + len(record) > self.max_bytes:
                self.dropped += 1
                return False
            if self._writer is None or self._writer.stat().st_size >= SEGMENT_BYTES:
                self.directory.mkdir(parents=True, exist_ok=True)
                self._writer = self.directory / f"{time.time_ns():020d}-{os.getpid()}{SUFFIX}"
            with open(self._writer, "ab") as f:
                f.write(record)
            self._size += len(record)
            return True

    def head(self) -> tuple[Path, int, bytes] | None:
        """The oldest undelivered record as (segment, offset after it, payload), or None."""
        with self._lock:
            for segment in segments(self.directory):
                start = _read_ack(segment)
                for end, payload in read_records(segment, start):
                    return segment, end, payload
                if segment != self._writer:
                    self._size -= max(segment.stat().st_size - start, 0)
                    _remove(segment)  # fully delivered (or only a torn tail left)
            return None

    def ack(self, segment: Path, offset: int) -> None:
        with self._lock:
            before = _read_ack(segment)
            _write_ack(segment, offset)
            self._size -= offset - before
