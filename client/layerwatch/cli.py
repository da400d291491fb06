"""``layerwatch``: the command line for people. ``sync`` uploads offline spools; ``runs``, ``show`` and ``tail``
read a collector. Only the standard library, click and rich: it runs wherever the client is installed."""

from __future__ import annotations

import datetime as dt
import json
import math
import os
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click
from rich.console import Console, Group
from rich.live import Live
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from layerwatch import spool, transport

console = Console(stderr=True)
out = Console()

url_option = click.option(
    "--url",
    envvar="LAYERWATCH_URL",
    default="http://127.0.0.1:8765",
    show_default=True,
    help="Collector URL (LAYERWATCH_URL).",
)
token_option = click.option("--token", envvar="LAYERWATCH_TOKEN", default=None, help="Token (LAYERWATCH_TOKEN).")


@click.group()
@click.version_option(package_name="layerwatch")
def main() -> None:
    """layerwatch: per-layer training health for PyTorch."""


# -- sync ---------------------------------------------------------------------------------------------------
@main.command()
@click.argument("directory", type=click.Path(exists=True, file_okay=False, path_type=Path))
@url_option
@token_option
@click.option("--timeout", default=30.0, show_default=True, help="Seconds per request.")
@click.option("--retries", default=8, show_default=True, help="Attempts per batch on retryable errors.")
def sync(directory: Path, url: str, token: str | None, timeout: float, retries: int) -> None:
    """Upload the spooled batches under DIRECTORY (an offline run, or what a run left behind), in order.

    Uploading twice is harmless: the collector ignores steps it already has.
    """
    dirs = sorted({seg.parent for seg in directory.rglob(f"*{spool.SUFFIX}") if seg.parent.name != "rejected"})
    if not dirs:
        console.print(f"[yellow]No spooled batches under {directory}.[/]")
        return
    sent = failed = 0
    total = sum(spool.pending_records(d) for d in dirs)
    with console.status(f"Uploading {total} batches from {len(dirs)} spool(s) to {url} ...") as status:
        for d in dirs:
            queue = spool.Spool(d, max_bytes=1 << 62)
            while (head := queue.head()) is not None:
                segment, offset, payload = head
                result = _deliver(
                    url,
                    payload,
                    token,
                    timeout,
                    retries,
                    lambda error, wait, done=sent: status.update(
                        f"Uploading batches to {url} ... {done}/{total} ({error}; retrying in {wait:.0f} s)"
                    ),
                )
                if not result.ok:
                    failed += 1
                    console.print(f"[red]{d}: {result.error}[/] - stopping here; run sync again to resume.")
                    break
                queue.ack(segment, offset)
                sent += 1
                status.update(f"Uploading batches to {url} ... {sent}/{total}")
    console.print(f"[green]Uploaded {sent} batch(es)[/] from {len(dirs)} spool(s)." if sent else "Nothing uploaded.")
    if failed:
        sys.exit(1)


def _deliver(
    url: str,
    payload: bytes,
    token: str | None,
    timeout: float,
    retries: int,
    on_retry: Callable[[str, float], None] | None = None,
) -> transport.Delivery:
    result = transport.post_batch(url, payload, token, timeout)
    attempt = 0
    while not result.ok and result.retryable and attempt < retries:
        wait = transport.backoff(attempt, result.retry_after)
        if on_retry is not None:
            on_retry(str(result.error), wait)
        time.sleep(wait)
        attempt += 1
        result = transport.post_batch(url, payload, token, timeout)
    return result


# -- reading a collector ------------------------------------------------------------------------------------
def _get(url: str, path: str, token: str | None, **params: Any) -> Any:
    query = urllib.parse.urlencode({k: v for k, v in params.items() if v is not None})
    request = urllib.request.Request(
        url.rstrip("/") + path + (f"?{query}" if query else ""),
        headers={"Accept": "application/json", **({"Authorization": f"Bearer {token}"} if token else {})},
    )
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return json.loads(response.read())
    except urllib.error.HTTPError as exc:
        try:
            detail = json.loads(exc.read()).get("detail")
        except (ValueError, AttributeError):
            detail = exc.reason
        raise click.ClickException(f"{exc.code} from {url}{path}: {detail}") from None
    except (urllib.error.URLError, OSError) as exc:
        raise click.ClickException(f"cannot reach the collector at {url}: {getattr(exc, 'reason', exc)}") from None


