"""The observability callbacks inside a real pytorch_lightning Trainer on CPU, with a stand-in
LightningModule (a linear layer that logs the keys the Falcon-H1 module logs) carrying a tiny
FalconH1Config for the FLOP count."""

import csv
import re

import pytest
import pytorch_lightning as pl
import torch
from pytorch_lightning.loggers import CSVLogger
from torch.utils.data import DataLoader, TensorDataset

from falcon_h1.model.presets import preset_config
from falcon_h1.training.callbacks import (
    LossPlot,
    ProgressPrinter,
    ThroughputMonitor,
    peak_bf16_tflops,
    read_loss_csv,
)
from falcon_h1.training.flops import training_flops_per_step

GLOBAL_BATCH, SEQ_LENGTH = 4, 16


@pytest.fixture(scope="module")
def tiny_config():
    return preset_config("tiny-90m", num_layers=2)


class StandInModule(pl.LightningModule):
    """Logs reduced_train_loss (prog_bar) and lr every step, and val_loss either from
    validation_step or, like a module that averages its own outputs, from on_validation_epoch_end."""

    def __init__(self, config, loss_offset=0.0, val_loss_at_epoch_end=False):
        super().__init__()
        self.config = config
        self.layer = torch.nn.Linear(SEQ_LENGTH, 1)
        self.loss_offset = loss_offset
        self.val_loss_at_epoch_end = val_loss_at_epoch_end
        self._val_losses = []

    def _loss(self, batch):
        (x,) = batch
        return self.layer(x).pow(2).mean() + 1.0 + self.loss_offset

    def training_step(self, batch, batch_idx):
        loss = self._loss(batch)
        self.log("reduced_train_loss", loss, prog_bar=True)
        self.log("lr", self.optimizers().param_groups[0]["lr"])
        return loss

    def validation_step(self, batch, batch_idx):
        loss = self._loss(batch)
        if self.val_loss_at_epoch_end:
            self._val_losses.append(loss)
        else:
            self.log("val_loss", loss)

    def on_validation_epoch_end(self):
        if self.val_loss_at_epoch_end:
            self.log("val_loss", torch.stack(self._val_losses).mean())
            self._val_losses.clear()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=3e-4)


class StandInData(pl.LightningDataModule):
    def __init__(self):
        super().__init__()
        self.global_batch_size, self.seq_length = GLOBAL_BATCH, SEQ_LENGTH

    def _loader(self, rows):
        return DataLoader(TensorDataset(torch.randn(rows, SEQ_LENGTH)), batch_size=GLOBAL_BATCH)

    def train_dataloader(self):
        return self._loader(64)

    def val_dataloader(self):
        return self._loader(8)


def fit(tmp_path, config, callbacks, max_steps=6, **module_kwargs):
    trainer = pl.Trainer(
        accelerator="cpu", devices=1, max_steps=max_steps, val_check_interval=3, limit_val_batches=2,
        num_sanity_val_steps=1, log_every_n_steps=1, enable_progress_bar=False, enable_model_summary=False,
        enable_checkpointing=False, logger=CSVLogger(tmp_path / "logs", name="run"), callbacks=callbacks,
    )
    trainer.fit(StandInModule(config, **module_kwargs), datamodule=StandInData())
    return trainer


def logged_metrics(trainer) -> list[dict[str, str]]:
    with open(f"{trainer.logger.log_dir}/metrics.csv") as handle:
        return list(csv.DictReader(handle))


def test_callbacks_in_a_real_trainer(tmp_path, tiny_config, capsys):
    monitor, printer, plot = ThroughputMonitor(warmup_steps=2), ProgressPrinter(log_every_n_steps=2), LossPlot()
    trainer = fit(tmp_path, tiny_config, [monitor, printer, plot])
    out = capsys.readouterr().out

    # Throughput: logged every step, positive, consistent with the FLOP count; no MFU on CPU.
    rows = [r for r in logged_metrics(trainer) if r.get("throughput/tokens_per_sec_per_gpu")]
    assert len(rows) == 6
    for row in rows:
        step_time = float(row["throughput/step_time_s"])
        assert float(row["throughput/tokens_per_sec_per_gpu"]) == pytest.approx(GLOBAL_BATCH * SEQ_LENGTH / step_time)
        tflops = training_flops_per_step(tiny_config, GLOBAL_BATCH, SEQ_LENGTH) / step_time / 1e12
        assert float(row["throughput/tflops_per_gpu"]) == pytest.approx(tflops)
        assert float(row["memory/max_rss_gib"]) > 0
    assert "throughput/mfu" not in rows[0] and "throughput/mfu" not in monitor.last_metrics
    assert monitor.last_metrics["throughput/tokens_per_sec_per_gpu"] > 0
    assert len(monitor.step_times) == 6 - 2  # warm-up steps left out of the average
    assert monitor.average_metrics["throughput/tflops_per_gpu"] > 0

    # Progress lines every 2 steps, and validation losses (sanity check included).
    lines = [line for line in out.splitlines() if line.startswith("step ")]
    assert [line.split(" |")[0] for line in lines] == ["step 2/6", "step 4/6", "step 6/6"]
    pattern = r"step 6/6 \| loss \d+\.\d{3} \| lr 3\.0e-04 \| [\d.]+k? tok/s/gpu \| [\d.e-]+ TFLOP/s/gpu \| ETA \d+:\d\d:\d\d"
    assert re.fullmatch(pattern, lines[-1]), lines[-1]
    assert "MFU" not in out
    assert re.search(r"^sanity check \| val_loss \d+\.\d{4}$", out, re.MULTILINE)
    assert re.search(r"^validation at step 3 \| val_loss", out, re.MULTILINE)
    assert re.search(r"^validation at step 6 \| val_loss", out, re.MULTILINE)

    # Loss plot and CSV in the logger's directory.
    assert plot.plot_path.parent == plot.csv_path.parent == tmp_path / "logs" / "run" / "version_0"
    assert plot.plot_path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and plot.plot_path.stat().st_size > 10_000
    train, validation = read_loss_csv(plot.csv_path)
    assert sorted(train) == [1, 2, 3, 4, 5, 6] and all(v > 1.0 for v in train.values())
    assert sorted(validation) == [0, 3, 6]


