"""The Transformers callback inside a real Trainer, on a tiny randomly initialised BERT, on CPU."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.client.conftest import layer_rows, read_spool

transformers = pytest.importorskip("transformers")

from layerwatch.integrations.transformers import LayerwatchCallback  # noqa: E402


class TinyDataset(torch.utils.data.Dataset):
    """Random token ids, label = whether token 1 appears: enough for a loss and gradients."""

    def __init__(self, n: int = 32, length: int = 8) -> None:
        generator = torch.Generator().manual_seed(0)
        self.ids = torch.randint(2, 50, (n, length), generator=generator)
        self.ids[::2, 0] = 1
        self.labels = (self.ids == 1).any(1).long()

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "attention_mask": torch.ones_like(self.ids[i]), "labels": self.labels[i]}


def _trainer(tmp_path: Path, callback: LayerwatchCallback, **args) -> transformers.Trainer:
    config = transformers.BertConfig(
        vocab_size=50,
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=16,
        num_labels=2,
    )
    model = transformers.AutoModelForSequenceClassification.from_config(config)
    arguments = transformers.TrainingArguments(
        output_dir=str(tmp_path / "out"),
        report_to=[],
        use_cpu=True,
        save_strategy="no",
        per_device_train_batch_size=4,
        learning_rate=1e-3,
        lr_scheduler_type="linear",
        disable_tqdm=True,
        dataloader_pin_memory=False,
        **args,
    )
    return transformers.Trainer(model=model, args=arguments, train_dataset=TinyDataset(), callbacks=[callback])


def test_one_step_per_optimizer_step_with_logged_loss_lr_and_layers(tmp_path: Path):
    spool = tmp_path / "spool"
    callback = LayerwatchCallback(mode="offline", spool_dir=str(spool), every=2, project="nlp")
    trainer = _trainer(tmp_path, callback, max_steps=4, gradient_accumulation_steps=2, logging_steps=1, run_name="tiny")
    trainer.train()
    assert callback.monitor is None

    batches = read_spool(spool)
    steps = [s for b in batches for s in b["steps"]]
    # One step per optimizer step, and one more at the end for the loss the Trainer logged at the last step.
    assert [s["step"] for s in steps] == [0, 1, 2, 3, 4]
    logged = {entry["step"]: entry for entry in trainer.state.log_history if "loss" in entry}
    # The lr the optimizer is about to apply; the loss logged after step k arrives with step k + 1.
    assert [s["lr"] for s in steps[:4]] == pytest.approx([logged[k + 1]["learning_rate"] for k in range(4)])
    assert [s["loss"] for s in steps] == pytest.approx([None] + [logged[k]["loss"] for k in (1, 2, 3, 4)])
    assert all(s["grad_norm_total"] > 0 for s in steps[:4])
    pooler = layer_rows(batches, "bert.pooler.activation")  # the tanh: a bounded layer, saturation measured
    assert sorted(pooler) == [0, 1, 2, 3] and all(0 <= row["sat_frac"] <= 1 for row in pooler.values())
    run = batches[0]["run"]
    assert run["name"] == "tiny" and run["project"] == "nlp"
    assert run["config"]["hparams"]["gradient_accumulation_steps"] == 2
    assert [b["end"]["status"] for b in batches if b.get("end")] == ["finished"]
