"""A training run: the Trainer with its strategy and callbacks, and `pretrain(...)`.

What a run prints on global rank 0: a header before the model is built (model, parallel layout,
data, optimizer, where the outputs go), progress lines (callbacks.ProgressPrinter), the checkpoint
it resumed from (checkpoint.MegatronCheckpoint), and a summary at the end. The main job, the
Python API and the `falcon-h1` command all train through `pretrain`, so all print the same.

Directory of a run (`log_dir`):

    config.yaml                 the run's configuration: model, optimizer, schedule, data, trainer,
                                resume (also TensorBoard's hparams, tensorboard/hparams.yaml)
    checkpoints/step=NNNNNNN/   sharded checkpoints (see checkpoint_io.py)
    tensorboard/                TensorBoard event files
    loss.csv, loss.png          training and validation loss (written at the end of the run)
    result.json                 the TrainingResult (written at the end of the run)
"""

import dataclasses
import enum
import functools
import inspect
import json
import os
import struct
from dataclasses import asdict, dataclass
from pathlib import Path

import pytorch_lightning as pl
import torch
import yaml
from pytorch_lightning.loggers import TensorBoardLogger
from pytorch_lightning.plugins.environments import SLURMEnvironment
from pytorch_lightning.utilities import rank_zero_only

from falcon_h1.arguments import check_parallel_sizes, check_trainer_arguments
from falcon_h1.training import checkpoint_io
from falcon_h1.training.callbacks import LossPlot, ProgressPrinter, ThroughputMonitor, human_number
from falcon_h1.training.checkpoint import AutoResume, MegatronCheckpoint
from falcon_h1.training.precision import MegatronMixedPrecision
from falcon_h1.training.strategy import MegatronStrategy
from falcon_h1.training.watchdog import DEFAULT_HANG_TIMEOUT, HangWatchdog


def default_devices() -> int:
    """Processes on this node: torchrun's local world size, else 1 (one GPU, or the CPU)."""
    return int(os.environ.get("LOCAL_WORLD_SIZE", 1))


def slurm_environment() -> list[SLURMEnvironment]:
    """In a Slurm job, Lightning's SLURM environment without its own requeue: that one, on SIGUSR1,
    writes an hpc_ckpt_N.ckpt beside the run and requeues the job. Our jobs are submitted with
    --requeue and resume from the latest MegatronCheckpoint (AutoResume) instead: one checkpoint
    format, one place, and a save that is cut short never replaces a complete one."""
    return [SLURMEnvironment(auto_requeue=False)] if SLURMEnvironment.detect() else []


