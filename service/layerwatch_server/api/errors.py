"""Exception -> response mapping. Clients get a 4xx that names the problem, 429/503 with Retry-After
when they should come back later (overload, a database that is busy or down), and a 500 only for a bug.

What the database refuses because of what was sent (PostgreSQL's data and integrity errors, a value its
driver cannot bind) is the sender's problem and answers 422: the same request would fail the same way again,
so answering 503 would have a client retry it forever."""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from sqlalchemy.exc import DataError, DBAPIError, IntegrityError, SQLAlchemyError, StatementError
from sqlalchemy.exc import TimeoutError as PoolTimeout

from layerwatch import wire
from layerwatch_server.core.state import Overloaded
from layerwatch_server.storage.ingest import StoreBusy, TooManySeries
from layerwatch_server.storage.queries import BadQuery, NotFound

log = logging.getLogger("layerwatch_server")


class PayloadTooLarge(Exception):
    pass


class UnsupportedMedia(Exception):
    pass


class Unstorable(Exception):
    """A batch the database layer could not take because of its content (422)."""


def is_content_error(exc: SQLAlchemyError) -> bool:
    """True when the database (or its driver, binding a value) refused the statement's data, not its state."""
    if isinstance(exc, DataError | IntegrityError):
        return True
    return isinstance(exc, StatementError) and not isinstance(exc, DBAPIError)  # failed before reaching it


def _later(status: int, detail: str, retry_after: int) -> JSONResponse:
    return JSONResponse({"detail": detail}, status_code=status, headers={"Retry-After": str(retry_after)})


# Errors whose message is the whole answer: the exception's text, under this status.
_PLAIN: tuple[tuple[type[Exception], int], ...] = (
    (PayloadTooLarge, 413),
    (UnsupportedMedia, 415),
    (wire.WireError, 422),
    (Unstorable, 422),
    (TooManySeries, 422),
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
        # The transaction was rolled back either way: nothing was kept.
        cause = getattr(exc, "orig", None) or exc  # a StatementError carries the driver's (or binding's) error
        kind, first = type(cause).__name__, (str(cause).splitlines() or [""])[0]
        if is_content_error(exc):
            log.info("database refused the content (%s): %s", kind, first)
            detail = f"the database refused this content ({kind}: {first}); nothing was written"
            return JSONResponse({"detail": detail}, 422)
        # An outage, a lock timeout, a full disk, a replica fail-over.
        log.warning("database error (%s): %s", kind, first)
        return _later(503, f"database unavailable ({kind}); nothing was written, retry later", retry_after_s)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unexpected error on %s %s", request.method, request.url.path)
        return JSONResponse({"detail": f"internal error ({type(exc).__name__}); nothing was written"}, 500)
