"""A real HTTP server standing in for the collector in client tests: it decodes batches with the wire module
and can be switched between healthy, overloaded (503 + Retry-After), slow, refusing (401), answering any status
(``mode = "status"``, ``status = 500``), refusing chosen batches as malformed (``poison``) and down.
(The real collector has its own end-to-end tests; this one lets a test script outages deterministically.)"""

from __future__ import annotations

import contextlib
import json
import threading
import time
from collections import Counter
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from layerwatch import wire


class FakeCollector:
    def __init__(self, port: int = 0) -> None:
        self.mode = "ok"  # ok | busy | slow | unauthorized | reject | status
        self.status = 500  # what mode "status" answers
        self.poison: Callable[[dict[str, Any]], bool] | None = None  # batches answered 422 in mode "ok"
        self.slow_seconds = 0.0
        self.batches: list[dict[str, Any]] = []
        self.received: Counter = Counter()  # (run key, rank, step) -> times received
        self.alerts: list[dict[str, Any]] = []
        self.requests = 0
        self.refused = 0  # batches answered 422 by `poison`
        self._lock = threading.Lock()
        collector = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                with collector._lock:
                    collector.requests += 1
                    mode = collector.mode
                if mode == "busy":
                    return self._answer(503, b'{"detail": "busy"}', {"Retry-After": "0.05"})
                if mode == "unauthorized":
                    return self._answer(401, b'{"detail": "invalid token"}')
                if mode == "reject":
                    return self._answer(422, b'{"detail": "steps.0.step: not an integer"}')
                if mode == "status":
                    return self._answer(collector.status, b'{"detail": "scripted answer"}')
                batch = wire.decode(body, self.headers["Content-Type"], self.headers.get("Content-Encoding"))
                if collector.poison is not None and collector.poison(batch):
                    with collector._lock:
                        collector.refused += 1
                    return self._answer(422, b'{"detail": "run.config: nested too deep"}')
                if mode == "slow":
                    time.sleep(collector.slow_seconds)
                with collector._lock:
                    collector.batches.append(batch)
                    for step in batch["steps"]:
                        collector.received[(batch["run"]["key"], batch["rank"], step["step"])] += 1
                    alerts = list(collector.alerts)
                self._answer(202, json.dumps({"accepted": len(batch["steps"]), "alerts": alerts}).encode())

            def _answer(self, code: int, body: bytes, headers: dict[str, str] | None = None) -> None:
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                for key, value in (headers or {}).items():
                    self.send_header(key, value)
                self.end_headers()
                with contextlib.suppress(BrokenPipeError):  # the client gave up waiting: a 'slow' test
                    self.wfile.write(body)

        self._handler = Handler
        self._server: ThreadingHTTPServer | None = None
        self.port = port
        self.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        self._server = ThreadingHTTPServer(("127.0.0.1", self.port), self._handler)
        self._server.daemon_threads = True
        self.port = self._server.server_address[1]
        threading.Thread(target=self._server.serve_forever, daemon=True).start()

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def steps(self) -> set[tuple[str, int, int]]:
        with self._lock:
            return set(self.received)
