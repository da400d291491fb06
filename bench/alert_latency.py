"""Alert latency: from the start of the ingest POST that breaks a rule to the webhook receiving the alert; with
``--client``, the whole path from the training step that breaks to the webhook.

    python bench/alert_latency.py                       # ~30 s: 200 alerts at 10/s, NaN loss, SQLite
    python bench/alert_latency.py --rule dead --alerts 500 --rate 20 --healthy 4
    python bench/alert_latency.py --client              # ~2 min: a real training loop, every=10, 0.5 s steps

A real collector process (SQLite, ``--no-auth``, a rules file routing every alert to one webhook) and a
local HTTP receiver in this process. Each alert is a new run whose single batch ends with a step that
breaks a rule: a NaN loss (``non_finite``) or a layer fully dead (``dead_units`` with ``for: 1``); the
steps before it are healthy. ``--healthy`` clients stream healthy runs meanwhile, so the collector is not
idle. Latency = receiver's arrival time - the time just before the POST was started (one process, one
monotonic clock). Target: p99 < 500 ms.

``--client`` trains a real MLP through ``layerwatch.watch(url=..., every=10)`` in this process, each step padded
to ``--step-time`` seconds (a large model's step), and poisons a weight with a NaN at a chosen position of a
report interval (after one healthy report). It prints, per position, the latency from the start of the breaking
step to the client's own ``on_alert`` call and to the webhook, in seconds and in training steps begun after the
breaking one (each a chance to write a poisoned optimizer state or checkpoint). The loop keeps training on the
NaN, as an unattended job would, until the webhook has arrived. Without the early report the NaN would have
waited for the interval's last step (position every-1): that baseline is the last position's figure plus the
steps in between, printed beside it.

``--client --ranks 2`` runs each trial as a DDP job of that many gloo processes with the ranks' reports combined
(the default): the NaN enters the last rank's input only, and the path measured is that rank's: its preview
(``docs/reference.md``, the tripwire) against the combined report at the interval's end.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import random
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import torch
import yaml
from torch import nn

import layerwatch
from layerwatch import wire

TARGET_P99_S = 0.5


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Receiver:
    """Records when the first ``firing`` notification of each run arrives."""

    def __init__(self) -> None:
        self.arrived: dict[str, float] = {}
        self.rule: dict[str, str] = {}  # the rule of each run's first firing notification
        self.other = 0  # notifications that were not an expected firing (must stay 0 for healthy runs)
        self.lock = threading.Lock()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                now = time.perf_counter()
                key = body["run"]["key"]
                with outer.lock:
                    if body["status"] == "firing" and key.startswith("bad-") and key not in outer.arrived:
                        outer.arrived[key] = now
                        outer.rule[key] = body["alert"]["rule"]
                    else:
                        outer.other += 1
                self.send_response(200)
                self.end_headers()

            def log_message(self, *a: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}/hook"
        threading.Thread(target=self.server.serve_forever, name="receiver", daemon=True).start()


def batch(key: str, layers: int, steps: int, rule: str | None, first_step: int = 0, seq: int = 0) -> bytes:
    """A healthy batch; with ``rule``, its last step breaks it ("nan": NaN loss, "dead": layer 0 all dead)."""
    rnd = random.Random(key)
    rows = []
    for s in range(first_step, first_step + steps):
        last = rule is not None and s == first_step + steps - 1
        layer_rows = []
        for i in range(layers):
            dead = 1.0 if last and rule == "dead" and i == 0 else rnd.uniform(0.0, 0.05)
            # act_mean, act_std, act_max_abs, zero_frac, dead_frac, sat_frac, nonfinite
            layer_rows.append([i, rnd.gauss(0, 0.1), 1.0, 4.0, 0.4, dead, 0.0, 0.0])
        # grad_norm, grad_max_abs, weight_norm, update_ratio, grad_nonfinite
        param_rows = [[i, rnd.uniform(0.1, 1.0), 0.05, 10.0, 1e-3, 0.0] for i in range(layers)]
        loss = float("nan") if last and rule == "nan" else 2.0 / (1 + 0.01 * s) + rnd.uniform(0, 0.01)
        rows.append(
            {"step": s, "time": time.time(), "loss": loss, "lr": 1e-3, "grad_norm_total": 1.0, "scalars": {},
             "layers": layer_rows, "params": param_rows}
        )  # fmt: skip
    return wire.encode(
        {
            "v": wire.VERSION,
            "run": {"key": key, "name": key, "project": "bench", "world_size": 1, "config": None},
            "rank": 0,
            "host": "bench",
            "pid": os.getpid(),
            "seq": seq,
            "layers": [
                {
                    "index": i,
                    "name": f"blocks.{i}.fc",
                    "type": "Linear",
                    "kind": wire.KIND_RELU,
                    "shape": [-1, 64],
                    "units": 64,
                }
                for i in range(layers)
            ],
            "params": [
                {"index": i, "name": f"blocks.{i}.fc.weight", "shape": [64, 64], "numel": 4096} for i in range(layers)
            ],
            "layer_stats": list(wire.LAYER_STATS),
            "param_stats": list(wire.PARAM_STATS),
            "steps": rows,
            "nonfinite_origin": None,
            "end": None,
            "dropped": {"reports": 0, "batches": 0},
        }
    )


HEADERS = {"Content-Type": wire.CONTENT_TYPE, "Content-Encoding": "gzip"}


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--alerts", type=int, default=200, help="runs that each break a rule once [200]")
    ap.add_argument("--rate", type=float, default=10.0, help="alerting batches started per second [10]")
    ap.add_argument("--rule", choices=("nan", "dead"), default="nan", help="what the last step breaks [nan]")
    ap.add_argument("--healthy", type=int, default=2, help="clients streaming healthy runs meanwhile [2]")
    ap.add_argument("--layers", type=int, default=16)
    ap.add_argument("--steps", type=int, default=10, help="steps per batch [10]")
    ap.add_argument("--client", action="store_true", help="the whole path from a real training loop's step")
    ap.add_argument("--every", type=int, default=10, help="--client: steps per report [10]")
    ap.add_argument("--step-time", type=float, default=0.5, help="--client: seconds per training step [0.5]")
    ap.add_argument("--positions", default="0,3,9", help="--client: the NaN's step within the interval [0,3,9]")
    ap.add_argument("--trials", type=int, default=3, help="--client: runs per position [3]")
    ap.add_argument("--ranks", type=int, default=1, help="--client: DDP processes (gloo), NaN on the last [1]")
    args = ap.parse_args()

    receiver = Receiver()
    with collector(receiver) as (base, tmp):
        if args.client:
            return client_path(base, receiver, args)
        return collector_path(base, receiver, tmp, args)


@contextlib.contextmanager
def collector(receiver: Receiver):
    """A collector process (SQLite, no auth, every alert routed to ``receiver``): yields (base url, its folder)."""
    tmp = Path(tempfile.mkdtemp(prefix="lw-alert-bench-"))
    db_url = f"sqlite:///{tmp}/bench.db"
    from layerwatch_server.storage.migrations import upgrade

    upgrade(db_url)
    rules = {
        "rules": {"dead_units": {"for": 1}},
        "channels": {"hook": {"type": "webhook", "url": receiver.url}},
        "notify": {"max_backoff_s": 1},
    }
    (tmp / "rules.yaml").write_text(yaml.safe_dump(rules))
    port = free_port()
    # The MLflow mirror is off: on SQLite its default is an in-process MLflow store, a demo convenience whose
    # SQL shares the collector's CPU; in production MLflow is a server of its own.
    env = {**os.environ, "LAYERWATCH_NO_AUTH": "1", "LAYERWATCH_LOG_LEVEL": "warning",
           "LAYERWATCH_RULES_FILE": str(tmp / "rules.yaml"), "LAYERWATCH_MLFLOW_TRACKING_URI": "off"}  # fmt: skip
    cmd = [sys.executable, "-m", "layerwatch_server.cli", "serve", "--port", str(port), "--db", db_url]
    log = open(tmp / "collector.log", "wb")  # noqa: SIM115 - closed after the process ends
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            if proc.poll() is not None:
                raise SystemExit(f"collector exited: {(tmp / 'collector.log').read_text()[-2000:]}")
            try:
                if httpx.get(f"{base}/healthz", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise SystemExit("collector did not start")
            time.sleep(0.1)
        yield base, tmp
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
        log.close()
        receiver.server.shutdown()


class Trial:
    """One run: a healthy report, then a NaN at ``breaking``; training goes on until the webhook has come."""

    def __init__(self, base: str, receiver: Receiver, every: int, breaking: int, step_time: float) -> None:
        self.key = f"bad-{breaking}-{uuid.uuid4().hex[:6]}"
        self.receiver, self.breaking, self.step_time = receiver, breaking, step_time
        torch.manual_seed(breaking)
        self.model = nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 10))
        self.opt = torch.optim.SGD(self.model.parameters(), lr=0.01)
        self.local: tuple[int, float] | None = None  # (step, time) of the client's own non_finite on_alert call
        self.step = -1
        self.mon = layerwatch.watch(
            self.model, run_name=self.key, run_key=self.key, project="bench", url=base, every=every,
            on_alert=self.on_alert,
        )  # fmt: skip
        self.starts: list[float] = []
        self.called = 0.0  # when the breaking step called mon.step()

    def on_alert(self, alert: layerwatch.Alert) -> None:
        if alert.rule == "non_finite" and alert.local and self.local is None:
            self.local = (self.step, time.perf_counter())

    def run(self, limit: int) -> None:
        x, y = torch.randn(128, 64), torch.randint(0, 10, (128,))
        for self.step in range(limit):
            start = time.perf_counter()
            self.starts.append(start)
            if self.step == self.breaking:
                with torch.no_grad():
                    self.model[2].weight[0, 0] = float("nan")
            loss = nn.functional.cross_entropy(self.model(x), y)
            loss.backward()
            if self.step == self.breaking:
                self.called = time.perf_counter()
            self.mon.step(loss=loss, lr=0.01)
            self.opt.step()
            self.opt.zero_grad()
            if self.key in self.receiver.arrived:
                break
            time.sleep(max(self.step_time - (time.perf_counter() - start), 0.0))  # the rest of a big model's step
        self.mon.close()

    def result(self) -> tuple[float, int, float, int] | None:
        """To the local on_alert: seconds from the breaking step's mon.step() call, steps begun after the breaking
        one; to the webhook: seconds from the breaking step's start, steps begun after it."""
        hook = self.receiver.arrived.get(self.key)
        if hook is None or self.local is None:
            return None
        t0 = self.starts[self.breaking]
        after = sum(1 for t in self.starts[self.breaking + 1 :] if t < hook)
        return self.local[1] - self.called, self.local[0] - self.breaking, hook - t0, after


