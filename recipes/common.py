"""Factories every recipe shares: model, optimizer + schedule, strategy, trainer, data, resume.

Each returns a fiddle config (`run.Config` / `run.Partial`), nothing is built until the job runs:
a recipe for a 34B model costs nothing to make, print, edit or serialize. A size module (e.g.
falcon_h1_1p5b.py) holds only a `Size` - what differs between sizes - and thin named factories.
"""

from dataclasses import dataclass

import nemo_run as run
import pytorch_lightning as pl
from megatron.core.optimizer import OptimizerConfig

from falcon_h1.api import finetune, pretrain
from falcon_h1.data.default_corpus import default_corpus_data
from falcon_h1.data.pretraining import DEFAULT_SPLIT, MockDataModule, PreTrainingDataModule
from falcon_h1.data.sft import SFTDataModule
from falcon_h1.model.config import FalconH1Config
from falcon_h1.model.lora import LoRA
from falcon_h1.model.presets import PRESETS, preset_fields
from falcon_h1.training.checkpoint import AutoResume
from falcon_h1.training.module import FalconH1Module
from falcon_h1.training.optim import ADAMW, LRSchedule
from falcon_h1.training.pretrain import build_trainer
from falcon_h1.training.strategy import MegatronStrategy
from falcon_h1.training.watchdog import DEFAULT_HANG_TIMEOUT


@dataclass(frozen=True)
class Size:
    """The defaults of one model size (each size module documents why)."""

    preset: str
    seq_length: int
    global_batch_size: int
    micro_batch_size: int
    tensor_parallel: int = 1
    pipeline_parallel: int = 1
    virtual_pipeline: int | None = None
    context_parallel: int = 1
    sequence_parallel: bool = False
    num_nodes: int = 1
    num_gpus_per_node: int = 8
    lr: float = 3e-4
    warmup_fraction: float = 0.005  # 500 steps of the default run
    max_steps: int = 100_000


# Falcon-H1's post-training settings (falcon_h1_reference.md): AdamW 0.9/0.95, no weight decay,
# LR 128e-6 at ~1M-token batches with WSD decay to LR/8; LR scales with sqrt(batch / 1M tokens).
FINETUNE_LR = 128e-6
FINETUNE_WARMUP_FRACTION = 0.05  # 50 steps (50M tokens) of the default 1000
# LoRA trains few parameters, with B starting at zero: it takes a larger LR than full fine-tuning
# (published LoRA recipes use 1e-4 to 5e-4).
LORA_LR = 3e-4


def model_config(preset: str, **overrides) -> run.Config[FalconH1Config]:
    """The FalconH1Config of a preset (docs/models.md) with field overrides."""
    if preset not in PRESETS:
        raise ValueError(f"unknown Falcon-H1 preset {preset!r}; choose one of {sorted(PRESETS)}")
    return run.Config(FalconH1Config, **preset_fields(preset, **overrides))


def optimizer(lr: float = 3e-4, weight_decay: float = 0.1) -> run.Config[OptimizerConfig]:
    """Megatron's distributed AdamW with Falcon-H1's settings (falcon_h1.training.optim.ADAMW);
    min_lr None: the schedule ends at lr / 8, whatever lr is set to later."""
    return run.Config(OptimizerConfig, lr=lr, min_lr=None, weight_decay=weight_decay, **ADAMW)


def wsd_schedule(warmup_fraction: float = 0.005, decay_fraction: float = 0.1) -> run.Config[LRSchedule]:
    """Warmup-stable-decay, Falcon-H1's schedule: linear warm-up over `warmup_fraction` of the run,
    constant LR, exponential decay to LR/8 over the last `decay_fraction`; both follow
    trainer.max_steps."""
    return run.Config(LRSchedule, warmup_fraction=warmup_fraction, decay_style="WSD",
                      wsd_decay_fraction=decay_fraction, wsd_decay_style="exponential")


