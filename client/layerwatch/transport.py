"""HTTP delivery of encoded batches: one POST, its outcome described, no policy.

What to do with an outcome (retry, keep, set aside) is :mod:`layerwatch.delivery`'s table. The exporter and
``layerwatch sync`` talk to a :class:`Transport`, so a test can put its own in place of HTTP where the
network is not the point.
"""

from __future__ import annotations

import http.client
import json
import random
import threading
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timezone
from email.utils import parsedate_to_datetime
from typing import Any, Protocol

from layerwatch import wire

INGEST_PATH = "/api/v1/ingest"


@dataclass
class Delivery:
    """The outcome of one attempt."""

    ok: bool
    status: int | None = None  # None: no HTTP answer (connection refused, timeout)
    retry_after: float | None = None
    body: dict[str, Any] | None = None
    error: str = ""


class Transport(Protocol):
    """Where batches go: one call per attempt, never raising (a failure is a :class:`Delivery`). ``headers``:
    more request headers, which only ``layerwatch sync`` sends (``wire.FOLLOWS_HEADER``)."""

    def post_batch(self, payload: bytes, headers: Mapping[str, str] | None = None) -> Delivery: ...


@dataclass(frozen=True)
class HttpTransport:
    """The collector's ingest endpoint over HTTP(S)."""

    url: str
    token: str | None = None
    timeout: float = 10.0

    def post_batch(self, payload: bytes, headers: Mapping[str, str] | None = None) -> Delivery:
        return post_batch(self.url, payload, self.token, self.timeout, headers)


class KeptAliveTransport:
    """The ingest endpoint over one kept-alive connection per thread, for a sender that keeps several batches in
    flight (``layerwatch sync``): no connection set up per batch. Where a proxy applies to the URL, each
    batch goes through urllib as :class:`HttpTransport` sends it."""

    def __init__(self, url: str, token: str | None = None, timeout: float = 10.0) -> None:
        self.url, self.token, self.timeout = url, token, timeout
        parts = urllib.parse.urlsplit(url)
        host = parts.hostname or ""
        try:
            self._address = (host, parts.port)
        except ValueError:  # a malformed port: urllib says so for each batch
            host, self._address = "", ("", None)
        self._plain = bool(host) and parts.scheme in ("http", "https") and not _proxied(url, host)
        self._https = parts.scheme == "https"
        self._path = parts.path.rstrip("/") + INGEST_PATH
        self._local = threading.local()

    def post_batch(self, payload: bytes, headers: Mapping[str, str] | None = None) -> Delivery:
        """``headers``: more request headers (``wire.FOLLOWS_HEADER``)."""
        if not self._plain:
            return post_batch(self.url, payload, self.token, self.timeout, headers)
        reused = getattr(self._local, "conn", None) is not None
        try:
            try:
                return self._exchange(payload, headers)
            except _CLOSED_BY_PEER:
                if not reused:
                    raise
                self._close()  # the collector closed an idle connection: once more on a new one (ingest is idempotent)
                return self._exchange(payload, headers)
        except (OSError, http.client.HTTPException) as exc:
            self._close()
            return Delivery(ok=False, error=f"cannot reach {self.url}: {exc}")

    def _exchange(self, payload: bytes, headers: Mapping[str, str] | None) -> Delivery:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            kind = http.client.HTTPSConnection if self._https else http.client.HTTPConnection
            conn = self._local.conn = kind(*self._address, timeout=self.timeout)
        conn.request("POST", self._path, body=payload, headers=_headers(self.token, headers))
        response = conn.getresponse()
        body = response.read()
        if response.will_close:
            self._close()
        return _answer(response.status, response.reason, response.getheader("Retry-After"), body)

    def _close(self) -> None:
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            conn.close()
            self._local.conn = None


_CLOSED_BY_PEER = (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError)


def _proxied(url: str, host: str) -> bool:
    scheme = urllib.parse.urlsplit(url).scheme
    return scheme in urllib.request.getproxies() and not urllib.request.proxy_bypass(host)


def _headers(token: str | None, more: Mapping[str, str] | None = None) -> dict[str, str]:
    return {
        **(more or {}),
        "Content-Type": wire.CONTENT_TYPE,
        "Content-Encoding": wire.CONTENT_ENCODING,
        "Accept": "application/json",
        "User-Agent": "layerwatch-client",
        **({"Authorization": f"Bearer {token}"} if token else {}),
    }


def _answer(status: int, reason: str, retry_after: str | None, raw: bytes) -> Delivery:
    """A :class:`Delivery` from an HTTP answer, as :func:`post_batch` describes one."""
    body = _json(raw)
    if 200 <= status < 300:
        return Delivery(ok=True, status=status, body=body)
    detail = body.get("detail") if isinstance(body, dict) else None
    return Delivery(
        ok=False,
        status=status,
        retry_after=_retry_after(retry_after),
        body=body,
        error=f"HTTP {status}: {detail or reason}",
    )


def post_batch(
    url: str, payload: bytes, token: str | None, timeout: float, headers: Mapping[str, str] | None = None
) -> Delivery:
    request = urllib.request.Request(
        url.rstrip("/") + INGEST_PATH, data=payload, method="POST", headers=_headers(token, headers)
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return Delivery(ok=True, status=response.status, body=_json(response.read()))
    except urllib.error.HTTPError as exc:
        return _answer(exc.code, exc.reason, exc.headers.get("Retry-After"), exc.read())
    except (urllib.error.URLError, OSError, TimeoutError, ValueError) as exc:  # ValueError: a malformed URL
        reason = getattr(exc, "reason", exc)
        return Delivery(ok=False, error=f"cannot reach {url}: {reason}")


def backoff(attempt: int, retry_after: float | None, base: float = 0.5, cap: float = 30.0) -> float:
    """Full-jitter exponential backoff; a server's Retry-After is a floor, never ignored."""
    delay = random.uniform(0, min(cap, base * 2**attempt))
    return max(delay, min(retry_after, 300.0)) if retry_after else delay


def _retry_after(value: str | None) -> float | None:
    if not value:
        return None
    try:
        return max(float(value), 0.0)
    except ValueError:
        pass
    try:
        return max((parsedate_to_datetime(value) - datetime.now(timezone.utc)).total_seconds(), 0.0)
    except (TypeError, ValueError):
        return None


def _json(raw: bytes) -> dict[str, Any] | None:
    try:
        value = json.loads(raw) if raw else None
    except ValueError:
        return None
    return value if isinstance(value, dict) else None