def test_val_loss_logged_at_module_epoch_end_is_seen(tmp_path, tiny_config, capsys):
    """Callbacks' on_validation_epoch_end runs before the module's: reading in on_validation_end
    still gets a val_loss the module logs in its own on_validation_epoch_end."""
    plot = LossPlot(output_dir=tmp_path / "plot")
    fit(tmp_path, tiny_config, [ProgressPrinter(log_every_n_steps=100), plot], val_loss_at_epoch_end=True)
    assert sorted(plot.validation) == [0, 3, 6]
    assert capsys.readouterr().out.count("val_loss") == 3


def test_loss_plot_merges_with_an_earlier_run(tmp_path, tiny_config):
    """A second run writing to the same directory keeps the first run's points it does not
    replace, and its own points win at the steps both have."""
    directory = tmp_path / "plot"
    first = LossPlot(output_dir=directory)
    fit(tmp_path, tiny_config, [first], max_steps=6)
    second = LossPlot(output_dir=directory)
    fit(tmp_path, tiny_config, [second], max_steps=4, loss_offset=100.0)

    train, validation = read_loss_csv(directory / "loss.csv")
    assert sorted(train) == [1, 2, 3, 4, 5, 6]
    assert all(train[step] > 100 for step in (1, 2, 3, 4))  # the second run's
    assert all(train[step] < 100 for step in (5, 6))  # kept from the first
    assert validation[3] > 100 and validation[6] < 100
    assert (directory / "loss.png").stat().st_size > 10_000


def test_mfu_with_an_explicit_peak(tmp_path, tiny_config):
    monitor = ThroughputMonitor(warmup_steps=0, peak_tflops=1.0)
    fit(tmp_path, tiny_config, [monitor], max_steps=2)
    metrics = monitor.last_metrics
    assert metrics["throughput/mfu"] == pytest.approx(metrics["throughput/tflops_per_gpu"] / 1.0)


@pytest.mark.parametrize("name, peak", [
    ("NVIDIA H100 80GB HBM3", 989.4), ("NVIDIA H100 PCIe", 756.0), ("NVIDIA H200", 989.4),
    ("NVIDIA A100-SXM4-80GB", 312.0), ("NVIDIA A100 80GB PCIe", 312.0), ("NVIDIA H100 NVL", None),
    ("NVIDIA GeForce RTX 4090", None),
])
def test_peak_tflops_table(name, peak):
    assert peak_bf16_tflops(name) == peak


def test_loss_csv_carries_tokens_and_training_time_across_a_resumption(tmp_path, tiny_config):
    """Every point of loss.csv says how many tokens were trained and how many seconds the steps
    after the clock's warm-up took to reach it; a resumed run continues that clock where the
    checkpoint's step left it, so curves of a resumed run and of an uninterrupted one line up."""
    directory = tmp_path / "plot"
    first = fit(tmp_path, tiny_config, [ThroughputMonitor(warmup_steps=1), LossPlot(output_dir=directory)])
    first.save_checkpoint(tmp_path / "step6.ckpt")
    with open(directory / "loss.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert all(int(row["tokens"]) == int(row["step"]) * GLOBAL_BATCH * SEQ_LENGTH for row in rows)
    seconds = {int(row["step"]): float(row["train_seconds"]) for row in rows if row["split"] == "train"}
    assert seconds[1] == 0.0 and all(seconds[s] < seconds[s + 1] for s in range(1, 6))  # step 1: warm-up
    validation = {int(row["step"]): float(row["train_seconds"]) for row in rows if row["split"] == "val"}
    assert validation == {0: 0.0, 3: seconds[3], 6: seconds[6]}

    trainer = pl.Trainer(accelerator="cpu", devices=1, max_steps=9, val_check_interval=3, limit_val_batches=2,
                         num_sanity_val_steps=0, log_every_n_steps=1, enable_progress_bar=False,
                         enable_model_summary=False, enable_checkpointing=False, logger=False,
                         callbacks=[ThroughputMonitor(warmup_steps=1), LossPlot(output_dir=directory)])
    trainer.fit(StandInModule(tiny_config), datamodule=StandInData(), ckpt_path=tmp_path / "step6.ckpt")
    with open(directory / "loss.csv") as handle:
        resumed = {int(row["step"]): float(row["train_seconds"]) for row in csv.DictReader(handle)
                   if row["split"] == "train"}
    assert {s: resumed[s] for s in range(1, 7)} == pytest.approx(seconds, abs=1e-3)
    assert resumed[7] == pytest.approx(seconds[6], abs=1e-3)  # step 7: this process's warm-up
    assert resumed[7] < resumed[8] < resumed[9]