def lightning_module(config: run.Config[FalconH1Config], lr: float, warmup_fraction: float,
                     weight_decay: float = 0.1) -> run.Config[pl.LightningModule]:
    return run.Config(FalconH1Module, config=config, optimizer=optimizer(lr, weight_decay),
                      lr_schedule=wsd_schedule(warmup_fraction))


def strategy(size: Size) -> run.Config[MegatronStrategy]:
    return run.Config(MegatronStrategy, tensor_model_parallel_size=size.tensor_parallel,
                      pipeline_model_parallel_size=size.pipeline_parallel,
                      virtual_pipeline_model_parallel_size=size.virtual_pipeline,
                      context_parallel_size=size.context_parallel, sequence_parallel=size.sequence_parallel)


def trainer(size: Size, dir: str, max_steps: int, num_nodes: int, num_gpus_per_node: int,
            val_check_interval: int = 500, limit_val_batches: int = 10, log_every_n_steps: int = 10,
            checkpoint_every_n_steps: int = 1000, keep_last_k: int = 2,
            precision: str | None = None, hang_timeout: float | None = DEFAULT_HANG_TIMEOUT) -> run.Config[pl.Trainer]:
    """A Lightning Trainer under MegatronStrategy writing to `dir` (checkpoints/, tensorboard/,
    loss plot, result.json). precision None: bf16-mixed on GPU, 32 on CPU. A rank without progress
    for `hang_timeout` seconds reports where it is and exits (`trainer.hang_timeout=0`: never)."""
    return run.Config(build_trainer, log_dir=dir, max_steps=max_steps, strategy=strategy(size), precision=precision,
                      devices=num_gpus_per_node, num_nodes=num_nodes, val_check_interval=val_check_interval,
                      limit_val_batches=limit_val_batches, log_every_n_steps=log_every_n_steps,
                      checkpoint_every_n_steps=checkpoint_every_n_steps, keep_last_k=keep_last_k,
                      hang_timeout=hang_timeout)


def sizes(size: Size) -> dict:
    return dict(seq_length=size.seq_length, micro_batch_size=size.micro_batch_size,
                global_batch_size=size.global_batch_size)


def _given(**kwargs) -> dict:
    return {name: value for name, value in kwargs.items() if value is not None}


@run.cli.factory(name="mock")
def mock(seq_length: int | None = None, micro_batch_size: int | None = None, global_batch_size: int | None = None,
         vocab_size: int | None = None, seed: int = 1234) -> run.Config[pl.LightningDataModule]:
    """`data=mock`: random tokens of the model's vocabulary (vocab_size None); sizes not given
    are the recipe's."""
    return run.Config(MockDataModule, seed=seed, **_given(vocab_size=vocab_size, seq_length=seq_length,
                                                          micro_batch_size=micro_batch_size,
                                                          global_batch_size=global_batch_size))


@run.cli.factory(name="pretraining")
def pretraining(paths: list[str] | str | None = None, tokenizer: str | None = None,
                weights: list[float] | None = None, split: str = DEFAULT_SPLIT, seq_length: int | None = None,
                micro_batch_size: int | None = None, global_batch_size: int | None = None,
                seed: int = 1234) -> run.Config[pl.LightningDataModule]:
    """`data=pretraining(paths=PREFIX,tokenizer=DIR)`: Megatron indexed datasets (made by
    `python -m falcon_h1.data.preprocess`) with their tokenizer. A path is a dataset prefix or a
    sharded dataset, read as one (its PREFIX.manifest.json, its prefix or its directory).
    Several are blended by `weights` (default: by size; normalised); on the command line give
    lists as overrides after the factory,
    `'data.paths=["web","code"]' 'data.weights=[0.7,0.3]'` (nemo-run splits a factory's
    arguments at every comma). Sizes not given are the recipe's."""
    return run.Config(PreTrainingDataModule, paths=paths, tokenizer_dir=tokenizer, split=split, seed=seed,
                      **_given(weights=weights, seq_length=seq_length, micro_batch_size=micro_batch_size,
                               global_batch_size=global_batch_size))


