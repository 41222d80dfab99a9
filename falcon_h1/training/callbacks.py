"""Observability callbacks: throughput / MFU / memory, a plain-text progress line, a loss plot.

None of them calls a collective: ranks reach callback hooks at different times (pipeline stages,
uneven data), so every number here is this rank's own; the loggers keep rank 0's.

Put ThroughputMonitor before ProgressPrinter in the callback list, so the progress line shows the
step that just finished rather than the one before.

Hook order, pytorch_lightning 2.6 (loops/evaluation_loop.py, `on_run_end`): callbacks'
`on_validation_epoch_end` runs BEFORE the LightningModule's, and values the module logs there
reach `trainer.callback_metrics` only after both. `on_validation_end` runs after that, callbacks
first then the module, so the callbacks read `val_loss` in `on_validation_end`.
"""

from __future__ import annotations

import csv
import math
import sys
import time
from collections import deque
from datetime import timedelta
from pathlib import Path

import pytorch_lightning as pl
import torch

from falcon_h1.training.flops import training_flops_per_step

GIB = 2**30

# Peak dense bf16 tensor-core TFLOP/s per GPU (no sparsity), by device-name fragments, matched in
# order, case-insensitively, against torch.cuda.get_device_name(). H100 NVL (835) is a different
# part and stays unknown rather than borrowing the SXM figure.
PEAK_BF16_TFLOPS: tuple[tuple[tuple[str, ...], float | None], ...] = (
    (("H200",), 989.4),
    (("H100", "PCIE"), 756.0),
    (("H100", "NVL"), None),
    (("H100",), 989.4),  # SXM5, which reports itself as "NVIDIA H100 80GB HBM3"
    (("A100",), 312.0),
)


def peak_bf16_tflops(device_name: str) -> float | None:
    """Peak dense bf16 TFLOP/s of a GPU given its name, or None when the card is not in the table."""
    name = device_name.upper()
    for fragments, tflops in PEAK_BF16_TFLOPS:
        if all(fragment in name for fragment in fragments):
            return tflops
    return None


def max_rss_gib() -> float | None:
    """This process's peak resident set size, or None where `resource` does not exist (Windows)."""
    try:
        import resource
    except ImportError:
        return None
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / GIB if sys.platform == "darwin" else rss * 1024 / GIB  # bytes on macOS, KiB on Linux


def _metric(trainer: pl.Trainer, key: str) -> float | None:
    value = trainer.callback_metrics.get(key)
    return None if value is None else float(value)


def _find_callback(trainer: pl.Trainer, kind: type) -> pl.Callback | None:
    return next((callback for callback in trainer.callbacks if isinstance(callback, kind)), None)


def _tokens_per_step(trainer: pl.Trainer) -> int | None:
    """global_batch_size x seq_length of the data module, or None when it does not say."""
    datamodule = getattr(trainer, "datamodule", None)
    batch, length = getattr(datamodule, "global_batch_size", None), getattr(datamodule, "seq_length", None)
    return batch * length if batch and length else None


def _total_steps(trainer: pl.Trainer) -> int | None:
    if trainer.max_steps and trainer.max_steps > 0:
        return trainer.max_steps
    estimated = trainer.estimated_stepping_batches
    return int(estimated) if math.isfinite(estimated) else None


