"""What both callbacks rely on: never raise into training, except the user's on_alert; frameworks load lazily."""

from __future__ import annotations

import logging
import os
import subprocess
import sys

import pytest

from layerwatch.integrations._session import Session, exit_status


class Stop(Exception):
    pass


def test_internal_errors_are_logged_but_on_alert_errors_stop_training(caplog: pytest.LogCaptureFixture):
    def on_alert(alert):
        raise Stop(alert)

    session = Session("test", {"on_alert": on_alert})
    with caplog.at_level(logging.ERROR, logger="layerwatch"):
        session.guard(lambda: 1 / 0)
    assert "error in the test integration" in caplog.text
    with pytest.raises(Stop):
        session.guard(lambda: session._on_alert("dead_units"))
    session.guard(lambda: 1 / 0)  # the alert's error does not linger


def test_exit_status():
    assert exit_status(KeyboardInterrupt()) == "killed"
    assert exit_status(RuntimeError()) == "failed"


def test_importing_layerwatch_loads_no_framework():
    code = (
        "import sys, layerwatch, layerwatch.monitor, layerwatch.integrations;"
        "loaded = {m.split('.')[0] for m in sys.modules} & {'lightning', 'pytorch_lightning', 'transformers'};"
        "sys.exit(f'loaded: {loaded}' if loaded else 0)"
    )
    subprocess.run([sys.executable, "-c", code], check=True, env=os.environ.copy(), timeout=60)
