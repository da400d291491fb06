"""A rank's batches reach the rules in the order it made them, whatever order they arrive in (``api.order``),
and the steps of a batch that comes too late to wait for are stored and judged by the rules that need no history
(``rules.evaluation``)."""

from __future__ import annotations

import threading
from typing import Any

import anyio
import pytest
from sqlalchemy import func, select

from layerwatch import wire
from layerwatch_server.api.order import Turns
from layerwatch_server.storage.models import RuleState, step_stats
from tests.waiting import wait_until

from .batches import make_batch, post, unique

SPIKE, NAN = 25, 12  # steps of the first batch


def _batch(run: str, project: str, steps: range, seq: int, bad: dict[int, float]) -> dict[str, Any]:
    """A rank's batch of steps alone (no layers: the loss is the point), whose loss wobbles around 1.0, ``bad``
    losses at their steps."""
    losses = {(s, -1, "loss"): bad.get(s, 1.0 + 0.01 * (s * 7 % 5)) for s in steps}
    return make_batch(run, steps=steps, n_layers=0, project=project, overrides=losses, seq=seq)


def _alerts(answer: Any) -> dict[str, dict[str, Any]]:
    return {a["rule"]: a for a in answer.json()["alerts"]}


def _stored(engine, run_id: str) -> tuple[int, dict[str, Any]]:
    with engine.connect() as conn:
        steps = conn.scalar(select(func.count()).select_from(step_stats).where(step_stats.c.run_id == run_id))
        memory = conn.scalar(select(RuleState.data).where(RuleState.run_id == run_id, RuleState.rank == 0))
    return steps, memory


def _post_in_background(client, batch: dict[str, Any], tok: str, follows: int) -> tuple[threading.Thread, dict]:
    answer: dict[str, Any] = {}
    headers = {wire.FOLLOWS_HEADER: str(follows)}
    thread = threading.Thread(target=lambda: answer.update(r=post(client, batch, tok, headers=headers)))
    thread.start()
    return thread, answer


def test_a_batch_that_comes_first_waits_for_the_one_it_follows(client, token, engine, monkeypatch):
    turns = client.app.state.lw.turns
    monkeypatch.setattr(turns, "wait_s", 60.0)  # this test says when the first batch comes
    project, run = unique("order"), unique("run")
    tok = token(project)
    first = _batch(run, project, range(0, 30), 0, {SPIKE: 50.0})
    second = _batch(run, project, range(30, 60), 1, {})

    thread, answer = _post_in_background(client, second, tok, follows=0)
    assert wait_until(lambda: turns.waiting == 1, 30, "the second batch waiting for its turn")
    first_answer = post(client, first, tok)
    thread.join(30)
    assert first_answer.status_code == 202 and answer["r"].status_code == 202
    # The first batch was judged first: the spike at step 25 fired, with the steps before it as its history ...
    spike = _alerts(first_answer)["loss_spike"]
    assert (spike["state"], spike["step"]) == ("firing", SPIKE)
    # ... and the second one after it: its 30 calm steps are more than the 10 that end the incident
    assert _alerts(answer["r"])["loss_spike"]["state"] == "resolved"
    steps, memory = _stored(engine, first_answer.json()["run_id"])
    assert steps == 60 and memory["last_step"] == 59  # all stored, and judged up to the second batch's last
    assert turns.waited_out == 0


def test_a_batch_too_late_to_wait_for_is_stored_and_judged_by_the_rules_without_history(
    client, token, engine, monkeypatch
):
    turns = client.app.state.lw.turns
    monkeypatch.setattr(turns, "wait_s", 0.2)
    project, run = unique("late"), unique("run")
    tok = token(project)
    first = _batch(run, project, range(0, 30), 0, {SPIKE: 50.0, NAN: float("nan")})
    second = _batch(run, project, range(30, 60), 1, {})
    waited_out = turns.waited_out

    answer = post(client, second, tok, headers={wire.FOLLOWS_HEADER: "0"})  # its predecessor never comes ...
    assert answer.status_code == 202 and turns.waited_out == waited_out + 1  # ... so it went on after a moment
    assert "non_finite" not in _alerts(answer)

    late = post(client, first, tok)  # ... until now
    assert late.status_code == 202 and late.json()["accepted"]["steps"] == 30
    nan = _alerts(late)["non_finite"]
    assert (nan["state"], nan["step"]) == ("firing", NAN)  # a late NaN is still a NaN
    assert "loss_spike" not in _alerts(late)  # the spike needed its history, judged already past it
    steps, memory = _stored(engine, late.json()["run_id"])
    assert steps == 60 and memory["last_step"] == 59

    again = post(client, first, tok)  # sent again: stored already, not judged twice
    assert again.json()["accepted"]["duplicates"] == 30
    assert _alerts(again)["non_finite"]["episode"] == nan["episode"]


