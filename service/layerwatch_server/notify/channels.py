"""Delivery to one receiver: generic webhook, Slack-compatible webhook, Alertmanager, email (SMTP).

Each ``send`` raises :class:`DeliveryError`; ``permanent`` (a 4xx other than 408/429) means retrying
cannot help, so the sender records it instead of retrying.
"""

from __future__ import annotations

import datetime as dt
import smtplib
from email.message import EmailMessage
from typing import Any

import httpx

from layerwatch_server.notify.config import Channel
from layerwatch_server.notify.payload import text

_RETRYABLE_4XX = (408, 425, 429)


class DeliveryError(Exception):
    def __init__(self, message: str, *, permanent: bool = False, status: int | None = None) -> None:
        super().__init__(message)
        self.permanent, self.status = permanent, status


def _post(client: httpx.Client, ch: Channel, url: str, body: Any, key: str) -> int:
    headers = {"Idempotency-Key": key, "User-Agent": "layerwatch-collector", **ch.headers}
    try:
        resp = client.post(url, json=body, headers=headers, timeout=ch.timeout_s)
    except httpx.HTTPError as exc:
        raise DeliveryError(f"{type(exc).__name__}: {exc}") from None
    if resp.status_code >= 400:
        permanent = resp.status_code < 500 and resp.status_code not in _RETRYABLE_4XX
        raise DeliveryError(f"HTTP {resp.status_code}: {resp.text[:300]}", permanent=permanent, status=resp.status_code)
    return resp.status_code


def alertmanager_alert(p: dict[str, Any], renotify_s: float) -> dict[str, Any]:
    """One Alertmanager v2 alert. A firing alert ends after two re-notification periods unless re-sent."""
    a, run = p["alert"], p["run"]
    labels = {
        "alertname": a["rule"],
        "severity": a["severity"],
        "project": run["project"],
        "run_id": run["id"],
        "run": str(run["name"] or run["id"]),
        "rank": str(run["rank"]),
        "layer": a["layer"] or "",
        "source": "layerwatch",
    }
    annotations = {
        "summary": a["message"][:500],
        "description": text(p),
        "step": str(a["step"]),
        "value": str(a["value"]),
        "threshold": str(a["threshold"]),
        "layers": ", ".join(p.get("incident", {}).get("layers") or []),
    }
    start = a["fired_at"] or a["started_at"]
    if p["status"] == "resolved":
        end = a["resolved_at"]
    else:
        end = (dt.datetime.now(dt.timezone.utc) + dt.timedelta(seconds=2 * renotify_s)).isoformat()
    out = {"labels": labels, "annotations": annotations, "startsAt": start, "endsAt": end}
    link = p.get("links", {}).get("mlflow") or p.get("links", {}).get("alert")
    if link:
        out["generatorURL"] = link
    return out


def send(ch: Channel, payload: dict[str, Any], key: str, client: httpx.Client, renotify_s: float) -> int | None:
    if ch.type == "webhook":
        return _post(client, ch, ch.url or "", payload, key)
    if ch.type == "slack":
        return _post(client, ch, ch.url or "", {"text": text(payload)}, key)
    if ch.type == "alertmanager":
        url = f"{(ch.url or '').rstrip('/')}/api/v2/alerts"
        return _post(client, ch, url, [alertmanager_alert(payload, renotify_s)], key)
    return send_email(ch, payload, key)


def send_email(ch: Channel, payload: dict[str, Any], key: str) -> None:
    a = payload["alert"]
    msg = EmailMessage()
    status = "RESOLVED" if payload["status"] == "resolved" else a["severity"].upper()
    msg["Subject"] = f"[layerwatch {status}] {a['rule']} {a['layer'] or ''} run {payload['run']['name']}".strip()
    msg["From"], msg["To"] = ch.sender, ", ".join(ch.to)
    msg["Message-ID"] = f"<{key}@layerwatch>"  # the idempotency key: receivers can drop a re-delivery
    msg.set_content(text(payload))
    try:
        with smtplib.SMTP(ch.host or "localhost", ch.port, timeout=ch.timeout_s) as smtp:
            if ch.starttls:
                smtp.starttls()
            if ch.username:
                smtp.login(ch.username, ch.password or "")
            smtp.send_message(msg)
    except smtplib.SMTPResponseException as exc:
        raise DeliveryError(f"SMTP {exc.smtp_code}: {exc.smtp_error!r}", permanent=500 <= exc.smtp_code < 600) from None
    except (OSError, smtplib.SMTPException) as exc:
        raise DeliveryError(f"{type(exc).__name__}: {exc}") from None
    return None