def build_trainer(log_dir: str, max_steps: int, strategy: MegatronStrategy | None = None,
                  precision: str | None = None, devices: int | None = None, num_nodes: int = 1,
                  val_check_interval: int = 100, limit_val_batches: int = 4, log_every_n_steps: int = 10,
                  checkpoint_every_n_steps: int | None = None, keep_last_k: int | None = 2,
                  save_at_start: bool = False, save_last: bool = True,
                  extra_callbacks: list | None = None,
                  hang_timeout: float | None = DEFAULT_HANG_TIMEOUT) -> pl.Trainer:
    """A Trainer set up for Megatron training: MegatronStrategy, Megatron precision, progress lines,
    throughput/MFU, TensorBoard, the loss plot and sharded checkpoints under `log_dir`.

    precision defaults to "bf16-mixed" on GPU and "32" on CPU. Validation runs every
    `val_check_interval` steps over `limit_val_batches` global batches, and once before the first
    step (the step-0 validation loss). A checkpoint is written every `checkpoint_every_n_steps` and,
    with `save_last`, at the end. A rank that makes no progress (no training or validation batch,
    no checkpoint save begun) for `hang_timeout` seconds prints where it is and exits non-zero
    (watchdog.HangWatchdog; None or 0: no watchdog).
    """
    check_trainer_arguments(max_steps, val_check_interval, limit_val_batches, log_every_n_steps,
                            checkpoint_every_n_steps, keep_last_k, devices, num_nodes, hang_timeout)
    if isinstance(strategy, MegatronStrategy):  # its layout against the processes, before any start
        check_parallel_sizes(strategy.tensor_model_parallel_size, strategy.pipeline_model_parallel_size,
                             strategy.virtual_pipeline_model_parallel_size, strategy.context_parallel_size,
                             world_size=(devices or default_devices()) * num_nodes)
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
        HangWatchdog(hang_timeout),  # last: its batch-end beat comes after the saves of the step
    ]
    return pl.Trainer(
        accelerator="gpu" if on_gpu else "cpu",
        devices=devices or default_devices(),
        num_nodes=num_nodes,
        strategy=strategy or MegatronStrategy(),
        plugins=[MegatronMixedPrecision(precision), *slurm_environment()],
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
    model_name: str | None = None  # the preset the model has the shape of (preset_of)

    def to_json(self) -> dict:
        return {k: str(v) if isinstance(v, Path) else v for k, v in asdict(self).items()}

    def summary(self) -> str:
        """What the run trained and where its outputs are, as printed at the end of a run."""
        losses = ", ".join(f"{name} {value:.4f}" for name, value in
                           (("train loss", self.train_loss), ("validation loss", self.val_loss)) if value is not None)
        name = f" '{self.model_name}'" if self.model_name else ""
        lines = [f"trained Falcon-H1{name} to step {self.global_step}" + (f": {losses}" if losses else ""),
                 f"checkpoint:  {self.checkpoint or 'none written'}",
                 f"TensorBoard: tensorboard --logdir {self.log_dir / 'tensorboard'}"]
        if self.loss_plot is not None:
            lines.append(f"loss plot:   {self.loss_plot}")
        lines.append(f"config:      {self.log_dir / 'config.yaml'}")
        return "\n".join(lines)


def callback_of(trainer: pl.Trainer, kind: type):
    """The trainer's callback of class `kind`, None if it has none."""
    return next((c for c in trainer.callbacks if isinstance(c, kind)), None)


def checkpoint_callback(trainer: pl.Trainer) -> MegatronCheckpoint | None:
    return callback_of(trainer, MegatronCheckpoint)


def run_directory(trainer: pl.Trainer) -> Path:
    """Where the run's config, plot and result go: the logger's directory, else the trainer's root."""
    return Path(trainer.logger.save_dir if trainer.logger else trainer.default_root_dir).absolute()


def pretrain(model, data, trainer: pl.Trainer, resume: AutoResume | None = None) -> TrainingResult:
    """Train `model` (a FalconH1Module) on `data` with `trainer`; resume per `resume` (default:
    from the latest complete checkpoint of this run's directory, if any). Rank 0 prints a header
    before the model is built and a summary at the end, and writes the run's configuration to
    LOG_DIR/config.yaml (also the TensorBoard hparams) and the result to LOG_DIR/result.json."""
    resume = resume or AutoResume()
    resume.validate()
    if getattr(model, "tokenizer_dir", None) is None and getattr(data, "tokenizer_dir", None):
        model.tokenizer_dir = data.tokenizer_dir  # stored with every checkpoint
    checkpointer = checkpoint_callback(trainer)
    checkpoint_dir = checkpointer.dirpath if checkpointer else None
    ckpt_path = resume.checkpoint_to_resume(checkpoint_dir)
    trainer.strategy.fall_back_if_damaged = resume.fall_back_if_damaged
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
    config = run_config(model, data, trainer, resume, ckpt_path)
    # Lightning logs a module's hparams at fit start: TensorBoard's hparams and hparams.yaml.
    model.save_hyperparameters(config)
    if rank_zero_only.rank == 0:  # trainer.is_global_zero is known once fit has set up the processes
        print(run_header(model, data, trainer), flush=True)
        directory = run_directory(trainer)
        directory.mkdir(parents=True, exist_ok=True)
        (directory / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    watchdog = callback_of(trainer, HangWatchdog)
    try:
        trainer.fit(model, datamodule=data, ckpt_path=ckpt_path)
    finally:
        if watchdog is not None:  # fit has returned, or raised after its teardown
            watchdog.close()
    plot = callback_of(trainer, LossPlot)
    throughput = callback_of(trainer, ThroughputMonitor)
    metrics = trainer.callback_metrics
    checkpoint, loss_plot = getattr(checkpointer, "last_checkpoint", None), getattr(plot, "plot_path", None)
    result = TrainingResult(
        global_step=trainer.global_step,
        checkpoint=checkpoint and checkpoint.absolute(),  # paths that work from any directory
        log_dir=run_directory(trainer),
        loss_plot=loss_plot and loss_plot.absolute(),
        train_loss=float(metrics["reduced_train_loss"]) if "reduced_train_loss" in metrics else None,
        val_loss=float(metrics["val_loss"]) if "val_loss" in metrics else None,
        throughput=throughput.average_metrics if throughput else None,
        model_name=preset_of(model.config),
    )
    if trainer.is_global_zero:
        if trainer.logger:
            (result.log_dir / "result.json").write_text(json.dumps(result.to_json(), indent=2) + "\n")
        print("\n" + result.summary(), flush=True)
    return result


# ---------------------------------------------------------------- the header


# The fields that make a preset's shape (falcon_h1/model/presets.py).
_SHAPE_FIELDS = ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads", "num_query_groups",
                 "kv_channels", "mamba_num_heads", "mamba_head_dim", "mamba_state_dim", "vocab_size")


def preset_of(config) -> str | None:
    """The preset whose shape `config` has ("tiny"), a near one with the fields that differ
    ("tiny with num_layers=2"), or None."""
    from falcon_h1.model.presets import PRESETS, preset_fields

    def differences(name: str) -> list[str]:
        fields = preset_fields(name)
        return [f"{k}={getattr(config, k)}" for k in _SHAPE_FIELDS if getattr(config, k) != fields.get(k)]

    nearest = min(PRESETS, key=lambda name: len(differences(name)))
    different = differences(nearest)
    if len(different) > 2:
        return None
    return f"{nearest} with {', '.join(different)}" if different else nearest


def indexed_dataset_size(prefix: str) -> tuple[int, int]:
    """(tokens, documents) of a Megatron indexed dataset, from its .idx header and its .bin size:
    cheap at any size. The header is magic (9 bytes), version (8), dtype code (1), sequence and
    document counts (8 each; the document index starts with a 0)."""
    from megatron.core.datasets.indexed_dataset import DType

    with open(f"{prefix}.idx", "rb") as index:
        index.seek(17)
        dtype = DType.dtype_from_code(index.read(1)[0])
        _, document_entries = struct.unpack("<QQ", index.read(16))
    return os.path.getsize(f"{prefix}.bin") // DType.size(dtype), document_entries - 1


def _dataset_sizes(prefixes: list[str]) -> str:
    from falcon_h1.data.sharded import shard_prefixes

    sizes = [indexed_dataset_size(shard) for prefix in prefixes for shard in shard_prefixes(prefix)]
    return f"{human_number(sum(t for t, _ in sizes))} tokens, {sum(d for _, d in sizes):,} documents"


def _describe_prefixes(prefixes: list[str]) -> str:
    where = prefixes[0] if len(prefixes) == 1 else f"a blend of {len(prefixes)} datasets ({prefixes[0]}, ...)"
    return f"{where} ({_dataset_sizes(prefixes)})"


def describe_data(data) -> str:
    """What the data module reads, with its size where the data says it cheaply."""
    from falcon_h1.data.pretraining import parse_blend

    paths = getattr(data, "paths", None)
    if isinstance(paths, dict):  # indexed datasets, one per split
        splits = {name: parse_blend(p)[0] for name, p in paths.items() if p}
        directories = {str(Path(prefix).parent) for prefixes in splits.values() for prefix in prefixes}
        if len(directories) == 1 and all(len(prefixes) == 1 for prefixes in splits.values()):
            return f"{directories.pop()}: " + ", ".join(
                f"{Path(prefix).name} ({_dataset_sizes([prefix])})" for (prefix,) in splits.values())
        return "; ".join(f"{name} {_describe_prefixes(prefixes)}" for name, prefixes in splits.items())
    if paths is not None:  # indexed datasets split by `split`
        return f"{_describe_prefixes(parse_blend(paths)[0])}, split {data.split}"
    if hasattr(data, "train_path"):  # SFT jsonl
        validation = getattr(data, "validation_path", None)
        return f"{type(data).__name__} {data.train_path}" + (f", validation {validation}" if validation else "")
    if hasattr(data, "vocab_size"):
        vocabulary = f"vocabulary {data.vocab_size:,}" if data.vocab_size else "the model's vocabulary"
        return f"random tokens ({type(data).__name__}, {vocabulary})"
    return type(data).__name__


def _layout(trainer: pl.Trainer) -> str:
    world = trainer.num_devices * trainer.num_nodes
    device = type(trainer.accelerator).__name__.removesuffix("Accelerator").replace("CUDA", "GPU")
    processes = f"{world} process{'es' if world > 1 else ''} on {device} " \
                f"({trainer.num_devices} device{'s' if trainer.num_devices > 1 else ''} x " \
                f"{trainer.num_nodes} node{'s' if trainer.num_nodes > 1 else ''})"
    strategy = trainer.strategy
    if not isinstance(strategy, MegatronStrategy):
        return f"{processes}, {type(strategy).__name__}"
    tp, pp, cp = (strategy.tensor_model_parallel_size, strategy.pipeline_model_parallel_size,
                  strategy.context_parallel_size)
    parts = [f"TP {tp}" + (" (sequence parallel)" if strategy.sequence_parallel and tp > 1 else ""),
             f"PP {pp}" + (f" (virtual {strategy.virtual_pipeline_model_parallel_size})"
                           if strategy.virtual_pipeline_model_parallel_size else ""),
             f"CP {cp}", f"DP {world // (tp * pp * cp) if world % (tp * pp * cp) == 0 else '?'}"]
    return f"{processes}: {' x '.join(parts)}"


def _optimizer(model, trainer: pl.Trainer) -> str:
    from falcon_h1.training.optim import resolved_min_lr

    optimizer, schedule = model.optimizer_config, model.lr_schedule
    steps = schedule.steps(trainer.max_steps)
    text = f"{optimizer.optimizer}, lr {optimizer.lr:.1e} -> {resolved_min_lr(optimizer):.1e} " \
           f"({schedule.decay_style}, warm-up {steps.warmup} of {steps.decay} steps), " \
           f"weight decay {optimizer.weight_decay}, clip {optimizer.clip_grad}"
    precision = getattr(trainer.precision_plugin, "precision", None)
    return text + (f"; precision {precision}" if precision else "")


def _outputs(trainer: pl.Trainer) -> str:
    parts = []
    checkpointer = checkpoint_callback(trainer)
    if checkpointer is not None:
        when = [f"every {checkpointer.every_n_train_steps} steps"] if checkpointer.every_n_train_steps else []
        when += ["at the end"] if checkpointer.save_last else []
        keep = f", last {checkpointer.keep_last_k} kept" if checkpointer.keep_last_k else ""
        parts.append(f"checkpoints/ ({' and '.join(when) or 'none'}{keep})")
    if trainer.logger:
        parts.append("tensorboard/")
    if any(isinstance(c, LossPlot) for c in trainer.callbacks):
        parts.append("loss.png")
    parts.append("config.yaml")
    return f"{run_directory(trainer)}: {', '.join(parts)}"


def run_header(model, data, trainer: pl.Trainer) -> str:
    """The lines a run prints before the model is built."""
    from falcon_h1.model.param_count import parameter_count

    config = model.config
    preset = preset_of(config)
    title = f"Falcon-H1 {preset or 'model'}: {human_number(parameter_count(config)['total'])} parameters " \
            f"({config.num_layers} layers, hidden {config.hidden_size}, vocabulary {config.vocab_size:,})"
    if getattr(model, "peft", None) is not None:
        title += f", LoRA rank {model.peft.dim} adapters trained"
    if trainer.strategy.restore_weights_from:
        title += f", starting from the weights of {Path(trainer.strategy.restore_weights_from).absolute()}"
    tokens_per_step = data.global_batch_size * data.seq_length
    lines = [
        title,
        f"  layout     {_layout(trainer)}",
        f"  data       {describe_data(data)}",
        f"  batches    {data.global_batch_size} x {data.seq_length} tokens (micro-batch {data.micro_batch_size}): "
        f"{human_number(tokens_per_step)} tokens per step, {human_number(tokens_per_step * trainer.max_steps)} "
        f"in {trainer.max_steps:,} steps",
        f"  optimizer  {_optimizer(model, trainer)}",
        f"  outputs    {_outputs(trainer)}",
    ]
    return "\n".join(lines)


# ---------------------------------------------------------------- the run's configuration


def plain(value):
    """`value` as YAML and TensorBoard take it: numbers, strings, lists and dicts of them."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (Path, torch.dtype)):
        return str(value).removeprefix("torch.")
    if isinstance(value, enum.Enum):
        return value.name
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return changed_fields(value)
    if isinstance(value, dict):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set)):
        return [plain(v) for v in value]
    if isinstance(value, functools.partial):
        arguments = [repr(a) for a in value.args] + [f"{k}={v!r}" for k, v in value.keywords.items()]
        return f"{plain(value.func)}({', '.join(arguments)})"
    if callable(value) and hasattr(value, "__qualname__"):
        return f"{getattr(value, '__module__', None) or ''}.{value.__qualname__}".lstrip(".")
    return repr(value)


def _default(field: dataclasses.Field):
    if field.default is not dataclasses.MISSING:
        return field.default
    if field.default_factory is not dataclasses.MISSING:
        return field.default_factory()
    return dataclasses.MISSING


def _same(a, b) -> bool:
    try:
        return bool(a == b)
    except Exception:  # tensors, arrays: compare as different
        return False


def changed_fields(instance, always: tuple[str, ...] = ()) -> dict:
    """A dataclass as a dict: the fields set to something other than their default (what a recipe
    or a user chose), the fields of falcon_h1's own classes, and `always`."""
    own = type(instance).__module__.startswith("falcon_h1.")
    inherited = {f.name for base in type(instance).__mro__[1:] if dataclasses.is_dataclass(base)
                 for f in dataclasses.fields(base)}
    out = {}
    for field in dataclasses.fields(instance):
        value = getattr(instance, field.name)
        declared_here = own and field.name not in inherited
        if declared_here or field.name in always or not _same(value, _default(field)):
            out[field.name] = plain(value)
    return out


def constructor_arguments(obj) -> dict:
    """The arguments of `type(obj).__init__` that `obj` keeps as attributes of the same name."""
    parameters = inspect.signature(type(obj).__init__).parameters
    return {name: plain(getattr(obj, name)) for name, p in parameters.items()
            if name != "self" and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD) and hasattr(obj, name)}


