"""HTTP delivery of encoded batches: one POST, its outcome described, no policy.

What to do with an outcome (retry, keep, set aside) is :mod:`layerwatch.delivery`'s table. The exporter and
``layerwatch sync`` talk to a :class:`Transport`, so a test can put its own in place of HTTP where the
network is not the point.
"""

from __future__ import annotations

import json
import random
import urllib.error
import urllib.request
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
    """Where batches go: one call per attempt, never raising (a failure is a :class:`Delivery`)."""

    def post_batch(self, payload: bytes) -> Delivery: ...


@dataclass(frozen=True)
class HttpTransport:
    """The collector's ingest endpoint over HTTP(S)."""

    url: str
    token: str | None = None
    timeout: float = 10.0

    def post_batch(self, payload: bytes) -> Delivery:
        return post_batch(self.url, payload, self.token, self.timeout)


def post_batch(url: str, payload: bytes, token: str | None, timeout: float) -> Delivery:
    request = urllib.request.Request(
        url.rstrip("/") + INGEST_PATH,
        data=payload,
        method="POST",
        headers={
            "Content-Type": wire.CONTENT_TYPE,
            "Content-Encoding": wire.CONTENT_ENCODING,
            "Accept": "application/json",
            "User-Agent": "layerwatch-client",
            **({"Authorization": f"Bearer {token}"} if token else {}),
        },
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return Delivery(ok=True, status=response.status, body=_json(response.read()))
    except urllib.error.HTTPError as exc:
        body = _json(exc.read())
        detail = body.get("detail") if isinstance(body, dict) else None
        return Delivery(
            ok=False,
            status=exc.code,
            retry_after=_retry_after(exc.headers.get("Retry-After")),
            body=body,
            error=f"HTTP {exc.code}: {detail or exc.reason}",
        )
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
