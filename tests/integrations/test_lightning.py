"""The Lightning callback inside a real Trainer on CPU, read back from the offline spool."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from tests.client.conftest import layer_rows, read_spool

pl = pytest.importorskip("lightning.pytorch")

from layerwatch.integrations.lightning import LayerwatchCallback  # noqa: E402


class TinyRegressor(pl.LightningModule):
    def __init__(self, lr: float = 0.1, fail_at: int | None = None) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1))
        self.losses: list[float] = []  # per micro-batch, for the test's oracle

    def training_step(self, batch, batch_idx):
        if batch_idx == self.hparams.fail_at:
            raise RuntimeError("boom")
        x, y = batch
        loss = nn.functional.mse_loss(self.net(x), y)
        self.losses.append(loss.item())
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.hparams.lr)


def _loader() -> DataLoader:
    x = torch.randn(64, 4)
    return DataLoader(TensorDataset(x, x.sum(1, keepdim=True)), batch_size=4)


def _trainer(max_steps: int, callback: LayerwatchCallback, **kwargs) -> pl.Trainer:
    return pl.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=max_steps,
        callbacks=[callback],
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        num_sanity_val_steps=0,
        **kwargs,
    )


def _ends(batches) -> list[str]:
    return [b["end"]["status"] for b in batches if b.get("end")]


def test_one_step_per_optimizer_step_with_loss_lr_and_layers(tmp_path: Path):
    spool = tmp_path / "spool"
    callback = LayerwatchCallback(mode="offline", spool_dir=str(spool), every=2, project="lit")
    model = TinyRegressor()
    logger = pl.loggers.CSVLogger(tmp_path, name="csv-exp")
    _trainer(4, callback, accumulate_grad_batches=2, logger=logger).fit(model, _loader())
    assert callback.monitor is None  # closed at fit end

    batches = read_spool(spool)
    steps = [s for b in batches for s in b["steps"]]
    assert [s["step"] for s in steps] == [0, 1, 2, 3]  # 8 micro-batches, 4 optimizer steps
    # The step's loss is the mean over its accumulated micro-batches, as the gradient is.
    expected = [(a + b) / 2 for a, b in zip(model.losses[::2], model.losses[1::2], strict=True)]
    assert [s["loss"] for s in steps] == pytest.approx(expected, rel=1e-5)
    assert [s["lr"] for s in steps] == pytest.approx([0.1] * 4)
    assert all(s["grad_norm_total"] > 0 for s in steps)
    relu = layer_rows(batches, "net.1")
    assert sorted(relu) == [0, 1, 2, 3] and all(0 <= row["zero_frac"] <= 1 for row in relu.values())
    run = batches[0]["run"]
    assert run["name"] == "csv-exp" and run["project"] == "lit"
    assert run["config"]["hparams"] == {"lr": 0.1, "fail_at": None}
    assert _ends(batches) == ["finished"]


def test_a_failing_training_step_ends_the_run_failed(tmp_path: Path):
    spool = tmp_path / "spool"
    callback = LayerwatchCallback(mode="offline", spool_dir=str(spool), run_name="doomed")
    with pytest.raises(RuntimeError, match="boom"):
        _trainer(10, callback, logger=False).fit(TinyRegressor(fail_at=3), _loader())
    batches = read_spool(spool)
    assert [s["step"] for b in batches for s in b["steps"]] == [0, 1, 2]
    assert batches[0]["run"]["name"] == "doomed"
    assert _ends(batches) == ["failed"]


def test_a_bad_setting_is_logged_and_training_goes_on(tmp_path: Path, caplog: pytest.LogCaptureFixture):
    callback = LayerwatchCallback(mode="offline", spool_dir=str(tmp_path / "spool"), every=0)
    model = TinyRegressor()
    with caplog.at_level(logging.ERROR, logger="layerwatch"):
        _trainer(3, callback, logger=False).fit(model, _loader())
    assert len(model.losses) == 3
    assert "could not start monitoring" in caplog.text
    assert read_spool(tmp_path / "spool") == []


def test_16_mixed_overflows_are_skipped_steps_not_alarms(tmp_path: Path):
    """Lightning's own fp16 AMP plugin (autocast on the CPU, a real GradScaler) hands the callback its scaler: the
    overflows while the scale comes down from 2**24 are reported as skipped steps, and on_alert hears nothing."""
    from lightning.pytorch.plugins.precision import MixedPrecision

    heard: list = []
    callback = LayerwatchCallback(mode="offline", spool_dir=str(tmp_path), every=4, on_alert=heard.append)
    plugin = MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu", init_scale=2.0**24))
    _trainer(10, callback, plugins=[plugin]).fit(TinyRegressor(), _loader())
    steps = [s for b in read_spool(tmp_path) for s in b["steps"]]
    overflow = [s["scalars"]["overflow"] for s in steps]
    assert overflow[0] == 1.0 and sum(overflow) >= 3 and overflow[-1] == 0.0
    assert [s["scalars"]["loss_scale"] for s in steps[:3]] == [2.0**24, 2.0**23, 2.0**22]  # before update()
    assert heard == []
