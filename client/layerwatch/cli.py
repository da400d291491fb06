"""``layerwatch``: the command line for people. ``sync`` uploads offline spools; ``runs``, ``show`` and ``tail``
read a collector. Only the standard library, click and rich: it runs wherever the client is installed."""

from __future__ import annotations

import datetime as dt
import itertools
import json
import math
import os
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from queue import SimpleQueue
from typing import Any

import click
from rich.console import Console, Group
from rich.live import Live
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from layerwatch import delivery, spool, terminal_map, transport, wire

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
@click.option(
    "--in-flight",
    default=4,
    show_default=True,
    type=click.IntRange(1, 32),
    help="Batches on their way at once. Each names the one of its rank before it (a Layerwatch-Follows header), so "
    "the collector judges a rank's steps in the order they were trained, whatever order they arrive in.",
)
@click.option("--rejected", "resend_rejected", is_flag=True, help="Also resend the batches set aside in rejected/.")
def sync(
    directory: Path, url: str, token: str | None, timeout: float, retries: int, in_flight: int, resend_rejected: bool
) -> None:
    """Upload the spooled batches under DIRECTORY (an offline run, or what a run left behind).

    Uploading twice is harmless: the collector ignores steps it already has. Batches go --in-flight at a
    time over kept-alive connections, each naming the batch before it for the collector's rules to judge first; a
    spool's last batch (a run's end) goes after all the others, and what is
    marked delivered on disk never passes a batch still on its way, so a stopped sync resends, never skips. Batches the
    collector refuses as malformed are set aside in rejected/ (listed here; --rejected resends them) and the
    rest go on. Exits 1 when anything was not delivered.
    """
    spools = spool.spools_under(directory)
    rejected = [d for d in sorted(directory.rglob(spool.REJECTED)) if spool.pending_records(d)]
    if not spools and not rejected:
        _say(f"[yellow]No spooled batches under {escape(str(directory))}.[/]")
        return
    upload = _Upload(transport.KeptAliveTransport(url, token, timeout), url, retries, in_flight)
    with console.status(f"Uploading batches from {len(spools)} spool(s) to {url} ...") as upload.status:
        for d in spools:
            if not upload.drain(spool.Spool(d, max_bytes=1 << 62)):
                break
        if resend_rejected and not upload.stopped:
            for d in rejected:
                if not upload.drain(spool.Spool(d, max_bytes=1 << 62), again=spool.pending_records(d)):
                    break
                if not spool.pending_records(d):
                    (d / spool.REASONS).unlink(missing_ok=True)  # all taken: the reasons are history
    still_rejected = [(d, n) for d in sorted(directory.rglob(spool.REJECTED)) if (n := spool.pending_records(d))]
    for d, n in still_rejected:
        reasons = list(dict.fromkeys(reversed(spool.rejected_reasons(d))))[:3]
        _say(
            f"[yellow]{n} batch(es) set aside in {escape(str(d))}[/] "
            f"(the collector refused them: {escape('; '.join(reasons) or '?')}). "
            f"Resend with `layerwatch sync {escape(str(directory))} --rejected` once the collector takes them."
        )
    _say(f"[green]Uploaded {upload.sent} batch(es)[/]." if upload.sent else "Nothing uploaded.")
    if upload.failed or upload.corrupt or still_rejected:
        sys.exit(1)


