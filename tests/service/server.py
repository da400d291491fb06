"""A real collector process on a free loopback port, for end-to-end tests and the bench."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx

from tests.waiting import wait_until


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until_ready(proc: subprocess.Popen, url: str, log_path: Path, what: str, timeout: float = 30) -> None:
    """Poll ``url`` until it answers 200; fail with the tail of the process's log if it exits or times out."""

    def answers() -> bool:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode}: {log_path.read_text()[-2000:]}")
        try:
            return httpx.get(url, timeout=1).status_code == 200
        except httpx.TransportError:
            return False

    wait_until(answers, timeout, lambda: f"{what} to start: {log_path.read_text()[-2000:]}", interval=0.1)


@contextmanager
def running_server(
    db_url: str,
    *,
    log_path: Path,
    env: dict[str, str] | None = None,
    args: tuple[str, ...] = (),
    port: int | None = None,
) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    """``layerwatch-server serve`` on 127.0.0.1:<port, default a free one>; SIGTERM and wait on exit."""
    port = port or free_port()
    full_env = {**os.environ, "LAYERWATCH_LOG_LEVEL": "info", **(env or {})}
    cmd = [sys.executable, "-m", "layerwatch_server.cli", "serve", "--port", str(port), "--db", db_url, *args]
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, env=full_env, stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_until_ready(proc, f"{base}/healthz", log_path, "server")
        yield base, proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