@run.cli.factory(name="sft")
def sft(path: str | None = None, validation_path: str | None = None, tokenizer: str | None = None,
        seq_length: int | None = None, micro_batch_size: int | None = None, global_batch_size: int | None = None,
        seed: int = 1234) -> run.Config[pl.LightningDataModule]:
    """`data=sft(path=FILE.jsonl)`: packed SFT rows from jsonl (prompt/response or chat messages);
    tokenizer None: the tokenizer stored with the checkpoint being fine-tuned. Sizes not given
    are the recipe's."""
    return run.Config(SFTDataModule, train_path=path, tokenizer_dir=tokenizer, validation_path=validation_path,
                      seed=seed, **_given(seq_length=seq_length, micro_batch_size=micro_batch_size,
                                          global_batch_size=global_batch_size))


def mock_data(size: Size) -> run.Config[pl.LightningDataModule]:
    """Random tokens of the model's vocabulary: the default until `data=` points at a corpus."""
    return mock(**sizes(size))


def indexed_data(paths, tokenizer_dir: str, size: Size) -> run.Config[pl.LightningDataModule]:
    """Megatron indexed datasets (python -m falcon_h1.data.preprocess), sharded or not, with their tokenizer."""
    return pretraining(paths=paths, tokenizer=tokenizer_dir, **sizes(size))


def corpus_data(size: Size) -> run.Config[pl.LightningDataModule]:
    """The bundled corpus (the running Python's standard library, built on first use)."""
    return run.Config(default_corpus_data, **sizes(size))


def pretrain_recipe(model: run.Config[pl.LightningModule], trainer: run.Config[pl.Trainer],
                    data: run.Config[pl.LightningDataModule]) -> run.Partial:
    """run.Partial(pretrain, ...): the model from scratch; continues from the latest checkpoint
    under the trainer's directory if there is one."""
    return run.Partial(pretrain, model=model, data=data, trainer=trainer,
                       resume=run.Config(AutoResume, resume_if_exists=True))


def sft_data(size: Size, train_path: str | None, tokenizer_dir: str | None = None,
             validation_path: str | None = None) -> run.Config[pl.LightningDataModule]:
    """Packed SFT rows from jsonl (prompt/response or chat messages); tokenizer_dir None: the
    tokenizer stored with the checkpoint being fine-tuned."""
    return sft(train_path, validation_path, tokenizer_dir, **sizes(size))


def peft(scheme: str | None) -> run.Config[LoRA] | None:
    """The PEFT scheme by name: "lora", or None / "none" for full fine-tuning."""
    if scheme is None or scheme.lower() == "none":
        return None
    if scheme.lower() == "lora":
        return run.Config(LoRA)
    raise ValueError(f"peft_scheme={scheme!r}: use 'lora' or 'none' (all weights)")


def finetune_recipe(size: Size, checkpoint: str | None, data: str | None, trainer: run.Config[pl.Trainer],
                    peft_scheme: str | None = "lora") -> run.Partial:
    """run.Partial(finetune, ...) from `checkpoint` (ours, or one made by `import` from a Hugging
    Face release) on SFT jsonl `data`, with Falcon-H1's post-training optimizer settings: LoRA
    adapters on every layer's four GEMMs, or all weights with peft_scheme="none"."""
    lora = peft(peft_scheme)
    lr = FINETUNE_LR if lora is None else LORA_LR
    model = lightning_module(model_config(size.preset), lr, FINETUNE_WARMUP_FRACTION, weight_decay=0.0)
    model.peft = lora
    return run.Partial(
        finetune, model=model, data=sft_data(size, data), trainer=trainer,
        resume=run.Config(AutoResume, resume_if_exists=True, restore_weights_from=checkpoint))
