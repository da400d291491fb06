"""POST /api/v1/ingest: one batch in, one transaction, 202 after commit.

A batch is decoded and validated as soon as it comes; its write (rows, rules, commit) waits for its turn among
its rank's batches (``api.order``: after the batch its ``Layerwatch-Follows`` header names), on the event loop,
so no worker thread and no transaction is held meanwhile."""

from __future__ import annotations

import logging
from typing import Any

from anyio import to_thread
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from layerwatch import wire
from layerwatch_server.api.deps import GrantDep, StateDep, authorize
from layerwatch_server.api.errors import PayloadTooLarge, Unstorable, UnsupportedMedia
from layerwatch_server.api.schemas import IngestResponse, Problem
from layerwatch_server.api.state import AppState
from layerwatch_server.core.batch import Batch
from layerwatch_server.storage.ingest import TooManySeries

log = logging.getLogger("layerwatch_server")
router = APIRouter(tags=["ingest"])

_MEDIA = ("application/x-msgpack", "application/msgpack", "application/vnd.msgpack", "application/json")

_BODY_DOC: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "description": "A wire v1 batch as msgpack (usually gzip-encoded) or JSON; see layerwatch.wire.",
        "content": {
            "application/json": {"schema": {"$ref": "#/components/schemas/Batch"}},
            "application/x-msgpack": {"schema": {"type": "string", "format": "binary"}},
        },
    }
}

_LATER = {"description": "Retry after the Retry-After header", "model": Problem}


@router.post(
    "/ingest",
    status_code=202,
    response_model=IngestResponse,
    openapi_extra=_BODY_DOC,
    responses={
        401: {"model": Problem},
        403: {"model": Problem},
        413: {"model": Problem},
        415: {"model": Problem},
        422: {"model": Problem},
        429: _LATER,
        503: _LATER,
    },
)
async def ingest(request: Request, state: StateDep, grant: GrantDep) -> JSONResponse:
    """Store a batch. Idempotent on (run, rank, step): steps already stored count as duplicates."""
    with state.admission:  # 429 beyond the in-flight limit, before the body takes any memory
        media = request.headers.get("content-type", wire.CONTENT_TYPE).split(";")[0].strip().lower()
        if media not in _MEDIA:
            raise UnsupportedMedia(f"unsupported Content-Type {media!r}; use {wire.CONTENT_TYPE} or application/json")
        encoding = request.headers.get("content-encoding")
        if encoding and encoding.lower() not in ("gzip", "identity"):
            raise UnsupportedMedia(f"unsupported Content-Encoding {encoding!r}; use gzip or identity")
        body = await _read_body(request, wire.MAX_BODY_BYTES)
        with state.turns.arrival(_head(body, media, encoding)) as arrival:
            batch = await to_thread.run_sync(_decode, body, media, encoding, limiter=state.ingest_limiter)
            authorize(grant, batch.run.project, "write")
            key = (batch.run.project, batch.run.key, batch.rank, batch.pid)
            await arrival.after(key, batch.seq, _follows(request.headers.get(wire.FOLLOWS_HEADER)))
            result = await to_thread.run_sync(_ingest, state, batch, limiter=state.ingest_limiter)
    return JSONResponse(result, status_code=202)


def _head(body: bytes, media: str, encoding: str | None) -> tuple[tuple[str, str, int, int], int] | None:
    """(run, rank, process) and seq of a gzip msgpack batch from its first bytes (tens of microseconds), or None."""
    if media == "application/json" or (encoding or "").lower() != "gzip":
        return None
    sender = wire.sender_of(body)
    return (sender[:4], sender[4]) if sender is not None else None


def _follows(value: str | None) -> int | None:
    """The header's seq; anything else is no promise to wait for (the batch goes on as without it)."""
    return int(value) if value is not None and value.isdigit() and len(value) < 20 else None


async def _read_body(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise PayloadTooLarge(f"body of {declared} bytes exceeds the {limit}-byte limit; send smaller batches")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise PayloadTooLarge(f"body exceeds the {limit}-byte limit; send smaller batches")
        chunks.append(chunk)
    return b"".join(chunks)


def _decode(body: bytes, media: str, encoding: str | None) -> Batch:
    return Batch.model_validate(wire.decode(body, media, encoding))


def _ingest(state: AppState, batch: Batch) -> dict[str, Any]:
    try:
        res = state.ingestor.write(batch)
    except TooManySeries:
        raise
    except (ValueError, TypeError, OverflowError, RecursionError) as exc:  # a value the driver could not send
        log.info("batch could not be stored: %r", exc)
        raise Unstorable(f"batch could not be stored ({type(exc).__name__}: {exc}); nothing was written") from exc
    accepted = {
        "steps": res.steps,
        "duplicates": res.duplicates,
        "layer_rows": res.layer_rows,
        "param_rows": res.param_rows,
    }
    alerts: list[dict[str, Any]] = []
    for hook in state.ingest_hooks:  # telemetry, and the alert rules finishing after the commit
        try:
            alerts.extend(hook(batch, res))
        except Exception:  # the batch is committed: a failing rule must not turn that into a retry
            log.exception("ingest hook %r failed", hook)
    return {"run_id": res.run_id, "accepted": accepted, "alerts": alerts}
