"""Alert latency: from the start of the ingest POST that breaks a rule to the webhook receiving the alert.

    python bench/alert_latency.py                       # ~30 s: 200 alerts at 10/s, NaN loss, SQLite
    python bench/alert_latency.py --rule dead --alerts 500 --rate 20 --healthy 4

A real collector process (SQLite, ``--no-auth``, a rules file routing every alert to one webhook) and a
local HTTP receiver in this process. Each alert is a new run whose single batch ends with a step that
breaks a rule: a NaN loss (``non_finite``) or a layer fully dead (``dead_units`` with ``for: 1``); the
steps before it are healthy. ``--healthy`` clients stream healthy runs meanwhile, so the collector is not
idle. Latency = receiver's arrival time - the time just before the POST was started (one process, one
monotonic clock). Target: p99 < 500 ms.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import yaml

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
    args = ap.parse_args()

    receiver = Receiver()
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
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
        log.close()
        receiver.server.shutdown()

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