class ThroughputMonitor(pl.Callback):
    """Per-rank step time, tokens/s, model TFLOP/s and MFU per GPU, and peak memory.

    A step is timed from `on_train_batch_start` to `on_train_batch_end` (one global batch: forward,
    backward and optimizer step), synchronizing the GPU at both ends. Logged each step:
    `throughput/step_time_s`, `throughput/tokens_per_sec_per_gpu`, `throughput/tflops_per_gpu`,
    `throughput/mfu` (only with a known peak: `peak_tflops`, or a card in PEAK_BF16_TFLOPS), and
    `memory/peak_allocated_gib` + `memory/peak_reserved_gib` on CUDA (peaks reset every
    `memory_interval` steps, default the trainer's log_every_n_steps) or `memory/max_rss_gib` on CPU.

    The first `warmup_steps` steps (compilation, autotuning, CUDA-graph capture, allocator growth)
    are logged but left out of `average_metrics`, the mean over the last `window` steps, and of
    `train_seconds`, the time this process has spent in the steps after them (validation and
    checkpoints not counted): the clock that runs of different models are compared on.
    """

    def __init__(self, warmup_steps: int = 2, peak_tflops: float | None = None, window: int = 20,
                 memory_interval: int | None = None):
        self.warmup_steps = warmup_steps
        self.peak_tflops_override = peak_tflops
        self.memory_interval = memory_interval
        self.step_times: deque[float] = deque(maxlen=window)
        self.last_metrics: dict[str, float] = {}
        self.peak_tflops: float | None = None
        self.flops_per_step: float | None = None
        self.tokens_per_step: int | None = None
        self.world_size = 1
        self._steps_seen = 0
        self.train_seconds = 0.0
        self._start: float | None = None
        self._on_cuda = False

    def on_fit_start(self, trainer, pl_module):
        self._on_cuda = pl_module.device.type == "cuda"
        self.world_size = max(trainer.world_size, 1)
        self.peak_tflops = self.peak_tflops_override
        if self.peak_tflops is None and self._on_cuda:
            self.peak_tflops = peak_bf16_tflops(torch.cuda.get_device_name(pl_module.device))
        if self._on_cuda:
            torch.cuda.reset_peak_memory_stats(pl_module.device)

    def _resolve_work_per_step(self, trainer, pl_module) -> None:
        # Read at the first step: data modules may set their shapes in setup().
        self.tokens_per_step = _tokens_per_step(trainer)
        config = getattr(pl_module, "config", None)
        if self.tokens_per_step and config is not None:
            datamodule = trainer.datamodule
            self.flops_per_step = training_flops_per_step(config, datamodule.global_batch_size,
                                                          datamodule.seq_length)

    def _synchronize(self, pl_module) -> None:
        if self._on_cuda:
            torch.cuda.synchronize(pl_module.device)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if self._steps_seen == 0:
            self._resolve_work_per_step(trainer, pl_module)
        self._synchronize(pl_module)
        self._start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if self._start is None:
            return
        self._synchronize(pl_module)
        step_time = time.perf_counter() - self._start
        self._start = None
        self._steps_seen += 1
        if self._steps_seen > self.warmup_steps:
            self.step_times.append(step_time)
            self.train_seconds += step_time

        metrics = self.metrics_for_step_time(step_time)
        metrics.update(self._memory_metrics(trainer, pl_module))
        self.last_metrics = metrics
        for name, value in metrics.items():
            pl_module.log(name, value, on_step=True, on_epoch=False, sync_dist=False, batch_size=1)

    def metrics_for_step_time(self, step_time: float) -> dict[str, float]:
        """Throughput of a step that took step_time seconds, per GPU."""
        metrics = {"throughput/step_time_s": step_time}
        if self.tokens_per_step:
            metrics["throughput/tokens_per_sec_per_gpu"] = self.tokens_per_step / step_time / self.world_size
        if self.flops_per_step:
            tflops = self.flops_per_step / step_time / self.world_size / 1e12
            metrics["throughput/tflops_per_gpu"] = tflops
            if self.peak_tflops:
                metrics["throughput/mfu"] = tflops / self.peak_tflops
        return metrics

    @property
    def average_step_time(self) -> float | None:
        """Mean step time over the last `window` steps after warm-up, None during warm-up."""
        return sum(self.step_times) / len(self.step_times) if self.step_times else None

    @property
    def average_metrics(self) -> dict[str, float] | None:
        average = self.average_step_time
        return None if average is None else self.metrics_for_step_time(average)

    def _memory_metrics(self, trainer, pl_module) -> dict[str, float]:
        if not self._on_cuda:
            rss = max_rss_gib()
            return {} if rss is None else {"memory/max_rss_gib": rss}
        device = pl_module.device
        metrics = {
            "memory/peak_allocated_gib": torch.cuda.max_memory_allocated(device) / GIB,
            "memory/peak_reserved_gib": torch.cuda.max_memory_reserved(device) / GIB,
        }
        interval = self.memory_interval or trainer.log_every_n_steps or 1
        if trainer.global_step % interval == 0:
            torch.cuda.reset_peak_memory_stats(device)  # the next value is the next interval's peak
        return metrics