class _Upload:
    """One `layerwatch sync`: each spool's records sent ``in_flight`` at a time through the shared retry loop,
    acknowledged in spool order, outcomes tallied. Only the calling thread touches the spool."""

    def __init__(self, sender: transport.Transport, url: str, retries: int, in_flight: int = 1) -> None:
        self.sender, self.url, self.retries, self.in_flight = sender, url, retries, in_flight
        self.status: Any = None
        self.sent = self.failed = self.corrupt = 0
        self.stopped = False

    def drain(self, queue: spool.Spool, again: int | None = None) -> bool:
        """Deliver ``queue`` oldest first; ``again``: resend that many set-aside batches. False: stop syncing."""
        records = queue.pending()
        if again is not None:
            records = itertools.islice(records, again)
        acks = _InOrder(queue)
        senders = _Senders(self.in_flight, self._deliver)
        flying: set[int] = set()  # turns on their way
        halted = False
        previous: tuple[tuple[str, str, int, int, int] | None, int] = (None, -1)  # the last sent: its sender, turn
        ahead = next(records, None)
        try:
            while True:
                while ahead is not None and not halted and len(flying) < self.in_flight:
                    following = next(records, None)
                    if following is None and flying:
                        break  # the last batch (a run's end) goes when all before it are delivered
                    segment, offset, payload = ahead
                    ahead, turn = following, acks.add(segment, offset)
                    if payload is None:  # an unreadable span, already set aside
                        acks.done(turn)
                    else:
                        sender = wire.sender_of(payload)
                        senders.send(turn, payload, _follows(sender, *previous, flying))
                        flying.add(turn)
                        previous = (sender, turn)
                if not flying:
                    return not self.stopped
                turn, payload, outcome, result = senders.results.get()
                flying.discard(turn)
                if self._settle(queue, payload, outcome, result, again, quiet=halted):
                    acks.done(turn)
                else:
                    halted = halted or outcome in (delivery.Outcome.RETRY, delivery.Outcome.KEEP)
        finally:
            senders.close()
            queue.head()  # removes the segments that were delivered whole
            for span in queue.corrupt:
                self.corrupt += 1
                _say(
                    f"[red]{escape(str(span.segment))}: {span.end - span.offset} unreadable bytes at byte "
                    f"{span.offset}[/] skipped (kept in {escape(str(queue.directory / spool.CORRUPT))}); "
                    "the records around them were read."
                )

    def _settle(
        self,
        queue: spool.Spool,
        payload: bytes,
        outcome: delivery.Outcome,
        result: transport.Delivery,
        again: int | None,
        quiet: bool,
    ) -> bool:
        """Act on one batch's final outcome (the table in :mod:`layerwatch.delivery`); True: it may be acknowledged.
        ``quiet``: this spool already stopped, and said why."""
        where = str(queue.directory)
        if outcome is delivery.Outcome.RETRY:
            self.failed += 1
            if not quiet:
                _say(f"[red]{escape(where)}: {escape(result.error)}[/] - stopped here; sync again later.")
            return False
        if outcome is delivery.Outcome.KEEP:
            self.failed += 1
            if not self.stopped:
                _say(f"[red]{escape(result.error)}[/]: check --url and --token; nothing more is sent.")
            self.stopped = True
            return False
        if outcome is delivery.Outcome.POISON:
            _say(f"[yellow]{escape(where)}: the collector refused a batch ({escape(result.error)})[/]")
            if again is None:
                queue.set_aside(payload, result.error)
            elif not _keep_rejected(queue, payload, result.error):
                return False  # it stays where it was
        else:
            self.sent += 1
        self.status.update(f"Uploading batches to {self.url} ... {self.sent} sent")
        return True

    def _deliver(self, payload: bytes, follows: int | None) -> tuple[delivery.Outcome, transport.Delivery]:
        sender = self.sender if follows is None else _Following(self.sender, {wire.FOLLOWS_HEADER: str(follows)})
        return delivery.deliver(sender, payload, self._wait, attempts=self.retries + 1, max_backoff=30.0)

    def _wait(self, seconds: float, result: transport.Delivery) -> bool:
        self.status.update(f"Uploading to {self.url} ... {self.sent} sent ({result.error}; retry in {seconds:.0f} s)")
        time.sleep(seconds)
        return True


def _follows(
    sender: tuple[str, str, int, int, int] | None,
    before: tuple[str, str, int, int, int] | None,
    before_turn: int,
    flying: set[int],
) -> int | None:
    """The seq a batch follows (``wire.FOLLOWS_HEADER``): that of the batch sent before it, when that one is of the
    same run, rank and process, earlier, and still on its way (one delivered needs no waiting for)."""
    if sender is None or before is None or before_turn not in flying:
        return None
    return before[4] if before[:4] == sender[:4] and before[4] < sender[4] else None


@dataclass(frozen=True)
class _Following:
    """A transport that sends its batches with ``headers`` added."""

    inner: transport.Transport
    headers: Mapping[str, str]

    def post_batch(self, payload: bytes, headers: Mapping[str, str] | None = None) -> transport.Delivery:
        return self.inner.post_batch(payload, {**self.headers, **(headers or {})})


Deliver = Callable[[bytes, int | None], tuple[delivery.Outcome, transport.Delivery]]


class _Senders:
    """Daemon threads that deliver batches, each over its own kept-alive connection, and queue the outcomes. A
    sync stopped by Ctrl-C exits at once: what was in flight is not acknowledged, so it goes again next time."""

    def __init__(self, n: int, deliver: Deliver) -> None:
        self.deliver = deliver
        self.jobs: SimpleQueue[tuple[int, bytes, int | None] | None] = SimpleQueue()
        self.results: SimpleQueue[tuple[int, bytes, delivery.Outcome, transport.Delivery]] = SimpleQueue()
        self.threads = [threading.Thread(target=self._work, name="layerwatch-sync", daemon=True) for _ in range(n)]
        for thread in self.threads:
            thread.start()

    def send(self, turn: int, payload: bytes, follows: int | None = None) -> None:
        self.jobs.put((turn, payload, follows))

    def close(self) -> None:
        for _ in self.threads:
            self.jobs.put(None)

    def _work(self) -> None:
        while (job := self.jobs.get()) is not None:
            turn, payload, follows = job
            try:
                outcome, result = self.deliver(payload, follows)
            except Exception as exc:  # a transport never raises; if one did, the batch waits for the next sync
                outcome, result = delivery.Outcome.RETRY, transport.Delivery(ok=False, error=repr(exc))
            self.results.put((turn, payload, outcome, result))