def ddp_trial(
    base: str, receiver: Receiver, args: argparse.Namespace, breaking: int, limit: int
) -> tuple[str, tuple[float, int, float, int] | None]:
    """One trial as a DDP job: the ranks stop together once the webhook has come (the parent tells them)."""
    import torch.multiprocessing as mp

    key = f"bad-{breaking}-{uuid.uuid4().hex[:6]}"
    ctx = mp.get_context("spawn")
    arrived, out = ctx.Event(), ctx.SimpleQueue()
    spawn_args = (args.ranks, free_port(), base, key, args.every, breaking, limit, args.step_time, arrived, out)
    job = mp.spawn(_rank_trial, args=spawn_args, nprocs=args.ranks, join=False)
    deadline = time.monotonic() + limit * args.step_time + 120
    while not job.join(timeout=0.02):
        if key in receiver.arrived:
            arrived.set()
        if time.monotonic() > deadline:
            for process in job.processes:
                process.terminate()
            return key, None
    hook = receiver.arrived.get(key)
    found = [out.get() for _ in range(args.ranks)]
    starts, called, local = next((s, c, lo) for rank, s, c, lo in found if rank == args.ranks - 1)
    if hook is None or local is None:
        return key, None
    after = sum(1 for t in starts[breaking + 1 :] if t < hook)
    return key, (local[1] - called, local[0] - breaking, hook - starts[breaking], after)


