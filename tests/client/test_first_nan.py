"""The first NaN, or a loss jump, reaches on_alert and the collector within the step that shows it."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from torch import nn

import layerwatch
from layerwatch.alerts import Alert
from layerwatch.syncs import HostReads
from layerwatch.tripwire import ROWS, LossJump, Tripwire
from tests.client.conftest import read_spool
from tests.client.real_models import gpt2, llama
from tests.waiting import wait_until


class Loop:
    """A training loop that notes, for every on_alert call, the step during whose ``mon.step()`` it came."""

    def __init__(self, model: nn.Module, lr: float = 0.01) -> None:
        self.model = model
        self.opt = torch.optim.SGD(model.parameters(), lr=lr)
        self.step = -1
        self.heard: list[tuple[int, Alert]] = []

    def on_alert(self, alert: Alert) -> None:
        self.heard.append((self.step, alert))

    def run(self, mon: layerwatch.Monitor, steps: range, before=None) -> None:
        for self.step in steps:
            if before is not None:
                before(self.step)
            loss = self.model(torch.randn(32, self.model[0].in_features)).pow(2).mean()
            loss.backward()
            mon.step(loss=loss)
            self.opt.step()
            self.opt.zero_grad()


def mlp() -> nn.Sequential:
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 1))


def poison_at(model: nn.Sequential, step: int):
    def before(current: int) -> None:
        if current == step:
            with torch.no_grad():
                model[2].weight[0, 0] = float("nan")

    return before


def offline(model: nn.Module, tmp_path: Path, loop: Loop, **kwargs) -> layerwatch.Monitor:
    return layerwatch.watch(model, mode="offline", spool_dir=str(tmp_path), on_alert=loop.on_alert, **kwargs)


def test_a_nan_at_step_3_of_10_is_heard_in_step_3_and_its_steps_leave_at_once(tmp_path):
    model = mlp()
    loop = Loop(model)
    mon = offline(model, tmp_path, loop, every=10)
    reads = HostReads()
    with reads:
        loop.run(mon, range(8), before=poison_at(model, 3))
    assert reads.calls == []  # the per-step check reads no tensor on the training thread
    mon.close()
    assert [(step, a.rule, a.source, a.step) for step, a in loop.heard] == [(3, "non_finite", "local", 3)]
    assert loop.heard[0][1].local and loop.heard[0][1].severity == "critical"
    assert "forward pass" in loop.heard[0][1].message
    batches = read_spool(tmp_path)
    # The interval's first 4 steps left early, with the NaN's origin; the next interval started after them.
    assert [[s["step"] for s in b["steps"]] for b in batches] == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert batches[0]["nonfinite_origin"] == {"step": 3, "pass": "forward", "layer": "2", "rank": 0}
    assert [a.source for a in mon.alerts] == ["local"]  # offline: the local alert is all there is


@pytest.mark.parametrize("where", ["loss", "backward pass"])
def test_a_nan_outside_the_activations_is_heard_too(tmp_path, where):
    model = nn.Sequential(nn.Linear(4, 8), nn.Sigmoid(), nn.Linear(8, 1))
    loop = Loop(model)
    mon = offline(model, tmp_path, loop, every=10)
    for loop.step in range(5):
        out = model(torch.randn(4, 4))
        if where == "loss":
            # -inf from finite activations
            loss = torch.log(out.detach() * 0 if loop.step == 2 else out.abs() + 1).sum()
            out.sum().backward()
        else:
            loss = out.pow(2).mean()
            handle = model[2].weight.register_hook(lambda g: g * math.inf) if loop.step == 2 else None
            loss.backward()
            if handle is not None:
                handle.remove()
        mon.step(loss=loss)
        model.zero_grad()
    mon.close()
    assert [(step, a.step) for step, a in loop.heard] == [(2, 2)]
    assert where in loop.heard[0][1].message and "forward pass" not in loop.heard[0][1].message


class Landing:
    """A CUDA event's stand-in: the copy of a step's numbers has landed once ``landed`` is set."""

    def __init__(self) -> None:
        self.landed = False

    def query(self) -> bool:
        return self.landed


def test_poll_never_waits_for_a_check_that_has_not_landed_and_reads_in_order():
    wire = Tripwire(100.0)
    wire.arm(0, torch.tensor([1.0]), torch.tensor([math.nan]), torch.tensor(2.0))
    wire.arm(1, torch.tensor([1.0]), torch.tensor([1.0]), torch.tensor(2.0))
    first, second = Landing(), Landing()
    wire._pending[0].event, wire._pending[1].event = first, second  # as on CUDA: copies still in flight
    second.landed = True
    assert wire.poll() == []  # step 1 has landed, step 0 has not: nothing read out of order, nothing waited for
    first.landed = True
    (trip,) = wire.poll()
    assert (trip.step, trip.kind, trip.where) == (0, "non_finite", ("backward pass",))


def test_a_step_that_finds_every_row_in_flight_carries_its_nan_to_the_next_check():
    wire, ones, in_flight = Tripwire(0.0), torch.ones(1), Landing()
    for step in range(ROWS):  # a device ROWS steps behind its host
        wire.arm(step, ones, ones, None)
        wire._pending[-1].event = in_flight
    wire.arm(ROWS, ones, torch.tensor([math.inf]), None)  # no row free: not lost, carried
    assert wire.skipped == 1
    in_flight.landed = True
    assert wire.poll() == []
    wire.arm(ROWS + 1, ones, ones, None)
    (trip,) = wire.poll()
    assert (trip.step, trip.kind) == (ROWS + 1, "non_finite")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_on_cuda_a_nan_is_heard_by_the_next_step_without_a_host_sync(tmp_path):
    model = mlp().cuda()
    loop = Loop(model)
    mon = offline(model, tmp_path, loop, every=10)
    reads = HostReads()
    for loop.step in range(8):
        poison_at(model, 3)(loop.step)
        with reads:
            loss = model(torch.randn(32, 8, device="cuda")).pow(2).mean()
            loss.backward()
            mon.step(loss=loss)
            model.zero_grad()
        torch.cuda.synchronize()  # a loop that waits for its device once a step (logging, data): step(s+1) knows
    mon.close()
    assert reads.calls == []
    assert [(a.step, a.rule, a.local) for _, a in loop.heard] == [(3, "non_finite", True)]
    assert loop.heard[0][0] in (3, 4)
    assert [s["step"] for s in read_spool(tmp_path)[0]["steps"]][-1] == loop.heard[0][0]


def test_a_layer_that_did_not_run_does_not_repeat_an_old_nan(tmp_path):
    class Branches(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 4)

        def forward(self, x: torch.Tensor, both: bool) -> torch.Tensor:
            return self.a(x) + self.b(x * math.inf) if both else self.a(x)

    model = Branches()
    loop = Loop(model)
    mon = offline(model, tmp_path, loop, every=10, watch_params=False)
    for loop.step, both in enumerate([True, False, False, True]):
        mon.step(loss=model(torch.randn(2, 4), both).detach().abs().mean())  # an Inf at steps 0 and 3 only
    mon.close()
    # Step 1 reuses step 0's slot (the early report emptied the buffer), where `b`'s Inf is still written.
    assert [step for step, _ in loop.heard] == [0, 3]


def test_a_nan_that_stays_is_one_incident_and_a_clean_step_ends_it(tmp_path):
    model = nn.Sequential(nn.Linear(4, 4))
    loop = Loop(model)
    mon = offline(model, tmp_path, loop, every=4, watch_params=False)
    pattern = [1.0, math.nan, math.nan, math.nan, 1.0, 1.0, math.inf, 1.0]
    for loop.step, value in enumerate(pattern):
        mon.step(loss=torch.tensor(value))
    mon.close()
    assert [(step, a.rule) for step, a in loop.heard] == [(1, "non_finite"), (6, "non_finite")]
    assert [[s["step"] for s in b["steps"]] for b in read_spool(tmp_path)] == [[0, 1], [2, 3, 4, 5], [6], [7]]


def test_a_diverging_run_is_flagged_by_its_loss_jump_before_its_first_nonfinite_value(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    heard: list[tuple[int, Alert]] = []
    mon = layerwatch.watch(model, mode="offline", spool_dir=str(tmp_path), on_alert=lambda a: heard.append((step, a)))
    w, first_nonfinite, losses = torch.randn(16, 1), None, []
    for step in range(60):
        if step == 30:  # a learning-rate schedule gone wrong
            opt.param_groups[0]["lr"] = 3.0
        x = torch.randn(32, 16)
        loss = (model(x) - x @ w).pow(2).mean()
        loss.backward()
        mon.step(loss=loss)
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
        if first_nonfinite is None and not math.isfinite(losses[-1]):
            first_nonfinite = step
    mon.close()
    assert first_nonfinite is not None
    jumps = [(s, a) for s, a in heard if a.rule == "loss_spike"]
    ((at, jump),) = jumps
    assert at < first_nonfinite and jump.local and jump.step == at
    assert jump.threshold == pytest.approx(100 * max(abs(v) for v in losses[max(at - 100, 0) : at]), rel=1e-6)
    assert jump.value == pytest.approx(losses[at], rel=1e-6) and jump.value > jump.threshold
    # The gradients overflow a step before the loss does: non_finite is heard at that step, once.
    (nan_at,) = [s for s, a in heard if a.rule == "non_finite"]
    assert at < nan_at <= first_nonfinite
    steps = [[s["step"] for s in b["steps"]] for b in read_spool(tmp_path)]
    assert steps[at // 10][-1] == at  # the jump sent its interval's steps at once (reports end at 9, 19, ...)


def classifier_near_zero_loss(loop_steps: int, batch: int) -> list[float]:
    """The noisiest healthy loss measured: a classifier that fits its data to ~0 loss, batch size 2, dropout,
    still misclassifying a sample now and then (a single batch at 41x the recent mean loss)."""
    torch.manual_seed(1)
    x = torch.randn(512, 20)
    y = (x[:, :5].sum(1) > 0).long() + 2 * (x[:, 5] > 0.5).long()
    model = nn.Sequential(nn.Linear(20, 64), nn.ReLU(), nn.Dropout(0.2), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 4))
    opt = torch.optim.Adam(model.parameters(), 3e-3)
    heard: list[Alert] = []
    mon = layerwatch.watch(model, mode="offline", on_alert=heard.append)
    losses = []
    for _ in range(loop_steps):
        i = torch.randint(0, 512, (batch,))
        loss = nn.functional.cross_entropy(model(x[i]), y[i])
        loss.backward()
        mon.step(loss=loss)
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    mon.close()
    assert heard == []
    return losses


def test_the_loss_jump_stays_quiet_on_a_healthy_noisy_run():
    losses = classifier_near_zero_loss(1200, batch=2)
    assert min(losses) < 1e-4 and max(losses[600:]) > 1.0  # near zero, and still noisy: a real test of quiet


@pytest.mark.parametrize("build", [gpt2, llama], ids=["gpt2", "llama"])
def test_a_transformer_is_quiet_until_its_embeddings_go_nan_then_heard_in_that_step(tmp_path, build):
    torch.manual_seed(0)
    model = build()
    opt = torch.optim.AdamW(model.parameters(), 1e-3)
    heard: list[tuple[int, Alert]] = []
    mon = layerwatch.watch(model, mode="offline", spool_dir=str(tmp_path), on_alert=lambda a: heard.append((step, a)))
    for step in range(30):
        if step == 23:
            with torch.no_grad():
                model.get_input_embeddings().weight[7] = math.nan  # one token's embedding
        start = torch.randint(0, 64, (2, 1))  # batch size 2 of an arithmetic sequence: learnable, noisy
        ids = (start + torch.randint(1, 4, (2, 1)) * torch.arange(12)) % 64
        ids[:, 5] = 7
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        mon.step(loss=loss)
        opt.step()
        opt.zero_grad()
    mon.close()
    assert [(at, a.rule, a.step, a.local) for at, a in heard] == [(23, "non_finite", 23, True)]
    assert "forward pass" in heard[0][1].message


def test_the_loss_jump_judges_magnitudes_and_can_be_switched_off():
    jump = LossJump(100.0)
    assert [jump.judge(v) for v in (-2.0, -3.0, 1.0, -500.0)] == [None, None, None, 3.0]  # |-500| > 100 x 3
    zero = LossJump(100.0)
    assert [zero.judge(v) for v in (0.0, 0.0, 5.0, 5000.0)] == [None, None, None, 5.0]  # no scale at 0: not judged
    assert LossJump(100.0).judge(math.nan) is None
    off = LossJump(0.0)
    assert [off.judge(v) for v in (1.0, 1e9)] == [None, None]


def test_loss_jump_setting_env_and_validation(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("LAYERWATCH_LOSS_JUMP", "0")
    assert layerwatch.Config.resolve().loss_jump == 0
    monkeypatch.setenv("LAYERWATCH_LOSS_JUMP", "0.5")
    assert layerwatch.Config.resolve().loss_jump == 100  # logged and ignored: a factor must be above 1
    assert "LAYERWATCH_LOSS_JUMP" in caplog.text
    assert layerwatch.Config.resolve(loss_jump=1000).loss_jump == 1000
    with pytest.raises(ValueError, match="loss_jump must be 0"):
        layerwatch.Config.resolve(loss_jump=-1)


def test_the_collectors_alert_for_a_local_incident_is_not_told_twice(collector, tmp_path):
    model = mlp()
    loop = Loop(model)
    mon = layerwatch.watch(model, url=collector.url, every=10, on_alert=loop.on_alert)
    twin = {"id": "c1", "rule": "non_finite", "state": "firing", "severity": "critical", "step": 3, "message": "x"}
    collector.alerts = [twin]
    loop.run(mon, range(5), before=poison_at(model, 3))
    # The early report's answer carries the collector's alert: it replaces the local one, with no second call.
    assert wait_until(lambda: [(a.id, a.source) for a in mon.alerts] == [("c1", "collector")], 20)
    collector.alerts = [{**twin, "value": 7.0}, {**twin, "id": "c2", "rule": "dead_units"}]
    loop.run(mon, range(5, 15))  # a full report: the collector answers with an update and another rule
    assert wait_until(lambda: "c2" in {a.id for a in mon.alerts}, 20)
    collector.alerts = [{**twin, "state": "resolved"}]
    loop.run(mon, range(15, 25))
    assert wait_until(lambda: any(a.state == "resolved" for a in mon.alerts), 20)
    mon.step()  # on_alert runs inside step()
    mon.close()
    told = [(a.id, a.rule, a.state, a.source) for _, a in loop.heard]
    assert told == [
        ("local-non_finite-3", "non_finite", "firing", "local"),
        ("c2", "dead_units", "firing", "collector"),
        ("c1", "non_finite", "resolved", "collector"),
    ]


# -- fp16 mixed precision: a GradScaler's overflow is a skipped step, not a NaN incident ----------------------------
def amp_loop(tmp_path: Path, steps: int, init_scale: float, poison=None, grad_poison=None):
    """fp16 autocast with a real ``torch.amp.GradScaler`` on the CPU, ``step()`` after ``scaler.update()``; returns
    what on_alert heard (step, alert), the spooled batches, the host reads of ``mon.step()``, the scales."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    scaler = torch.amp.GradScaler("cpu", init_scale=init_scale)
    heard: list[tuple[int, Alert]] = []
    step = -1

    def on_alert(alert: Alert) -> None:
        heard.append((step, alert))

    mon = layerwatch.watch(model, mode="offline", spool_dir=str(tmp_path), every=5, scaler=scaler, on_alert=on_alert)
    reads, scales = HostReads(), []
    for step in range(steps):
        x = torch.randn(32, 8)
        if poison is not None and step == poison:
            x[0, 0] = math.inf
        with torch.autocast("cpu", dtype=torch.float16):
            loss = model(x).float().pow(2).mean()
        handle = model[2].weight.register_hook(lambda g: g * math.nan) if grad_poison and step >= grad_poison else None
        scaler.scale(loss).backward()
        if handle is not None:
            handle.remove()
        scaler.step(opt)  # unscales the gradients in place; skips the update on an overflow
        scaler.update()
        with reads:
            mon.step(loss=loss)
        opt.zero_grad()
        scales.append(scaler.get_scale())
    mon.close()
    return heard, read_spool(tmp_path), reads.calls, scales