class _InOrder:
    """A spool's acknowledgements in spool order, however the deliveries finish: the offset on disk only passes
    records that are all done, so a sync stopped at any moment resends what was in flight and skips nothing."""

    def __init__(self, queue: spool.Spool) -> None:
        self.queue = queue
        self.places: list[tuple[Path, int]] = []  # (segment, offset after the record), by turn
        self.finished: set[int] = set()
        self.next = 0  # the first turn not yet acknowledged

    def add(self, segment: Path, offset: int) -> int:
        self.places.append((segment, offset))
        return len(self.places) - 1

    def done(self, turn: int) -> None:
        self.finished.add(turn)
        while self.next in self.finished:
            self.finished.discard(self.next)
            self.queue.ack(*self.places[self.next])
            self.next += 1


def _keep_rejected(queue: spool.Spool, payload: bytes, reason: str) -> bool:
    """A set-aside batch refused again goes back to the end of its rejected/ folder, with the new reason."""
    try:
        if not queue.append(payload):
            return False
        spool.note_rejection(queue.directory, reason, len(payload))
        return True
    except OSError:
        return False


def _say(text: str) -> None:
    """One line per message, never wrapped: paths stay whole for copying."""
    console.print(text, soft_wrap=True)


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
        raise click.ClickException(
            f"{exc.code} from {url}{path}: {detail}{_auth_hint(exc.code, token, detail)}"
        ) from None
    except (urllib.error.URLError, OSError) as exc:
        raise click.ClickException(f"cannot reach the collector at {url}: {getattr(exc, 'reason', exc)}") from None


def _auth_hint(status: int, token: str | None, detail: Any) -> str:
    """What to do about a refusal: reading needs a read (or admin) token, which a training job's is not."""
    if status == 401 and not token:
        return " (pass a read token with --token or LAYERWATCH_TOKEN)"
    if status == 403 and "token create" not in str(detail):
        return "; reading runs needs a read (or admin) token: layerwatch-server token create --project P --scope read"
    return ""


def _run_path(ref: str, suffix: str = "") -> str:
    """The API path of the run that ``ref`` names (its id or a unique prefix of it, as pasted from a table:
    a trailing ``…`` or ``...`` that a narrow terminal added is dropped)."""
    ref = ref.strip().rstrip("…").rstrip(".").strip()
    if not ref:
        raise click.BadParameter("give a run id (or the start of one, as `layerwatch runs` lists them)")
    return f"/api/v1/runs/{urllib.parse.quote(ref, safe='')}{suffix}"


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
    table.add_column("id", no_wrap=True, min_width=max((len(str(run.get("id"))) for run in items), default=2))
    for column in ("project", "name", "status", "last step", "last seen", "alerts"):
        table.add_column(column, overflow="fold")  # these wrap in a narrow terminal; the id, to be pasted, never
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
@click.option("--map", "as_map", is_flag=True, help="A coloured layers x steps map of the worst statistic instead.")
def show(run_id: str, url: str, token: str | None, as_map: bool) -> None:
    """Show one run (RUN_ID: its id, or the start of it): configuration, ranks, layers and open alerts."""
    run = _get(url, _run_path(run_id), token)
    run_id = run["id"]
    out.print(
        f"[bold]{_fmt(run.get('name'))}[/] ({_fmt(run.get('id'))}) in project [bold]{_fmt(run.get('project'))}[/]: "
        f"{_status(run.get('status'))}, steps {_fmt(run.get('first_step'))}..{_fmt(run.get('last_step'))}, "
        f"last seen {_ago(run.get('last_seen'))}"
    )
    if as_map:
        columns = max(10, min(200, out.width - terminal_map.LABEL - 2))
        data = _get(url, _run_path(run_id) + "/health_map", token, columns=columns)
        for line in terminal_map.lines(data):
            out.print(line)
        return
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
    listed = run.get("layers", [])
    for i, layer in enumerate(listed):
        kind = _shown_kind(layer, last=i == len(listed) - 1)
        layers.add_row(
            _fmt(layer.get("name")), _fmt(layer.get("type")), kind, _fmt(layer.get("shape")), _fmt(layer.get("units"))
        )
        if kind == "output":
            layers.caption = "output: the model's output head; its dead_frac is outputs never positive, not dead units"
    out.print(layers)
    _print_alerts(_open_alerts_of(url, run_id, token), title="Open alerts")


def _shown_kind(layer: dict[str, Any], last: bool) -> str:
    """What a layer is, as its MLflow keys name it: ``linear``/``conv`` for a Linear/Conv output, ``output`` for
    the model's last layer when it is one, else the wire kind (``relu``, ``bounded``, ``other``), which says how
    its units are judged (a Linear's is ``relu``). ``last``: the run lists its layers in model order."""
    type_ = str(layer.get("type"))
    what = "linear" if type_ in ("Linear", "Bilinear") else "conv" if type_.startswith("Conv") else None
    if what is None:
        return _fmt(layer.get("kind"))
    return "output" if last else what


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
    """Live per-layer statistics of a run (RUN_ID: its id, or the start of it), the worst layers on top, and its
    open alerts below."""
    run_id = _get(url, _run_path(run_id), token)["id"]  # a prefix, resolved once

    def render() -> Group:
        run = _get(url, _run_path(run_id), token)
        latest = _get(url, _run_path(run_id, "/latest"), token)["layers"]
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