def _class_name(obj) -> str:
    return f"{type(obj).__module__}.{type(obj).__qualname__}"


# The optimizer settings shown even at Megatron's defaults: what one reads a run's config for.
_OPTIMIZER_FIELDS = ("optimizer", "lr", "min_lr", "weight_decay", "adam_beta1", "adam_beta2", "adam_eps", "clip_grad")


def run_config(model, data, trainer: pl.Trainer, resume: AutoResume, resumed_from: str | None = None) -> dict:
    """The run's configuration, nested as a recipe is (model.optimizer.lr, trainer.strategy...)."""
    from falcon_h1.model.param_count import parameter_count

    checkpointer = checkpoint_callback(trainer)
    progress = callback_of(trainer, ProgressPrinter)
    trainer_config = {
        "log_dir": str(run_directory(trainer)),
        "max_steps": trainer.max_steps,
        "accelerator": type(trainer.accelerator).__name__,
        "devices": trainer.num_devices,
        "num_nodes": trainer.num_nodes,
        "precision": getattr(trainer.precision_plugin, "precision", None),
        "val_check_interval": plain(trainer.val_check_interval),
        "limit_val_batches": plain(trainer.limit_val_batches),
        "log_every_n_steps": progress.log_every_n_steps if progress else trainer.log_every_n_steps,
        "strategy": {"class": _class_name(trainer.strategy), **constructor_arguments(trainer.strategy)},
    }
    watchdog = callback_of(trainer, HangWatchdog)
    if watchdog is not None:
        trainer_config["hang_timeout"] = watchdog.timeout
    if checkpointer is not None:
        trainer_config.update(checkpoint_every_n_steps=checkpointer.every_n_train_steps,
                              keep_last_k=checkpointer.keep_last_k, save_last=checkpointer.save_last,
                              save_at_start=checkpointer.save_at_start)
    return {
        "model": {
            "class": _class_name(model),
            "preset": preset_of(model.config),
            "parameters": parameter_count(model.config)["total"],
            "config": changed_fields(model.config),
            "optimizer": changed_fields(model.optimizer_config, always=_OPTIMIZER_FIELDS),
            "lr_schedule": plain(model.lr_schedule),
            "tokenizer_dir": model.tokenizer_dir,
            "peft": plain(model.peft),
        },
        "data": {"class": _class_name(data), **constructor_arguments(data)},
        "trainer": trainer_config,
        "resume": {**plain(resume), "resumed_from": str(Path(resumed_from).absolute()) if resumed_from else None},
    }