def human_number(value: float) -> str:
    """10500 -> '10.5k', 2.3e6 -> '2.3M'."""
    for scale, suffix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= scale:
            return f"{value / scale:.1f}{suffix}"
    return f"{value:.3g}"


def _tflops_text(tflops: float) -> str:
    return f"{tflops:.0f}" if tflops >= 10 else f"{tflops:.2g}"


class ProgressPrinter(pl.Callback):
    """One plain-text line every `log_every_n_steps` steps on global rank 0, flushed:

        step 120/400 | loss 3.214 | lr 2.9e-04 | 10.5k tok/s/gpu | 43 TFLOP/s/gpu | ETA 0:03:12

    Loss and lr are the `reduced_train_loss` and `lr` entries of trainer.callback_metrics;
    throughput comes from a ThroughputMonitor in the trainer's callbacks (left out without one).
    The ETA uses the mean wall-clock time between the last `window` step ends, data loading
    included, leaving out the intervals that contain a validation run. Validation prints its
    `val_loss` when it ends (the sanity check too). Meant for runs with Lightning's progress bar off.
    """

    def __init__(self, log_every_n_steps: int = 10, window: int = 20):
        self.log_every_n_steps = max(1, log_every_n_steps)
        self.intervals: deque[float] = deque(maxlen=window)
        self._last_end: float | None = None

    @staticmethod
    def _print(line: str) -> None:
        print(line, flush=True)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        now = time.perf_counter()
        if self._last_end is not None:
            self.intervals.append(now - self._last_end)
        self._last_end = now
        step, total = trainer.global_step, _total_steps(trainer)
        if trainer.is_global_zero and (step % self.log_every_n_steps == 0 or step == total):
            self._print(self.progress_line(trainer, step, total))

    def progress_line(self, trainer: pl.Trainer, step: int, total: int | None) -> str:
        parts = [f"step {step}/{total}" if total else f"step {step}"]
        loss, lr = _metric(trainer, "reduced_train_loss"), _metric(trainer, "lr")
        if loss is not None:
            parts.append(f"loss {loss:.3f}")
        if lr is not None:
            parts.append(f"lr {lr:.1e}")
        monitor = _find_callback(trainer, ThroughputMonitor)
        if monitor is not None:
            throughput = monitor.average_metrics or monitor.last_metrics
            if "throughput/tokens_per_sec_per_gpu" in throughput:
                parts.append(f"{human_number(throughput['throughput/tokens_per_sec_per_gpu'])} tok/s/gpu")
            if "throughput/tflops_per_gpu" in throughput:
                parts.append(f"{_tflops_text(throughput['throughput/tflops_per_gpu'])} TFLOP/s/gpu")
            if "throughput/mfu" in throughput:
                parts.append(f"MFU {100 * throughput['throughput/mfu']:.1f}%")
        parts.append(f"ETA {self._eta(step, total)}")
        return " | ".join(parts)

    def _eta(self, step: int, total: int | None) -> str:
        if not total or not self.intervals:
            return "?"
        seconds = (total - step) * sum(self.intervals) / len(self.intervals)
        return str(timedelta(seconds=round(max(seconds, 0.0))))

    def on_validation_start(self, trainer, pl_module):
        self._last_end = None  # the next interval would include this validation run

    def on_validation_end(self, trainer, pl_module):
        val_loss = _metric(trainer, "val_loss")
        if trainer.is_global_zero and val_loss is not None:
            where = "sanity check" if trainer.sanity_checking else f"validation at step {trainer.global_step}"
            self._print(f"{where} | val_loss {val_loss:.4f}")