def test_a_predecessor_refused_as_malformed_holds_back_nothing(client, token, monkeypatch):
    turns = client.app.state.lw.turns
    monkeypatch.setattr(turns, "wait_s", 60.0)
    project, run = unique("bad"), unique("run")
    tok = token(project)
    first = _batch(run, project, range(0, 30), 0, {})
    first["steps"][3]["step"] = -1  # the collector refuses the batch (422), and so its turn is over
    waited_out = turns.waited_out

    thread, answer = _post_in_background(client, _batch(run, project, range(30, 60), 1, {}), tok, follows=0)
    assert wait_until(lambda: turns.waiting == 1, 30, "the second batch waiting for its turn")
    assert post(client, first, tok).status_code == 422
    thread.join(30)
    assert answer["r"].status_code == 202 and turns.waited_out == waited_out  # at once, not after 60 s


@pytest.mark.parametrize(("ends", "state"), [([9], "firing"), ([], "pending")])
def test_a_batch_joining_two_reports_is_judged_at_the_end_of_each(client, token, ends, state):
    """``layerwatch sync`` joins a rank's batches; ``report_ends`` keeps their reports apart for the rules: a
    saturated layer breaches at both reports' ends, and saturation's ``for: 2`` fires, as with two batches."""
    project = unique("join")
    calm = {(s, i, stat): 0.0 for s in range(20) for i in range(3) for stat in ("dead_frac", "sat_frac", "nonfinite")}
    saturated = {(s, 1, "sat_frac"): 0.9 for s in range(20)}  # layer 1 is a bounded one (tanh-like)
    batch = make_batch(unique("run"), steps=range(20), n_layers=3, project=project, overrides={**calm, **saturated})
    for step in batch["steps"]:  # dead units are judged at a window's end; here no window ends
        for row in step["layers"]:
            row[1 + wire.LAYER_STATS.index("dead_frac")] = None
    batch["report_ends"] = ends
    answer = post(client, batch, token(project))
    assert answer.status_code == 202
    assert _alerts(answer)["saturation"]["state"] == state


@pytest.mark.parametrize("follows", ["", "x", "-1", "5"])
def test_a_header_that_names_no_earlier_batch_is_no_reason_to_wait(client, token, follows):
    turns = client.app.state.lw.turns
    project = unique("hdr")
    batch = _batch(unique("run"), project, range(0, 3), 5, {})
    waited_out = turns.waited_out
    answer = post(client, batch, token(project), headers={wire.FOLLOWS_HEADER: follows})
    assert answer.status_code == 202 and turns.waited_out == waited_out


# -- the turns themselves ---------------------------------------------------------------------------------------
async def _until(predicate: Any, timeout: float = 15.0) -> None:
    """Let the other tasks run until ``predicate()`` holds."""
    with anyio.fail_after(timeout):
        while not predicate():
            await anyio.sleep(0.001)


def test_turns_keep_the_order_a_rank_made_its_batches_in_whatever_order_they_come():
    turns, done = Turns(wait_s=30), []

    async def batch(seq: int, follows: int | None) -> None:
        async with turns.turn("rank", seq, follows):
            await anyio.sleep(0)  # another task could go meanwhile, were it its turn
            done.append(seq)

    async def main() -> None:
        async with anyio.create_task_group() as tg:
            for seq in (3, 2, 1):  # the last first
                tg.start_soon(batch, seq, seq - 1)
                await _until(lambda seq=seq: turns.waiting == 4 - seq)
            tg.start_soon(batch, 0, None)

    anyio.run(main)
    assert done == [0, 1, 2, 3] and turns.waited_out == 0


def test_a_predecessor_that_never_comes_is_waited_for_once_and_the_rest_keep_their_order():
    turns, done = Turns(wait_s=0.3), []

    async def batch(seq: int) -> None:
        async with turns.turn("rank", seq, seq - 1):
            done.append(seq)

    async def main() -> None:
        async with anyio.create_task_group() as tg:
            for seq in (3, 2, 1):  # 0 never comes; 2 and 3 wait for 1 and 2, which came, not for the deadline
                tg.start_soon(batch, seq)
                await _until(lambda seq=seq: turns.waiting == 4 - seq)

    anyio.run(main)
    assert done == [1, 2, 3] and turns.waited_out == 1


def test_a_turn_that_failed_is_over_all_the_same():
    turns, done = Turns(wait_s=30), []

    async def failing() -> None:
        with pytest.raises(RuntimeError):
            async with turns.turn("rank", 0, None):
                await _until(lambda: turns.waiting == 1)  # its successor is waiting
                raise RuntimeError("the database said no")

    async def following() -> None:
        async with turns.turn("rank", 1, 0):
            done.append(1)

    async def main() -> None:
        async with anyio.create_task_group() as tg:
            tg.start_soon(failing)
            await _until(lambda: "rank" in turns._ranks)
            tg.start_soon(following)

    anyio.run(main)
    assert done == [1] and turns.waited_out == 0


def test_a_predecessor_that_never_comes_leaves_nothing_behind():
    """Behind several replicas a rank's batches are shared out: every other predecessor is another replica's. Each is
    waited for once, and its turn forgotten (a long run would otherwise pile up one per batch)."""
    turns = Turns(wait_s=0.01)

    async def main() -> None:
        for seq in range(1, 41, 2):
            async with turns.turn("rank", seq, seq - 1):
                pass

    anyio.run(main)
    rank = turns._ranks["rank"]
    assert turns.waited_out == 20 and sorted(rank.arrived) == sorted(rank.ended) == list(range(1, 41, 2))