def _fmt(value: Any) -> str:
    """A value as table text: numbers short, None as '-', brackets escaped (rich would read `run[3]` as markup)."""
    if value is None:
        return "-"
    if isinstance(value, float) and math.isfinite(value):
        return f"{value:.4g}"
    return escape(str(value))


def _ago(iso: str | None, now: float | None = None) -> str:
    """'42 s ago', '5 min ago', '3 h ago', '2 d ago' for an ISO timestamp from the API (as given if unparsable)."""
    if not iso:
        return "-"
    try:
        then = dt.datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp()  # 3.10 reads no "Z"
    except ValueError:
        return iso
    seconds = (time.time() if now is None else now) - then
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if seconds >= size:
            return f"{seconds // size:.0f} {unit} ago"
    return f"{max(seconds, 0):.0f} s ago"


@main.command()
@url_option
@token_option
@click.option("--project", default=None, help="Only this project.")
@click.option("--status", default=None, help="Only runs in this status (running, finished, failed, ...).")
def runs(url: str, token: str | None, project: str | None, status: str | None) -> None:
    """List runs."""
    data = _get(url, "/api/v1/runs", token, project=project, status=status)
    items = data.get("runs", data) if isinstance(data, dict) else data
    table = Table(title=f"Runs at {url}")
    for column in ("id", "project", "name", "status", "last step", "last seen", "alerts"):
        table.add_column(column)
    for run in items:
        table.add_row(
            _fmt(run.get("id")),
            _fmt(run.get("project")),
            _fmt(run.get("name")),
            _status(run.get("status")),
            _fmt(run.get("last_step")),
            _ago(run.get("last_seen")),
            _alert_counts(run),
        )
    out.print(table)


def _alert_counts(run: dict[str, Any]) -> str:
    firing, pending = run.get("firing_alerts") or 0, run.get("pending_alerts") or 0
    parts = ([f"[red]{firing} firing[/]"] if firing else []) + ([f"[yellow]{pending} pending[/]"] if pending else [])
    return ", ".join(parts) or "-"


def _status(status: str | None) -> str:
    colour = {"running": "cyan", "finished": "green", "failed": "red", "killed": "red", "stalled": "yellow"}
    return f"[{colour.get(status or '', 'white')}]{status}[/]"


@main.command()
@click.argument("run_id")
@url_option
@token_option
def show(run_id: str, url: str, token: str | None) -> None:
    """Show one run: its configuration, ranks, layers and open alerts."""
    run = _get(url, f"/api/v1/runs/{run_id}", token)
    out.print(
        f"[bold]{_fmt(run.get('name'))}[/] ({_fmt(run.get('id'))}) in project [bold]{_fmt(run.get('project'))}[/]: "
        f"{_status(run.get('status'))}, steps {_fmt(run.get('first_step'))}..{_fmt(run.get('last_step'))}, "
        f"last seen {_ago(run.get('last_seen'))}"
    )
    if run.get("mlflow_run_id"):
        out.print(f"MLflow run: {run['mlflow_run_id']}")
    if run.get("nonfinite_origin"):
        origin = run["nonfinite_origin"]
        out.print(
            f"[red]First NaN/Inf[/]: step {origin.get('step')}, {origin.get('pass')} pass, "
            f"layer {_fmt(origin.get('layer'))}, rank {origin.get('rank')}"
        )
    config = run.get("config") or {}
    hparams = config.get("hparams") or {}
    settings = {**{k: v for k, v in config.items() if k != "hparams"}, **hparams}
    if settings:
        out.print("Config: " + ", ".join(f"{_fmt(k)}={_fmt(v)}" for k, v in settings.items()))
    ranks = Table(title="Ranks")
    for column in ("rank", "host", "pid", "last seen", "dropped reports", "dropped batches"):
        ranks.add_column(column)
    for r in run.get("ranks", []):
        ranks.add_row(
            *(_fmt(r.get(k)) for k in ("rank", "host", "pid")),
            _ago(r.get("last_seen")),
            *(_fmt(r.get(k)) for k in ("dropped_reports", "dropped_batches")),
        )
    out.print(ranks)
    layers = Table(title="Layers")
    for column in ("name", "type", "kind", "shape", "units"):
        layers.add_column(column)
    for layer in run.get("layers", []):
        layers.add_row(
            _fmt(layer.get("name")),
            _fmt(layer.get("type")),
            _fmt(layer.get("kind")),
            _fmt(layer.get("shape")),
            _fmt(layer.get("units")),
        )
    out.print(layers)
    _print_alerts(_open_alerts_of(url, run_id, token), title="Open alerts")