def _log_dir_without_collective(trainer: pl.Trainer) -> str:
    """What trainer.log_dir returns on rank 0, without its broadcast (a collective: rank 0 alone
    must be able to ask)."""
    from pytorch_lightning.loggers import CSVLogger, TensorBoardLogger

    if trainer.loggers:
        logger = trainer.loggers[0]
        directory = logger.log_dir if isinstance(logger, (TensorBoardLogger, CSVLogger)) else logger.save_dir
        if directory:
            return directory
    return trainer.default_root_dir


class LossPlot(pl.Callback):
    """Records (step, reduced_train_loss) every step and (step, val_loss) after every validation,
    the sanity check's at the starting step included; writes `loss.csv` and `loss.png` on rank 0.
    Each point also gets the tokens trained to its step and the training time up to it
    (ThroughputMonitor's `train_seconds`, continued across resumptions; empty without one).

    Output goes to `output_dir`, or the trainer's log directory. A `loss.csv` already there (a run
    being resumed) is read at fit start; this run's points replace earlier ones at the same step.
    The CSV is rewritten after every validation and at every checkpoint, so that a run that dies
    keeps its history for the next; the PNG is drawn at the end of training. `self.plot_path` /
    `self.csv_path` say where.

    Validation losses are read from trainer.callback_metrics in `on_validation_end` (see the
    module docstring for why not `on_validation_epoch_end`); a module that logs val_loss only to
    its logger can hand the value over with `record_validation(step, value)`.
    """

    def __init__(self, output_dir: str | Path | None = None, log_y: bool = False,
                 model_name: str | None = None):
        self.output_dir = Path(output_dir) if output_dir is not None else None
        self.log_y = log_y
        self.model_name = model_name
        self.train: dict[int, float] = {}
        self.validation: dict[int, float] = {}
        self.seconds: dict[int, float] = {}  # step -> training seconds at its end
        self._clock: ThroughputMonitor | None = None
        self._seconds_before: float | None = None  # a resumed run's training time before this process
        self.plot_path: Path | None = None
        self.csv_path: Path | None = None
        self._tokens_per_step: int | None = None
        self._last_val_value = None

    def _directory(self, trainer) -> Path:
        return self.output_dir if self.output_dir is not None else Path(_log_dir_without_collective(trainer))

    def on_fit_start(self, trainer, pl_module):
        self._tokens_per_step = _tokens_per_step(trainer)
        if self.model_name is None:
            self.model_name = getattr(pl_module, "model_name", None) or type(pl_module).__name__
        if trainer.is_global_zero:
            self.csv_path = self._directory(trainer) / "loss.csv"
            self.plot_path = self.csv_path.with_name("loss.png")
            earlier_train, earlier_validation = read_loss_csv(self.csv_path)
            # This process's points (none yet) win over a previous run's at the same step.
            self.train = {**earlier_train, **self.train}
            self.validation = {**earlier_validation, **self.validation}
            self.seconds = {**read_loss_seconds(self.csv_path), **self.seconds}
            self._clock = _find_callback(trainer, ThroughputMonitor)
            if self._clock is not None:
                self.seconds.setdefault(0, 0.0)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.is_global_zero:
            loss = _metric(trainer, "reduced_train_loss")
            if loss is not None:
                self.train[trainer.global_step] = loss
            if self._clock is not None:
                if self._seconds_before is None:  # the first step of this process: where a resumed run was
                    before = [step for step in self.seconds if step < trainer.global_step]
                    self._seconds_before = self.seconds[max(before)] if before else 0.0
                self.seconds[trainer.global_step] = self._seconds_before + self._clock.train_seconds

    def on_validation_end(self, trainer, pl_module):
        if not trainer.is_global_zero:
            return
        value = trainer.callback_metrics.get("val_loss")
        # callback_metrics keeps the last value until replaced: record each computed value once.
        if value is not None and value is not self._last_val_value:
            self._last_val_value = value
            self.record_validation(trainer.global_step, float(value))
        if not trainer.sanity_checking and self.csv_path is not None:
            self._write_csv()

    def record_validation(self, step: int, value: float) -> None:
        self.validation[step] = value

    def on_save_checkpoint(self, trainer, pl_module, checkpoint):
        # The curve up to each checkpoint survives with it: a run that resumes there (a requeued
        # Slurm job, a crash) continues the curve instead of starting it at its first new step.
        if trainer.is_global_zero and self.csv_path is not None:
            self._write_csv()

    def on_train_end(self, trainer, pl_module):
        if not trainer.is_global_zero or self.csv_path is None:
            return
        self._write_csv()
        draw_loss_plot(self.plot_path, self.train, self.validation, self._title(), self.log_y)

    def _write_csv(self) -> None:
        write_loss_csv(self.csv_path, self.train, self.validation, self._tokens_per_step, self.seconds)

    def _title(self) -> str:
        last_step = max([*self.train, *self.validation], default=0)
        title = self.model_name or "loss"
        if self._tokens_per_step:
            title += f", {human_number(last_step * self._tokens_per_step)} tokens"
        return title