def _rank_trial(
    rank: int, world: int, port: int, base: str, key: str, every: int, breaking: int, limit: int,
    step_time: float, arrived, out,
) -> None:  # fmt: skip
    """A rank of a DDP trial. perf_counter is CLOCK_MONOTONIC on Linux: one clock for every process here."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    logging.getLogger("layerwatch").setLevel(logging.ERROR)  # the ranks' NaN warnings would drown the table
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        torch.manual_seed(breaking)
        model = DistributedDataParallel(
            nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 10))
        )
        opt = torch.optim.SGD(model.parameters(), lr=0.01)
        step, local, called, starts = -1, None, 0.0, []

        def on_alert(alert: layerwatch.Alert) -> None:
            nonlocal local
            if alert.rule == "non_finite" and alert.local and local is None:
                local = (step, time.perf_counter())

        mon = layerwatch.watch(
            model, run_name=key, run_key=key, project="bench", url=base, every=every, on_alert=on_alert
        )
        x, y = torch.randn(128, 64), torch.randint(0, 10, (128,))
        for step in range(limit):
            start = time.perf_counter()
            starts.append(start)
            batch = x.clone()
            if step == breaking and rank == world - 1:
                batch[0, 0] = float("nan")  # this rank's data only
            loss = nn.functional.cross_entropy(model(batch), y)
            loss.backward()
            if step == breaking:
                called = time.perf_counter()
            mon.step(loss=loss, lr=0.01)
            opt.step()
            opt.zero_grad()
            done = torch.tensor([float(arrived.is_set())])
            dist.all_reduce(done, op=dist.ReduceOp.MAX)  # the loop's own sync: every rank stops at the same step
            if done.item():
                break
            time.sleep(max(step_time - (time.perf_counter() - start), 0.0))
        mon.close()
        out.put((rank, starts, called, local))
    finally:
        dist.destroy_process_group()


def client_path(base: str, receiver: Receiver, args: argparse.Namespace) -> int:
    """The whole path: a training step that breaks -> the client's own on_alert, and -> the webhook."""
    positions = [int(p) for p in args.positions.split(",")]
    print(f"whole path: every={args.every}, step time {args.step_time:.2f} s, {args.trials} runs per position; "
          f"torch {torch.__version__} on CPU ({torch.get_num_threads()} threads)")  # fmt: skip
    print(f"{'NaN at':>8} | {'on_alert (local), from step()':>30} | {'webhook, from the step start':>28} | "
          f"{'webhook without early report':>30}")  # fmt: skip
    rows: dict[int, list[tuple[float, int, float, int]]] = {}
    missing = 0
    if args.ranks > 1:
        print(f"DDP: {args.ranks} gloo processes, reports combined across ranks; the NaN on rank {args.ranks - 1} only")
    for position in positions:
        for _ in range(args.trials):
            breaking, limit = args.every + position, 3 * args.every + position
            if args.ranks > 1:
                key, result = ddp_trial(base, receiver, args, breaking, limit)
            else:
                trial = Trial(base, receiver, args.every, breaking, args.step_time)
                trial.run(limit)
                deadline = time.monotonic() + 15
                while trial.key not in receiver.arrived and time.monotonic() < deadline:
                    time.sleep(0.02)
                key, result = trial.key, trial.result()
            if result is None or receiver.rule.get(key) != "non_finite":
                missing += 1
                continue
            rows.setdefault(position, []).append(result)
    last = rows.get(args.every - 1)
    for position in positions:
        got = rows.get(position, [])
        if not got:
            print(f"{position:>5}/{args.every} | nothing arrived")
            continue
        local_s, local_steps, hook_s, hook_steps = (statistics.median(c) for c in zip(*got, strict=True))
        baseline = "-"
        if last:  # the last position's path, reached (every-1-position) steps later
            wait = args.every - 1 - position
            base_s = statistics.median(r[2] for r in last) + wait * args.step_time
            base_steps = statistics.median(r[3] for r in last) + wait
            baseline = f"{base_s:6.2f} s, {base_steps:4.1f} steps"
        print(f"{position:>5}/{args.every} | {local_s * 1e3:12.1f} ms, {local_steps:4.1f} steps later | "
              f"{hook_s:9.2f} s, {hook_steps:4.1f} steps later | {baseline:>30}")  # fmt: skip
    worst = max((r[2] for got in rows.values() for r in got), default=float("nan"))
    print(f"medians over {args.trials} runs; worst webhook {worst:.2f} s; runs without a non_finite page: {missing}; "
          "steps = training steps begun after the breaking one")  # fmt: skip
    return 0 if missing == 0 and rows else 1