def steps_of(batches: list[dict]) -> list[dict]:
    return [s for b in batches for s in b["steps"]]


def test_a_grad_scalers_overflow_is_a_skipped_step_not_an_alarm(tmp_path):
    # 2**24 is far above what fp16 gradients of this model take: the first steps overflow, the scaler halves it.
    heard, batches, reads, scales = amp_loop(tmp_path, 12, init_scale=2.0**24)
    steps = steps_of(batches)
    overflow = [s["scalars"]["overflow"] for s in steps]
    assert overflow[0] == 1.0 and overflow[-1] == 0.0  # real overflows, then a scale that fits
    assert all(not math.isfinite(s["grad_norm_total"]) for s, o in zip(steps, overflow, strict=True) if o)
    assert all(math.isfinite(s["loss"]) for s in steps)
    assert [s["scalars"]["loss_scale"] for s in steps] == scales  # read after update(): the next step's scale
    assert heard == [] and reads == []  # no alarm, and still no host read in step()
    assert all(b["nonfinite_origin"] is None for b in batches)
    assert [len(b["steps"]) for b in batches] == [5, 5, 2]  # no early report either


def test_with_a_grad_scaler_a_nonfinite_forward_pass_still_alerts(tmp_path):
    heard, batches, _, _ = amp_loop(tmp_path, 8, init_scale=2.0**10, poison=5)
    assert [(at, a.rule, a.step) for at, a in heard] == [(5, "non_finite", 5)]
    assert "forward pass" in heard[0][1].message
    (origin,) = [b["nonfinite_origin"] for b in batches if b["nonfinite_origin"]]
    assert (origin["step"], origin["pass"]) == (5, "forward")


def test_with_a_grad_scaler_a_collapsing_scale_alerts(tmp_path):
    # NaN gradients at every step from step 2: the scaler skips each one and halves its scale, 8 -> 4 -> 2 -> 1 -> 0.5
    heard, batches, _, scales = amp_loop(tmp_path, 10, init_scale=8.0, grad_poison=2)
    assert scales[2:6] == [4.0, 2.0, 1.0, 0.5]
    assert [(at, a.rule, a.step) for at, a in heard] == [(5, "non_finite", 5)]
    assert "loss scale down to 0.5" in heard[0][1].message
    (origin,) = [b["nonfinite_origin"] for b in batches if b["nonfinite_origin"]]
    assert (origin["step"], origin["pass"]) == (5, "backward")
