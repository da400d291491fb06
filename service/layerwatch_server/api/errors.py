"""Exception -> response mapping. Clients get a 4xx that names the problem, 429/503 with Retry-After
when they should come back later, and never any other 5xx."""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from sqlalchemy.exc import DBAPIError, SQLAlchemyError
from sqlalchemy.exc import TimeoutError as PoolTimeout

from layerwatch import wire
from layerwatch_server.core.state import Overloaded
from layerwatch_server.storage.ingest import StoreBusy
from layerwatch_server.storage.queries import BadQuery, NotFound

log = logging.getLogger("layerwatch_server")


class PayloadTooLarge(Exception):
    pass


class UnsupportedMedia(Exception):
    pass


def _later(status: int, detail: str, retry_after: int) -> JSONResponse:
    return JSONResponse({"detail": detail}, status_code=status, headers={"Retry-After": str(retry_after)})


# Errors whose message is the whole answer: the exception's text, under this status.
_PLAIN: tuple[tuple[type[Exception], int], ...] = (
    (PayloadTooLarge, 413),
    (UnsupportedMedia, 415),
    (wire.WireError, 422),
    (NotFound, 404),
    (BadQuery, 422),
)


def _plain(status: int):
    async def handler(_: Request, exc: Exception) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, status_code=status)

    return handler


def install(app: FastAPI, retry_after_s: int) -> None:
    for exc_type, status in _PLAIN:
        app.add_exception_handler(exc_type, _plain(status))

    @app.exception_handler(ValidationError)
    async def _invalid(_: Request, exc: ValidationError) -> JSONResponse:
        errors = exc.errors(include_url=False, include_input=False, include_context=False)
        first = errors[0] if errors else {"loc": (), "msg": "invalid"}
        where = ".".join(str(p) for p in first["loc"]) or "batch"
        return JSONResponse({"detail": f"{where}: {first['msg']}", "errors": errors}, status_code=422)

    @app.exception_handler(Overloaded)
    async def _overloaded(_: Request, exc: Overloaded) -> JSONResponse:
        return _later(429, f"collector overloaded: {exc}; retry later", retry_after_s)

    @app.exception_handler(StoreBusy)
    @app.exception_handler(PoolTimeout)
    async def _busy(_: Request, exc: Exception) -> JSONResponse:
        return _later(503, f"database busy: {exc}; retry later", retry_after_s)

    @app.exception_handler(SQLAlchemyError)
    async def _db(_: Request, exc: SQLAlchemyError) -> JSONResponse:
        # An outage, a lock timeout, a replica fail-over: the transaction was rolled back, nothing was kept.
        kind = type(exc.orig).__name__ if isinstance(exc, DBAPIError) else type(exc).__name__
        log.warning("database error (%s): %s", kind, str(exc).splitlines()[0])
        return _later(503, f"database unavailable ({kind}); nothing was written, retry later", retry_after_s)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unexpected error on %s %s", request.method, request.url.path)
        return _later(503, f"internal error ({type(exc).__name__}); nothing was written, retry later", retry_after_s)
