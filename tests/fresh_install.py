"""A fresh virtual environment that installs layerwatch the way a user does, without a network.

``pip install`` runs for real in a new venv (``python -m venv``, its own pip), building the wheel from a copy of
the checkout. The dependencies are not downloaded: the venv sees exactly the distributions that the install
needs (the requirement closure of ``layerwatch`` or ``layerwatch[server]``, plus setuptools to build it), linked
from this interpreter's site-packages into a folder on its path. pip finds them there, reports them as already
satisfied and installs layerwatch itself; with ``PIP_NO_INDEX`` a missing or unsatisfied one fails the install.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterable
from importlib import metadata
from pathlib import Path

from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[1]
BUILD_DEPS = ("setuptools",)  # pyproject's build-system requires, for a build without isolation


def _canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def closure(requirements: Iterable[str]) -> set[str]:
    """Names of the installed distributions that ``requirements`` need, transitively, extras and markers
    evaluated for this interpreter. ``layerwatch`` itself is left out: the venv installs it."""
    seen: set[str] = set()
    todo = [Requirement(r) for r in requirements]
    while todo:
        req = todo.pop()
        name = _canonical(req.name)
        for extra in req.extras or {""}:
            key = f"{name}[{extra}]"
            if key in seen:
                continue
            seen.add(key)
            for raw in metadata.requires(req.name) or []:
                dep = Requirement(raw)
                if dep.marker is None or dep.marker.evaluate({"extra": extra}):
                    todo.append(dep)
    return {key.split("[")[0] for key in seen} - {"layerwatch"}


def link_distributions(names: Iterable[str], dest: Path) -> None:
    """Symlink each distribution's top-level files and folders (its packages and its .dist-info) into ``dest``."""
    dest.mkdir(parents=True, exist_ok=True)
    for name in names:
        dist = metadata.distribution(name)
        base = Path(str(dist.locate_file("")))
        for top in {Path(str(f)).parts[0] for f in dist.files or []}:
            if top.startswith("..") or top == "__pycache__" or (dest / top).exists():
                continue
            (dest / top).symlink_to(base / top)


def checkout_copy(dest: Path) -> Path:
    """The tracked files of this checkout, as a fresh clone would have them (with uncommitted edits)."""
    files = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout
    for rel in filter(None, files.decode().split("\0")):
        src = ROOT / rel
        if src.is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)
    return dest


def fresh_venv(path: Path, requirements: Iterable[str]) -> dict[str, str]:
    """A new venv at ``path`` that sees only the distributions ``requirements`` need; returns the environment
    a shell in it has (its bin first on PATH, pip offline, no build isolation, no layerwatch settings)."""
    base = getattr(sys, "_base_executable", sys.executable)
    subprocess.run([base, "-m", "venv", str(path)], check=True, capture_output=True)
    python = str(path / "bin" / "python")
    # The setuptools that ensurepip bundles (65 on 3.11) predates pyproject's license field: build with the
    # one linked below, as pip's build isolation would (it takes the newest).
    subprocess.run([python, "-m", "pip", "uninstall", "-qy", "setuptools"], check=True, capture_output=True)
    deps = path / "deps"
    link_distributions(closure([*requirements, *BUILD_DEPS]), deps)
    purelib = subprocess.run(
        [python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    Path(purelib, "layerwatch-test-deps.pth").write_text(f"{deps}\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LAYERWATCH_", "PYTHON", "PIP_"))}
    env.pop("VIRTUAL_ENV", None)
    return {
        **env,
        "VIRTUAL_ENV": str(path),
        "PATH": f"{path / 'bin'}{os.pathsep}{env.get('PATH', '')}",
        "PIP_CONFIG_FILE": os.devnull,  # no machine pip.conf (find-links, constraints): the same everywhere
        "PIP_NO_INDEX": "1",
        "PIP_NO_BUILD_ISOLATION": "0",  # pip's spelling of "off": build with the venv's setuptools
        "PIP_DISABLE_PIP_VERSION_CHECK": "1",
        "OMP_NUM_THREADS": "1",
    }