def collector_path(base: str, receiver: Receiver, tmp: Path, args: argparse.Namespace) -> int:
    """Runs that each break a rule in one POSTed batch, at a fixed rate, while healthy clients stream."""
    stop = threading.Event()
    healthy_sent = [0]

    def healthy(n: int) -> None:
        with httpx.Client(base_url=base, timeout=30) as c:
            key, step, seq = f"ok-{n}-{uuid.uuid4().hex[:6]}", 0, 0
            while not stop.is_set():
                r = c.post("/api/v1/ingest", content=batch(key, args.layers, args.steps, None, step, seq),
                           headers=HEADERS)  # fmt: skip
                r.raise_for_status()
                step, seq = step + args.steps, seq + 1
                healthy_sent[0] += 1
                stop.wait(0.1)

    workers = [threading.Thread(target=healthy, args=(n,), daemon=True) for n in range(args.healthy)]
    for w in workers:
        w.start()

    started: dict[str, float] = {}
    answered: dict[str, float] = {}
    post_s: list[float] = []
    errors: list[str] = []
    lock = threading.Lock()
    bodies = [(f"bad-{i}-{uuid.uuid4().hex[:6]}", i) for i in range(args.alerts)]
    payloads = {k: batch(k, args.layers, args.steps, args.rule) for k, _ in bodies}

    def send(key: str, client: httpx.Client) -> None:
        t0 = time.perf_counter()
        with lock:
            started[key] = t0
        try:
            r = client.post("/api/v1/ingest", content=payloads[key], headers=HEADERS)
            r.raise_for_status()
        except httpx.HTTPError as exc:
            errors.append(f"{key}: {exc}")
        with lock:
            answered[key] = time.perf_counter()
            post_s.append(answered[key] - t0)

    # an open-loop schedule: batch i starts at i / rate, whatever the previous ones are doing
    senders = 8
    t_start = time.perf_counter()

    def paced(offset: int) -> None:
        with httpx.Client(base_url=base, timeout=30) as c:
            for key, i in bodies[offset::senders]:
                delay = t_start + i / args.rate - time.perf_counter()
                if delay > 0:
                    time.sleep(delay)
                send(key, c)

    pool = [threading.Thread(target=paced, args=(k,)) for k in range(senders)]
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    deadline = time.monotonic() + 15
    while len(receiver.arrived) < args.alerts and time.monotonic() < deadline:
        time.sleep(0.05)
    stop.set()
    for w in workers:
        w.join(timeout=30)
    elapsed = time.perf_counter() - t_start

    lat = [receiver.arrived[k] - started[k] for k in started if k in receiver.arrived]
    print(f"rule={args.rule} alerts={args.alerts} rate={args.rate}/s healthy_clients={args.healthy} "
          f"layers={args.layers} steps/batch={args.steps} elapsed={elapsed:.1f}s")  # fmt: skip
    print(f"healthy batches ingested meanwhile: {healthy_sent[0]}")
    print(f"notified {len(lat)}/{args.alerts}; post errors {len(errors)}; unexpected notifications {receiver.other}")
    if post_s:
        print(f"ingest POST      p50 {pct(post_s, 0.5) * 1e3:7.1f} ms  p99 {pct(post_s, 0.99) * 1e3:7.1f} ms")
    if lat:
        p50, p90, p99 = pct(lat, 0.5), pct(lat, 0.9), pct(lat, 0.99)
        print(f"POST->webhook    p50 {p50 * 1e3:7.1f} ms  p90 {p90 * 1e3:7.1f} ms  p99 {p99 * 1e3:7.1f} ms  "
              f"max {max(lat) * 1e3:7.1f} ms")  # fmt: skip
        after = [receiver.arrived[k] - answered[k] for k in answered if k in receiver.arrived]
        print(f"response->webhook p50 {pct(after, 0.5) * 1e3:6.1f} ms  p99 {pct(after, 0.99) * 1e3:7.1f} ms"
              "  (negative: the webhook came before the ingest response)")  # fmt: skip
        ok = p99 < TARGET_P99_S and len(lat) == args.alerts and receiver.other == 0
        print(f"target p99 < {TARGET_P99_S * 1e3:.0f} ms, every alert notified once: {'met' if ok else 'MISSED'}")
        return 0 if ok else 1
    print("no notification arrived; collector log:", tmp / "collector.log")
    return 1


if __name__ == "__main__":
    sys.exit(main())
