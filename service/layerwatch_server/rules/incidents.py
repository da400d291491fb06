"""One page per cause: alert transitions become notifications per (run, rule) incident, not per layer.

The API keeps one alert per (run, rule, layer); a cause (a dead network, a vanishing net) breaks many layers at
once. The first alert of a rule to fire while none of its peers is paged opens the incident and is notified,
naming every layer of the rule firing by then; the others join it silently. The incident's lead is the alert
whose ``notified_at`` is set (re-notification follows it, so one per incident): when it clears while peers
still fire, the next firing peer takes the lead without a page; when the last one clears, the incident's
resolution is notified.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from layerwatch_server.storage.alerts import Obs
from layerwatch_server.storage.models import AlertRow

Page = Callable[[Any, str, "Obs | None", list[str]], None]  # (alert, firing|resolved, obs, the incident's layers)


def incident_layers(alerts: Iterable[Any], rule: str, state: str = "firing") -> list[str]:
    """The named layers of a run's alerts of ``rule`` in ``state`` (run-level variants have no layer)."""
    return sorted(a.layer_key for a in alerts if a.rule == rule and a.state == state and a.layer_key)


def page(events: list[tuple[Any, str, Obs | None]], alerts: Iterable[AlertRow], send: Page) -> None:
    """Notify ``events`` (alert, firing|resolved, obs, in order), the run's ``alerts`` in their state after them."""
    if not events:
        return
    every = list(alerts)
    for row, status, obs in events:
        peers = [a for a in every if a.rule == row.rule and a is not row]
        if status == "firing":
            if any(a.state == "firing" and a.notified_at is not None for a in peers):
                continue  # the incident is paged already: this layer joins it
            send(row, status, obs, incident_layers(every, row.rule))
            continue
        if row.notified_at is None or row.state != "resolved":
            continue  # never paged itself (it joined another's incident), or breached again since
        heir = next((a for a in peers if a.state == "firing"), None)
        if heir is not None:  # the incident goes on: the next firing layer leads it, no page
            heir.notified_at = heir.notified_at or row.notified_at
            continue
        resolved = [a.layer_key for a in every if a.rule == row.rule and a.resolved_at == row.resolved_at]
        send(row, status, obs, sorted(x for x in resolved if x))
