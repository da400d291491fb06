"""What every example shares: its command line and the report of what layerwatch caught."""

from __future__ import annotations

import argparse
import os
import time

import layerwatch


def parser(doc: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--url", default=os.environ.get("LAYERWATCH_URL", "http://127.0.0.1:8765"), help="collector")
    p.add_argument("--project", default=os.environ.get("LAYERWATCH_PROJECT", "examples"))
    return p


def report(mon: layerwatch.Monitor, wait: float = 10.0) -> None:
    """Print the alerts the collector raised for the run (it answers with them on each ingest)."""
    deadline = time.monotonic() + wait
    while not mon.alerts and mon.stats.get("spooled_bytes") and time.monotonic() < deadline:
        time.sleep(0.1)
    print(f"run {mon.run_name} (collector id {mon.run_id}):")
    if not mon.alerts:
        print("  layerwatch raised no alert")
    for alert in sorted(mon.alerts, key=lambda a: (a.step or 0, a.rule)):
        where = f" layer {alert.layer}" if alert.layer else ""
        print(f"  ALERT {alert.rule} [{alert.state}, {alert.severity}]{where} at step {alert.step}: {alert.message}")
