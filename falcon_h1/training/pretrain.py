"""A training run: the Trainer with its strategy and callbacks, and `pretrain(...)`.

Directory of a run (`log_dir`):

    checkpoints/step=NNNNNNN/   sharded checkpoints (see checkpoint_io.py)
    tensorboard/                TensorBoard event files
    loss.csv, loss.png          training and validation loss (written at the end of the run)
"""

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import pytorch_lightning as pl
import torch
from pytorch_lightning.loggers import TensorBoardLogger

from falcon_h1.training import checkpoint_io
from falcon_h1.training.callbacks import LossPlot, ProgressPrinter, ThroughputMonitor
from falcon_h1.training.checkpoint import AutoResume, MegatronCheckpoint
from falcon_h1.training.precision import MegatronMixedPrecision
from falcon_h1.training.strategy import MegatronStrategy


def default_devices() -> int:
    """Processes on this node: torchrun's local world size, else 1 (one GPU, or the CPU)."""
    return int(os.environ.get("LOCAL_WORLD_SIZE", 1))


def build_trainer(log_dir: str, max_steps: int, strategy: MegatronStrategy | None = None,
                  precision: str | None = None, devices: int | None = None, num_nodes: int = 1,
                  val_check_interval: int = 100, limit_val_batches: int = 4, log_every_n_steps: int = 10,
                  checkpoint_every_n_steps: int | None = None, keep_last_k: int | None = 2,
                  save_at_start: bool = False, save_last: bool = True,
                  extra_callbacks: list | None = None) -> pl.Trainer:
    """A Trainer set up for Megatron training: MegatronStrategy, Megatron precision, progress lines,
    throughput/MFU, TensorBoard, the loss plot and sharded checkpoints under `log_dir`.

    precision defaults to "bf16-mixed" on GPU and "32" on CPU. Validation runs every
    `val_check_interval` steps over `limit_val_batches` global batches, and once before the first
    step (the step-0 validation loss). A checkpoint is written every `checkpoint_every_n_steps` and,
    with `save_last`, at the end.
    """
    on_gpu = torch.cuda.is_available()
    precision = precision or ("bf16-mixed" if on_gpu else "32")
    log_dir = Path(log_dir)
    throughput = ThroughputMonitor()
    callbacks = [
        throughput,
        ProgressPrinter(log_every_n_steps=log_every_n_steps),
        LossPlot(output_dir=log_dir),
        MegatronCheckpoint(log_dir / "checkpoints", every_n_train_steps=checkpoint_every_n_steps,
                           keep_last_k=keep_last_k, save_at_start=save_at_start, save_last=save_last),
        *(extra_callbacks or []),
    ]
    return pl.Trainer(
        accelerator="gpu" if on_gpu else "cpu",
        devices=devices or default_devices(),
        num_nodes=num_nodes,
        strategy=strategy or MegatronStrategy(),
        plugins=[MegatronMixedPrecision(precision)],
        max_steps=max_steps,
        max_epochs=-1,
        val_check_interval=min(val_check_interval, max_steps),
        check_val_every_n_epoch=None,
        limit_val_batches=limit_val_batches,
        num_sanity_val_steps=limit_val_batches,  # a full validation before the first step
        log_every_n_steps=1,
        logger=TensorBoardLogger(str(log_dir), name="tensorboard", version=""),
        callbacks=callbacks,
        enable_checkpointing=False,  # MegatronCheckpoint writes the sharded checkpoints
        enable_progress_bar=False,  # ProgressPrinter's lines work in logs and notebooks alike
        enable_model_summary=False,
        use_distributed_sampler=False,  # the data modules sample by data-parallel rank
    )


@dataclass
class TrainingResult:
    global_step: int
    checkpoint: Path | None
    log_dir: Path
    loss_plot: Path | None
    train_loss: float | None
    val_loss: float | None
    throughput: dict[str, float] | None = None  # ThroughputMonitor's averages after warm-up

    def to_json(self) -> dict:
        return {k: str(v) if isinstance(v, Path) else v for k, v in asdict(self).items()}


def checkpoint_callback(trainer: pl.Trainer) -> MegatronCheckpoint | None:
    return next((c for c in trainer.callbacks if isinstance(c, MegatronCheckpoint)), None)


def pretrain(model, data, trainer: pl.Trainer, resume: AutoResume | None = None) -> TrainingResult:
    """Train `model` (a FalconH1Module) on `data` with `trainer`; resume per `resume` (default:
    from the latest complete checkpoint of this run's directory, if any). Rank 0 writes the
    result to LOG_DIR/result.json."""
    resume = resume or AutoResume()
    resume.validate()
    if getattr(model, "tokenizer_dir", None) is None and getattr(data, "tokenizer_dir", None):
        model.tokenizer_dir = data.tokenizer_dir  # stored with every checkpoint
    checkpointer = checkpoint_callback(trainer)
    checkpoint_dir = checkpointer.dirpath if checkpointer else None
    ckpt_path = resume.checkpoint_to_resume(checkpoint_dir)
    lora = getattr(model, "peft", None)
    if ckpt_path is None and resume.restore_weights_from:
        trainer.strategy.restore_weights_from = resume.restore_weights_from
    elif ckpt_path is not None and lora is not None:
        # A LoRA checkpoint holds the adapters alone; the base weights come from the checkpoint
        # they were trained on.
        trainer.strategy.restore_weights_from = str(checkpoint_io.base_checkpoint_of(ckpt_path))
    if lora is not None and trainer.strategy.restore_weights_from is None:
        raise ValueError("LoRA trains adapters on a base model: give the base checkpoint with "
                         "resume=AutoResume(restore_weights_from=PATH) (resume.restore_weights_from=PATH)")
    trainer.fit(model, datamodule=data, ckpt_path=ckpt_path)
    plot = next((c for c in trainer.callbacks if isinstance(c, LossPlot)), None)
    throughput = next((c for c in trainer.callbacks if isinstance(c, ThroughputMonitor)), None)
    metrics = trainer.callback_metrics
    result = TrainingResult(
        global_step=trainer.global_step,
        checkpoint=checkpointer.last_checkpoint if checkpointer else None,
        log_dir=Path(trainer.logger.save_dir) if trainer.logger else Path("."),
        loss_plot=getattr(plot, "plot_path", None),
        train_loss=float(metrics["reduced_train_loss"]) if "reduced_train_loss" in metrics else None,
        val_loss=float(metrics["val_loss"]) if "val_loss" in metrics else None,
        throughput=throughput.average_metrics if throughput else None,
    )
    if trainer.is_global_zero and trainer.logger:
        (result.log_dir / "result.json").write_text(json.dumps(result.to_json(), indent=2) + "\n")
    return result