def _print_alerts(alerts: list[dict[str, Any]], title: str = "Alerts") -> None:
    if alerts:
        out.print(_alerts_table(alerts, title))


def _alerts_table(alerts: list[dict[str, Any]], title: str) -> Table:
    table = Table(title=title)
    for column in ("rule", "state", "severity", "layer", "step", "value", "message"):
        table.add_column(column)
    for alert in alerts:
        table.add_row(*(_fmt(alert.get(k)) for k in ("rule", "state", "severity", "layer", "step", "value", "message")))
    return table


def _open_alerts_of(url: str, run_id: str, token: str | None) -> list[dict[str, Any]]:
    return [a for a in _get(url, "/api/v1/alerts", token, run_id=run_id) if a.get("state") in ("pending", "firing")]


TAIL_STATS = ("dead_frac", "zero_frac", "act_mean", "act_std", "act_max_abs", "sat_frac", "nonfinite")


@main.command()
@click.argument("run_id")
@url_option
@token_option
@click.option("--interval", default=2.0, show_default=True, help="Seconds between refreshes.")
@click.option("--rows", default=25, show_default=True, help="Layers shown (worst dead_frac first).")
@click.option("--once", is_flag=True, help="Print one table and exit.")
def tail(run_id: str, url: str, token: str | None, interval: float, rows: int, once: bool) -> None:
    """Live per-layer statistics of a run, the worst layers on top, and its open alerts below."""

    def render() -> Group:
        run = _get(url, f"/api/v1/runs/{run_id}", token)
        latest = _get(url, f"/api/v1/runs/{run_id}/latest", token)["layers"]
        latest.sort(key=lambda layer: (-_num(_dead(layer)), -_num(layer.get("nonfinite"))))
        title = f"{_fmt(run.get('name'))} {_status(run.get('status'))} step {_fmt(run.get('last_step'))}"
        table = Table(title=title)
        table.add_column("layer")
        table.add_column("type")
        for stat in TAIL_STATS:
            table.add_column(stat, justify="right")
        for layer in latest[:rows]:
            cells = [_fmt(layer.get(s)) for s in TAIL_STATS]
            if _dead(layer) is None and layer.get("dead_frac") is not None:
                cells[0] = f"[dim]({cells[0]})[/]"
                table.caption = "(dead_frac): an output head's or a pre-activation's, not dead units"
            table.add_row(_fmt(layer["name"]), _fmt(layer.get("type")), *cells)
        alerts = _open_alerts_of(url, run_id, token)
        return Group(table, _alerts_table(alerts, "Open alerts") if alerts else Text("No open alerts.", style="green"))

    if once:
        out.print(render())
        return
    with Live(render(), console=out, refresh_per_second=4) as live:
        try:
            while True:
                time.sleep(interval)
                live.update(render())
        except KeyboardInterrupt:
            pass


def _dead(layer: dict[str, Any]) -> Any:
    """A layer's dead_frac where it means dead units (the collector says so per layer), else None."""
    return layer.get("dead_frac") if layer.get("dead_judged", True) else None


def _num(value: Any) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return -1.0
    return number if not math.isnan(number) else -1.0


if __name__ == "__main__":  # pragma: no cover
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
