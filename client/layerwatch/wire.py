"""The wire format between the client and the collector: the one contract both sides share.

A *batch* is what one rank sends for one or more report intervals. It is a msgpack map, gzip-compressed
on the wire (``Content-Type: application/x-msgpack``, ``Content-Encoding: gzip``) and in the spool. The
collector also accepts the same structure as JSON (``application/json``; NaN/Infinity allowed).

Version 1 layout::

    {
      "v": 1,
      "run": {"key": str, "name": str, "project": str, "world_size": int,
              "config": {...} | None},          # config only in a rank's first batch
      "rank": int, "host": str, "pid": int, "seq": int,   # seq counts this rank's batches from 0
      "layers": [{"index": int, "name": str, "type": str, "kind": str,
                  "shape": [int, ...], "units": int}, ...],
      "params": [{"index": int, "name": str, "shape": [int, ...], "numel": int}, ...],
      "layer_stats": LAYER_STATS, "param_stats": PARAM_STATS,
      "steps": [{"step": int, "time": float, "loss": float | None, "lr": float | None,
                 "grad_norm_total": float | None, "scalars": {str: float},
                 "layers": [[layer_index, *values], ...],    # values in layer_stats order
                 "params": [[param_index, *values], ...]}],  # values in param_stats order
      "nonfinite_origin": {"step": int, "pass": "forward" | "backward" | "loss",
                           "layer": str | None, "rank": int} | None,
      "end": {"status": "finished" | "failed" | "killed"} | None,
      "dropped": {"reports": int, "batches": int, "rejected": int},  # cumulative; "rejected": batches the
                                                                    # collector refused (it may ignore the key)
      "histograms": {"edges": [float, ...],                          # optional; see layerwatch.histograms
                     "layers": [{"layer": str, "kind": "activation" | "gradient", "step": int,
                                 "counts": [int, ...], "nan": int}, ...]},
      "ranks": {"loss_mean": [float | None, ...],                    # optional; see layerwatch.ranks
                "step_time_mean": [float | None, ...],
                "grad_norm_mean": [float | None, ...]},
      "preview": bool,                                               # optional, default false; see below
      "report_ends": [int, ...],                                     # optional: in a batch joining several
    }                                                                # (layerwatch sync), each one's last step

Version rule: ``v`` changes only when a reader of the old version would misread a batch. A new *optional*
key (``histograms`` was one) keeps ``v``: collectors ignore keys they do not know (``extra="ignore"``), and
they accept batches without it, so old clients and old collectors keep working with new ones. ``histograms``:
per layer, the counts of its activations (``layer``: a watched layer's name) or of the gradients of the
parameters its module owns (``layer``: the module's name) in the ``len(edges) + 1`` bins between ``edges``,
measured at ``step`` (summed over ranks; only rank 0 sends it); NaNs are counted apart in ``nan``.
``ranks``: in a batch of rows combined across ranks (rank 0 sends them; see :mod:`layerwatch.ranks`), each
rank's mean loss, mean seconds between steps and mean own gradient norm (before DDP averages it) over the batch's
report, indexed by rank; those steps' ``scalars`` then carry ``loss_min``, ``loss_max``, ``loss_argmax_rank``,
``step_time_max``, ``step_time_argmax_rank``, and under DDP ``grad_norm_rank_max``, ``grad_norm_argmax_rank``.
``preview``: one rank's own steps of an interval so far, sent as its tripwire trips in a job whose ranks combine
their reports: the collector judges them (alerts, ``nonfinite_origin``) and stores none; the combined batch does.

A value is a float (NaN and Inf included: they are the signal) or None where a statistic does not apply
(``sat_frac`` of an unbounded layer) or is not due at that step (``dead_frac`` outside a window's end).
Steps are idempotent on (run key, rank, step): a re-sent step is a no-op at the collector.

A sender with several batches in flight sends each with the header ``Layerwatch-Follows: <seq>`` naming the
batch of the same run, rank and ``pid`` before it that may still be on its way (:data:`FOLLOWS_HEADER`): the
collector then judges the two in that order, whichever arrives first (it waits a moment at most). Batches
sent one at a time, in order, need no header.
"""

from __future__ import annotations

import gzip
import json
import zlib
from typing import Any

import msgpack

VERSION = 1

LAYER_STATS: tuple[str, ...] = (
    "act_mean",
    "act_std",
    "act_max_abs",
    "zero_frac",
    "dead_frac",
    "sat_frac",
    "nonfinite",
)
PARAM_STATS: tuple[str, ...] = (
    "grad_norm",
    "grad_max_abs",
    "weight_norm",
    "update_ratio",
    "grad_nonfinite",
)
STEP_STATS: tuple[str, ...] = ("loss", "lr", "grad_norm_total")

