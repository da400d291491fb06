"""Pictures: the health map's numbers from a real client's run, and both pictures drawn as PNG."""

from __future__ import annotations

import io
from pathlib import Path

import pytest

from layerwatch_server import pictures
from layerwatch_server.storage import histograms

from .batches import post, unique


@pytest.fixture(scope="module")
def stored_run(client, token, engine, tmp_path_factory) -> str:
    """A real client's run: units 0-7 of layer 0 never active (layer "1", the ReLU, is half dead)."""
    torch = pytest.importorskip("torch")
    import layerwatch
    from tests.client.conftest import read_spool

    project, spool = unique(), tmp_path_factory.mktemp("spool")
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 1))
    with torch.no_grad():
        model[0].bias[:8] = -1e3
        model[0].bias[8:] = 1e3
    mon = layerwatch.watch(model, project=project, mode="offline", spool_dir=str(spool), every=5, histogram_every=5)
    for _ in range(20):
        model(torch.randn(4, 8)).pow(2).mean().backward()
        mon.step()
        model.zero_grad()
    mon.close()
    tok = token(project)
    for batch in read_spool(Path(spool)):
        answer = post(client, batch, tok)
        assert answer.status_code == 202, answer.text
    return answer.json()["run_id"]


def test_health_map_numbers(engine, stored_run):
    data = pictures.health_map(engine, stored_run, columns=10)
    dead, grads, sat = data.panels
    assert [p.stat for p in data.panels] == list(pictures.MAP_STATS)
    assert dead.rows == ["0", "1", "2"] and grads.rows == ["0", "2"]  # model order; modules with parameters
    assert len(data.steps) == 10 and data.steps[-1] == 19
    assert dead.values[1] == [0.5] * 10  # measured at each window's end (every 5 steps), held over the window
    assert all(v is None for row in sat.values for v in row)  # no bounded layer
    assert all(v is not None for v in grads.values[0])


def test_pictures_are_png(engine, stored_run):
    from PIL import Image

    health = pictures.render_health_map(pictures.health_map(engine, stored_run), title=stored_run)
    image = Image.open(io.BytesIO(health))
    assert image.format == "PNG" and image.width > 500 and image.height > 100
    found = histograms.read(engine, stored_run, layer="1", kind="activation")
    assert found["steps"] == [4, 9, 14, 19]
    picture = Image.open(io.BytesIO(pictures.render_distribution(found, title="1")))
    assert picture.format == "PNG" and picture.width > 300


def test_health_map_route_and_the_terminal_map(client, token, engine, stored_run):
    from rich.console import Console

    from layerwatch import terminal_map

    run = pictures.health_map(engine, stored_run, columns=10)
    url = f"/api/v1/runs/{stored_run}/health_map"
    assert client.get(url, params={"columns": 10}).status_code == 401
    from layerwatch_server.storage import queries

    auth = {"Authorization": f"Bearer {token(queries.run_project(engine, stored_run), 'read')}"}
    data = client.get(url, params={"columns": 10}, headers=auth).json()
    assert data["steps"] == run.steps and [p["rows"] for p in data["panels"]] == [p.rows for p in run.panels]
    rows, cells, _ = terminal_map.worst(data)
    assert rows == ["0", "1", "2"] and cells[1] == [0.5] * 10  # the half-dead ReLU: red all along
    console = Console(record=True, width=60, color_system="truecolor")
    for line in terminal_map.lines(data):
        console.print(line)
    text = console.export_text()
    assert f"steps {data['steps'][0]}..{data['steps'][-1]}" in text and "alert began" in text
    relu = terminal_map.lines(data)[2]
    assert relu.plain.strip().startswith("1") and {span.style for span in relu.spans} == {"red"}
    assert client.get(f"/api/v1/runs/{stored_run}/health_map", headers=auth, params={"columns": 0}).status_code == 422
