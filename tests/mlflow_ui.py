"""Headless Chromium on the MLflow UI (selenium + the Debian chromedriver), shared by tests/test_mlflow_ui.py and
scripts/screenshot. The UI is a React app: every step waits for the element it needs.

Written against the MLflow 3 UI: a run's charts are at ``#/experiments/<exp>/runs/<run>/model-metrics`` with a
"Search metric charts" box; the run overview (``#/experiments/<exp>/runs/<run>``) lists the latest value of every
metric; the experiment's run table is at ``#/experiments/<exp>/runs``. Images logged with a key are cards on the
charts tab too, each with a step slider and a number box beside it.
"""

from __future__ import annotations

import shutil
import urllib.parse
from pathlib import Path
from typing import Any

import httpx

from tests.waiting import wait_until

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
CHROME_FLAGS = (
    "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-background-networking",
    "--disable-component-update", "--disable-sync", "--no-first-run",
)  # fmt: skip


def missing_browser() -> str | None:
    """Why the UI cannot be driven here, or None."""
    for path in (CHROMIUM, CHROMEDRIVER):
        if not Path(path).exists() and not shutil.which(Path(path).name):
            return f"{path} is not installed (Debian packages chromium and chromium-driver)"
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "selenium is not installed (the dev extra)"
    return None


def chrome(profile_dir: Path, width: int = 1400, height: int = 1000) -> Any:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    for flag in CHROME_FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={profile_dir}")
    options.add_argument(f"--window-size={width},{height}")
    options.binary_location = shutil.which(Path(CHROMIUM).name) or CHROMIUM
    driver = webdriver.Chrome(options=options, service=Service(shutil.which("chromedriver") or CHROMEDRIVER))
    driver.set_page_load_timeout(60)
    return driver


def wait_for(driver: Any, css: str, timeout: float = 30.0, text: str | None = None) -> Any:
    """The first element matching ``css`` (and containing ``text``) once the app has rendered it."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    wait = WebDriverWait(driver, timeout)
    if text is None:
        return wait.until(ec.presence_of_element_located((By.CSS_SELECTOR, css)))
    wait.until(ec.text_to_be_present_in_element((By.CSS_SELECTOR, css), text))
    return driver.find_element(By.CSS_SELECTOR, css)


def run_page(base: str, experiment_id: str, run_id: str, tab: str = "") -> str:
    return f"{base}/#/experiments/{experiment_id}/runs/{run_id}" + (f"/{tab}" if tab else "")


def open_metric_chart(driver: Any, base: str, experiment_id: str, run_id: str, metric: str, fullscreen: bool) -> None:
    """The run's chart tab filtered down to ``metric``; with ``fullscreen`` the chart opened large."""
    driver.get(run_page(base, experiment_id, run_id, "model-metrics"))
    search = wait_for(driver, "input[placeholder='Search metric charts']")
    search.send_keys(metric)
    # Charts draw when scrolled into view, and the run's image cards (not filtered by the search) come first:
    # scroll to the section MLflow groups the metric under (its key up to the last slash).
    section = f"//*[normalize-space(text())='{metric.rpartition('/')[0]}']"
    wait_for(driver, "body", text=metric.rpartition("/")[0])
    for header in driver.find_elements("xpath", section)[:1]:
        driver.execute_script("arguments[0].scrollIntoView({block: 'start'})", header)
    wait_for(driver, "body", text=f"({metric})")  # the chart's legend: "<run name> (<metric>)"
    close = driver.find_elements("css selector", "button[aria-label='Close']")  # the assistant's side panel
    if close:
        close[0].click()
    if fullscreen:
        wait_for(driver, "button[data-component-id='fullscreen_button_chartcard']").click()
        wait_for(driver, "[role='dialog']", text=metric)


def open_image(driver: Any, base: str, experiment_id: str, run_id: str, key: str, step: int) -> Any:
    """The run's image ``key`` at ``step``, as its card on the charts tab shows it (the ``img``, loaded)."""
    from selenium.webdriver.common.keys import Keys

    driver.get(run_page(base, experiment_id, run_id, "model-metrics"))
    card = f"//h4[@title='{key}']/ancestor::div[.//input[@type='number']][1]"
    box = wait_for(driver, "body", text=key).find_element("xpath", f"{card}//input[@type='number']")
    driver.execute_script("arguments[0].scrollIntoView({block: 'center'})", box)
    if box.is_enabled():  # disabled: one step only, shown as it is
        box.send_keys(Keys.CONTROL, "a")
        box.send_keys(str(step), Keys.TAB)  # the slider starts below the first step: "No image logged at this step"
    name = f"{key.replace('/', '~')}+step+{step}+"  # how MLflow names the image's files
    src = f"{card}//img[contains(@src, '{urllib.parse.quote(name, safe='~')}')]"

    def loaded() -> Any:
        found = driver.find_elements("xpath", src)
        return found[0] if found and driver.execute_script("return arguments[0].naturalWidth", found[0]) else None

    return wait_until(loaded, 30.0, f"image {key} at step {step} in the MLflow UI", interval=0.5)


def wait_for_mirror(
    collector: str, mlflow_url: str, project: str, metric: str, timeout: float = 60.0
) -> tuple[str, str]:
    """(experiment id, MLflow run id) of the project's latest run once ``metric`` reached its last reported step."""
    from mlflow import MlflowClient

    client = MlflowClient(mlflow_url)
    layer = metric.split("/")[1]

    def mirrored() -> tuple[str, str] | None:
        runs = httpx.get(f"{collector}/api/v1/runs", params={"project": project}, timeout=10).json()
        run = httpx.get(f"{collector}/api/v1/runs/{runs[0]['id']}", timeout=10).json() if runs else {}
        if not run.get("mlflow_run_id"):
            return None
        query = urllib.parse.urlencode({"layer": layer, "stat": metric.rsplit("/", 1)[1]})
        points = httpx.get(f"{collector}/api/v1/runs/{run['id']}/series?{query}", timeout=10).json()["points"]
        last = max((p["step"] for p in points if p["value"] is not None), default=None)
        if last is None or not any(m.step == last for m in client.get_metric_history(run["mlflow_run_id"], metric)):
            return None
        return client.get_run(run["mlflow_run_id"]).info.experiment_id, run["mlflow_run_id"]

    return wait_until(mirrored, timeout, f"{metric} of project {project!r} to reach MLflow", interval=0.5)
