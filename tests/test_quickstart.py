"""The README's Quickstart, executed as written, in a fresh virtual environment.

The code blocks are read from README.md and run in order: the bash lines in a shell of the new venv, in a copy of
the checkout (``pip install .`` builds and installs the wheel for real; see tests/fresh_install.py for how the
dependencies are there without a network), ``layerwatch-server serve`` in the background, the Python snippets
with the venv's interpreter. What the test changes, and only that: the collector listens on a free port instead
of 8765 (``LAYERWATCH_PORT`` for ``serve``, ``LAYERWATCH_URL`` for ``layerwatch runs``, the port replaced in the
snippets' URLs), and the training snippet is preceded by the ``model``, ``loader``, ``criterion`` and ``opt`` it
instruments, which are the reader's own.
"""

from __future__ import annotations

import re
import signal
import subprocess
from pathlib import Path

import httpx
import pytest

from tests.fresh_install import ROOT, checkout_copy, fresh_venv
from tests.service.server import free_port, wait_until_ready

pytestmark = [pytest.mark.slow]

# What the reader already has when they paste the training snippet.
READERS_TRAINING = """\
import torch
from torch import nn

torch.manual_seed(0)
model = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 2))
loader = [(torch.randn(16, 8), torch.randint(0, 2, (16,))) for _ in range(30)]
criterion = nn.CrossEntropyLoss()
opt = torch.optim.SGD(model.parameters(), lr=0.1)
"""


def quickstart_blocks() -> list[tuple[str, str]]:
    """(language, code) of each fenced block of the README's Quickstart section, in order."""
    text = (ROOT / "README.md").read_text()
    section = text[text.index("## Quickstart") : text.index("### No route to the collector?")]
    return re.findall(r"```(\w+)\n(.*?)```", section, re.S)


def shell_lines(code: str) -> list[str]:
    """A bash block's commands, comments dropped."""
    return [line.split("  #")[0].strip() for line in code.splitlines() if line.strip()]


def run(cmd: str, env: dict[str, str], cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["bash", "-euo", "pipefail", "-c", cmd], env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout
    )


def test_the_quickstart_runs_as_written(tmp_path):
    blocks = quickstart_blocks()
    assert [lang for lang, _ in blocks] == ["bash", "bash", "python", "bash", "python"], blocks
    port = free_port()
    install, token_step, training, reading, on_alert = (code.replace(":8765", f":{port}") for _, code in blocks)
    checkout = checkout_copy(tmp_path / "layerwatch")
    env = fresh_venv(tmp_path / "venv", ["layerwatch[server]"])

    *installs, serve = shell_lines(install)
    assert serve == "layerwatch-server serve" and all(line.startswith("pip install") for line in installs)
    for line in installs:
        done = run(line, env, checkout)
        assert done.returncode == 0, f"{line}:\n{done.stdout[-3000:]}{done.stderr[-3000:]}"
    log_path = tmp_path / "serve.log"
    with open(log_path, "wb") as log:
        server = subprocess.Popen(
            ["bash", "-c", f"exec {serve}"], env={**env, "LAYERWATCH_PORT": str(port)}, cwd=checkout,
            stdout=log, stderr=subprocess.STDOUT,
        )  # fmt: skip
    try:
        wait_until_ready(server, f"http://127.0.0.1:{port}/readyz", log_path, "layerwatch-server serve", timeout=120)
        # The second terminal, in the same folder: the token step exports LAYERWATCH_TOKEN.
        made = run(f'{token_step}\nprintf %s "$LAYERWATCH_TOKEN"', env, checkout)
        assert made.returncode == 0, made.stderr
        env["LAYERWATCH_TOKEN"] = made.stdout
        assert env["LAYERWATCH_TOKEN"].startswith("lw_")

        # The training script: the reader's model and loop, instrumented as the snippet says; then the on_alert
        # snippet, which follows it in the same script.
        script = tmp_path / "train.py"
        script.write_text(
            f"{READERS_TRAINING}\n{training}\n{on_alert}\n"
            "assert mon.config.mode == 'online' and mon.config.url\nmon.close()\n"
        )
        trained = subprocess.run(
            [str(tmp_path / "venv" / "bin" / "python"), str(script)],
            env={**env, "LAYERWATCH_SPOOL_DIR": str(tmp_path / "spool")},  # not the machine's ~/.cache
            cwd=tmp_path, capture_output=True, text=True, timeout=300,
        )  # fmt: skip
        assert trained.returncode == 0, trained.stderr[-3000:]
        assert "401" not in trained.stderr and "spool" not in trained.stderr, trained.stderr[-3000:]

        read = run(f'{reading}\nprintf "\\n%s" "$LAYERWATCH_READ_TOKEN"', {**env, "COLUMNS": "120",
                   "LAYERWATCH_URL": f"http://127.0.0.1:{port}"}, checkout)  # fmt: skip
        assert read.returncode == 0, read.stderr
        assert "resnet-lr0.4" in read.stdout and "vision" in read.stdout and "finished" in read.stdout
        auth = {"Authorization": f"Bearer {read.stdout.splitlines()[-1]}"}
        runs = httpx.get(f"http://127.0.0.1:{port}/api/v1/runs", headers=auth).json()
        assert [(r["name"], r["last_step"]) for r in runs if r["name"] == "resnet-lr0.4"] == [("resnet-lr0.4", 29)]
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(timeout=60)


def test_a_client_only_install_says_how_to_get_the_collector(tmp_path):
    """`pip install .` (the client) installs the layerwatch-server command too; without the collector's packages
    it must say what to install, not die with a traceback."""
    checkout = checkout_copy(tmp_path / "layerwatch")
    env = fresh_venv(tmp_path / "venv", ["layerwatch"])
    client_install = shell_lines(quickstart_blocks()[0][1])[0]
    assert client_install == "pip install ."
    assert run(client_install, env, checkout).returncode == 0
    assert run("python -c 'import layerwatch, pydantic'", env, tmp_path).returncode != 0  # client only: no pydantic
    assert run("layerwatch --help", env, tmp_path).returncode == 0
    server = run("layerwatch-server --help", env, tmp_path)
    assert server.returncode == 1
    assert "pip install 'layerwatch[server]'" in server.stderr and "Traceback" not in server.stderr, server.stderr