def read_loss_csv(path: Path) -> tuple[dict[int, float], dict[int, float]]:
    """The (train, validation) points of a loss.csv, empty when there is none."""
    train, validation = {}, {}
    if not path.is_file():
        return train, validation
    with path.open(newline="") as handle:
        for row in csv.DictReader(handle):
            points = train if row["split"] == "train" else validation
            points[int(row["step"])] = float(row["loss"])
    return train, validation


def read_loss_seconds(path: Path) -> dict[int, float]:
    """{step: training seconds at its end} of a loss.csv (none for steps written without a clock)."""
    if not path.is_file():
        return {}
    with path.open(newline="") as handle:
        return {int(row["step"]): float(row["train_seconds"]) for row in csv.DictReader(handle)
                if row.get("train_seconds")}


def write_loss_csv(path: Path, train: dict[int, float], validation: dict[int, float],
                   tokens_per_step: int | None = None, seconds: dict[int, float] | None = None) -> None:
    """step,split,tokens,train_seconds,loss rows sorted by step (tokens and seconds empty where not
    known); written to a temporary file then renamed, so a run killed mid-write leaves the previous
    file."""
    seconds = seconds or {}
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".csv.tmp")
    with partial.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["step", "split", "tokens", "train_seconds", "loss"])  # loss last, as it always was
        for split, points in (("train", train), ("val", validation)):
            for step in sorted(points):
                writer.writerow([step, split, step * tokens_per_step if tokens_per_step else "",
                                 f"{seconds[step]:.3f}" if step in seconds else "", repr(points[step])])
    partial.replace(path)


def draw_loss_plot(path: Path, train: dict[int, float], validation: dict[int, float], title: str,
                   log_y: bool = False) -> None:
    """Train loss as a thin line, validation loss as markers, saved as a PNG."""
    # The Agg canvas directly, not pyplot: no global backend switch in the user's process.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(8, 4.5), dpi=120)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    if train:
        steps = sorted(train)
        axes.plot(steps, [train[s] for s in steps], linewidth=0.8, label="train")
    if validation:
        steps = sorted(validation)
        axes.plot(steps, [validation[s] for s in steps], "o--", markersize=5, linewidth=0.8, label="validation")
    if log_y:
        axes.set_yscale("log")
    axes.set_xlabel("step")
    axes.set_ylabel("loss")
    axes.set_title(title)
    axes.grid(alpha=0.3)
    axes.legend()
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path)