# Layer kinds decide what "active" means for dead_frac and whether sat_frac applies.
KIND_RELU = "relu"  # ReLU family and Linear/Conv outputs: active = output > eps
KIND_BOUNDED = "bounded"  # tanh, sigmoid, hardtanh: active = |output| > eps, sat_frac measured
KIND_OTHER = "other"  # GELU, SiLU, ELU, ...: active = |output| > eps
KINDS = (KIND_RELU, KIND_BOUNDED, KIND_OTHER)

END_STATUSES = ("finished", "failed", "killed")
PASSES = ("forward", "backward", "loss")

CONTENT_TYPE = "application/x-msgpack"
CONTENT_ENCODING = "gzip"

# Transport limits the collector enforces (and the client respects when it builds batches).
MAX_BODY_BYTES = 8 * 1024 * 1024
MAX_ROWS = 50_000  # layer and parameter rows in one batch (the collector's core.batch.MAX_ROWS)
MAX_DECODED_BYTES = 64 * 1024 * 1024


FOLLOWS_HEADER = "Layerwatch-Follows"

# The map's first entries, as the client writes them (run, rank, host, pid, seq), and how many to read at most.
_HEAD_KEYS = frozenset({"run", "rank", "pid", "seq"})
_HEAD_ENTRIES = 8


class WireError(ValueError):
    """A body that is not a batch this version can read; the message says what is wrong."""


def encode(batch: dict[str, Any]) -> bytes:
    """msgpack, then gzip at a fast level: batches are mostly floats, and the CPU is the trainer's."""
    return gzip.compress(msgpack.packb(batch, use_bin_type=True), compresslevel=1)


def decode(
    body: bytes, content_type: str = CONTENT_TYPE, content_encoding: str | None = CONTENT_ENCODING
) -> dict[str, Any]:
    """Inverse of :func:`encode`; also reads plain or gzip JSON. Raises :class:`WireError`."""
    if content_encoding and content_encoding.lower() == "gzip":
        try:
            decoder = zlib.decompressobj(wbits=31)
            raw = decoder.decompress(body, MAX_DECODED_BYTES)
        except zlib.error as exc:
            raise WireError(f"body is not valid gzip: {exc}") from None
        if decoder.unconsumed_tail:
            raise WireError(f"decompressed body exceeds {MAX_DECODED_BYTES} bytes")
    elif content_encoding and content_encoding.lower() != "identity":
        raise WireError(f"unsupported Content-Encoding {content_encoding!r}; use gzip or identity")
    else:
        raw = body
    media = (content_type or CONTENT_TYPE).split(";")[0].strip().lower()
    try:
        if media in ("application/x-msgpack", "application/msgpack", "application/vnd.msgpack"):
            batch = msgpack.unpackb(raw, raw=False, strict_map_key=True)
        elif media == "application/json":
            batch = json.loads(raw)
        else:
            raise WireError(f"unsupported Content-Type {media!r}; use {CONTENT_TYPE} or application/json")
    except WireError:
        raise
    except Exception as exc:  # msgpack and json raise a zoo of types for bad bytes
        raise WireError(f"body could not be decoded as {media}: {exc}") from None
    if not isinstance(batch, dict):
        raise WireError("batch must be a map/object at the top level")
    version = batch.get("v")
    if version != VERSION:
        raise WireError(f"unsupported batch version {version!r}; this collector reads v={VERSION}")
    return batch


def sender_of(body: bytes) -> tuple[str, str, int, int, int] | None:
    """(project, run key, rank, pid, seq) of a batch as :func:`encode` makes it, read from its first entries without
    decompressing or decoding the rest (its steps); None when they are not there, or not readable."""
    decoder = zlib.decompressobj(wbits=31)
    raw, size, rest = b"", 4096, body
    while True:
        try:
            raw += decoder.decompress(rest, size - len(raw))
        except zlib.error:
            return None
        head, rest = _head(raw), decoder.unconsumed_tail
        if head is not None or not rest or size >= MAX_DECODED_BYTES:
            break
        size *= 4  # a first batch carries the run's config: up to 256 KiB
    if not head or "seq" not in head or not isinstance(head.get("run"), dict):
        return None
    run = head["run"]
    try:
        return str(run["project"]), str(run["key"]), int(head.get("rank", 0)), int(head.get("pid", 0)), int(head["seq"])
    except (KeyError, TypeError, ValueError):
        return None


def _head(raw: bytes) -> dict[str, Any] | None:
    """The sender's entries among the first of a msgpack map; None when ``raw`` ends before they do."""
    unpacker = msgpack.Unpacker(raw=False, strict_map_key=False)
    unpacker.feed(raw)
    found: dict[str, Any] = {}
    try:
        for _ in range(min(unpacker.read_map_header(), _HEAD_ENTRIES)):
            key = unpacker.unpack()
            if key in _HEAD_KEYS:
                found[key] = unpacker.unpack()
                if key == "seq":
                    break
            else:
                unpacker.skip()
    except msgpack.OutOfData:
        return None
    except Exception:  # not a batch's head at all
        return {}
    return found
