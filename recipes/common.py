"""What every recipe shares: `Size` (the numbers one size sets), the factories a size module gets
from `size_factories`, and the pieces they are made of (model, optimizer + schedule, strategy,
trainer, data, resume).

Each factory returns a fiddle config (`run.Config` / `run.Partial`), nothing is built until the job
runs: a recipe for a 34B model costs nothing to make, print, edit or serialize. A size module
(e.g. falcon_h1_1p5b.py) is data: why its layout is what it is (its docstring), its `NAME` and
`SIZE`, and one line that makes its four factories here:

    model, trainer, pretrain_recipe, finetune_recipe = common.size_factories(__name__, NAME, SIZE)
"""

import dataclasses
import json
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path

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

# What a recipe trains on until `data=` says otherwise (Size.data).
DATA_KINDS = {"mock": "random tokens of the model's vocabulary (data=mock)",
              "corpus": "the bundled corpus (the running Python's standard library)"}


@dataclass(frozen=True)
class Size:
    """The defaults of one model size (each size module documents why): model preset, batch,
    parallel layout, processes, LR and schedule, run length, data, and the trainer's intervals."""

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
    data: str = "mock"  # a key of DATA_KINDS
    val_check_interval: int = 500
    limit_val_batches: int = 10
    log_every_n_steps: int = 10
    checkpoint_every_n_steps: int = 1000
    keep_last_k: int = 2

    def __post_init__(self):
        if self.data not in DATA_KINDS:
            raise ValueError(f"Size.data={self.data!r}: choose one of {sorted(DATA_KINDS)}")


# Falcon-H1's post-training settings (falcon_h1_reference.md): AdamW 0.9/0.95, no weight decay,
# LR 128e-6 at ~1M-token batches with WSD decay to LR/8; LR scales with sqrt(batch / 1M tokens).
FINETUNE_LR = 128e-6
FINETUNE_MAX_STEPS = 1000
FINETUNE_WARMUP_FRACTION = 0.05  # 50 steps (50M tokens) of the default 1000
# LoRA trains few parameters, with B starting at zero: it takes a larger LR than full fine-tuning
# (published LoRA recipes use 1e-4 to 5e-4).
LORA_LR = 3e-4


def model_config(preset: str, **overrides) -> run.Config[FalconH1Config]:
    """The FalconH1Config of a preset (docs/models.md) with field overrides."""
    if preset not in PRESETS:
        raise ValueError(f"unknown Falcon-H1 preset {preset!r}; choose one of {sorted(PRESETS)}")
    return run.Config(FalconH1Config, **preset_fields(preset, **overrides))


def optimizer(lr: float, weight_decay: float = ADAMW["weight_decay"]) -> run.Config[OptimizerConfig]:
    """Megatron's distributed AdamW with Falcon-H1's settings (falcon_h1.training.optim.ADAMW);
    min_lr None: the schedule ends at lr / 8, whatever lr is set to later."""
    return run.Config(OptimizerConfig, lr=lr, min_lr=None, **dict(ADAMW, weight_decay=weight_decay))


def wsd_schedule(warmup_fraction: float, decay_fraction: float = 0.1) -> run.Config[LRSchedule]:
    """Warmup-stable-decay, Falcon-H1's schedule: linear warm-up over `warmup_fraction` of the run,
    constant LR, exponential decay to LR/8 over the last `decay_fraction`; both follow
    trainer.max_steps."""
    return run.Config(LRSchedule, warmup_fraction=warmup_fraction, decay_style="WSD",
                      wsd_decay_fraction=decay_fraction, wsd_decay_style="exponential")


def lightning_module(config: run.Config[FalconH1Config], lr: float, warmup_fraction: float,
                     weight_decay: float = ADAMW["weight_decay"]) -> run.Config[pl.LightningModule]:
    return run.Config(FalconH1Module, config=config, optimizer=optimizer(lr, weight_decay),
                      lr_schedule=wsd_schedule(warmup_fraction))


def strategy(size: Size) -> run.Config[MegatronStrategy]:
    return run.Config(MegatronStrategy, tensor_model_parallel_size=size.tensor_parallel,
                      pipeline_model_parallel_size=size.pipeline_parallel,
                      virtual_pipeline_model_parallel_size=size.virtual_pipeline,
                      context_parallel_size=size.context_parallel, sequence_parallel=size.sequence_parallel)


def trainer_config(size: Size, dir: str) -> run.Config[pl.Trainer]:
    """A Lightning Trainer under MegatronStrategy writing to `dir` (checkpoints/, tensorboard/,
    loss plot, result.json), with `size`'s layout, processes, length and intervals. precision None:
    bf16-mixed on GPU, 32 on CPU. A rank without progress for `hang_timeout` seconds reports where
    it is and exits (`trainer.hang_timeout=0`: never)."""
    return run.Config(build_trainer, log_dir=dir, max_steps=size.max_steps, strategy=strategy(size), precision=None,
                      devices=size.num_gpus_per_node, num_nodes=size.num_nodes,
                      val_check_interval=size.val_check_interval, limit_val_batches=size.limit_val_batches,
                      log_every_n_steps=size.log_every_n_steps,
                      checkpoint_every_n_steps=size.checkpoint_every_n_steps, keep_last_k=size.keep_last_k,
                      hang_timeout=DEFAULT_HANG_TIMEOUT)


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


def default_data(size: Size) -> run.Config[pl.LightningDataModule]:
    """The data `size` trains on until `data=` says otherwise (Size.data)."""
    return corpus_data(size) if size.data == "corpus" else mock_data(size)


def pretrain_task(model: run.Config[pl.LightningModule], trainer: run.Config[pl.Trainer],
                  data: run.Config[pl.LightningDataModule]) -> run.Partial:
    """run.Partial(pretrain, ...): the model from scratch; continues from the latest checkpoint
    under the trainer's directory if there is one."""
    return run.Partial(pretrain, model=model, data=data, trainer=trainer,
                       resume=run.Config(AutoResume, resume_if_exists=True))


def run_result(run_dir: Path, label: str) -> dict:
    """The result.json of a finished run in `run_dir` (one of a series run by `run_in_turn`)."""
    path = run_dir / "result.json"
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing: the {label} run did not finish (see its log under the "
                                "experiment's directory in NEMORUN_HOME)")
    return json.loads(path.read_text())


def unfinished(tasks: dict[str, run.Partial], dir: str) -> dict[str, run.Partial]:
    """The tasks of a series of runs (each writing to `dir`/NAME) without a result.json: a series
    that was interrupted goes on where it stopped, and finished runs are not trained again."""
    left = {}
    for name, task in tasks.items():
        if (Path(dir) / name / "result.json").exists():
            print(f"{name}: finished before ({Path(dir) / name / 'result.json'} present), not run again")
        else:
            left[name] = task
    return left


def run_in_turn(name: str, tasks: dict[str, run.Partial], executor: run.Executor, dryrun: bool = False) -> None:
    """Run the tasks one after the other as one run.Experiment called `name`."""
    if not tasks:
        return
    with run.Experiment(name, executor=executor) as experiment:
        for task_name, task in tasks.items():
            experiment.add(task, name=task_name, tail_logs=False)
        if dryrun:
            experiment.dryrun()
        else:
            experiment.run(sequential=True, tail_logs=False)


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


def finetune_task(size: Size, checkpoint: str | None, data: str | None, trainer: run.Config[pl.Trainer],
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


def layout(size: Size) -> str:
    """`size`'s parallel layout in words: "TP 2 + SP", "TP 4 + SP, PP 2 x VPP 2", "DP only"."""
    parts = []
    if size.tensor_parallel > 1:
        parts.append(f"TP {size.tensor_parallel}" + (" + SP" if size.sequence_parallel else ""))
    if size.pipeline_parallel > 1:
        parts.append(f"PP {size.pipeline_parallel}"
                     + (f" x VPP {size.virtual_pipeline}" if size.virtual_pipeline else ""))
    if size.context_parallel > 1:
        parts.append(f"CP {size.context_parallel}")
    return ", ".join(parts) or "DP only"


def _lr(lr: float) -> str:
    return f"{lr:.0e}".replace("e-0", "e-")  # 3e-4


def describe(size: Size) -> str:
    """What a size's pretraining recipe runs, in one sentence (its factories' help texts)."""
    nodes = f"{size.num_nodes} node{'s' if size.num_nodes > 1 else ''}"
    gpus = f"{size.num_gpus_per_node} GPU{'s' if size.num_gpus_per_node > 1 else ''}"
    return (f"preset {size.preset!r}; {layout(size)} on {nodes} x {gpus}; {size.seq_length}-token sequences, "
            f"{size.global_batch_size} per step (micro-batch {size.micro_batch_size}); peak LR {_lr(size.lr)}, "
            f"WSD with {size.warmup_fraction * 100:g}% warm-up, {size.max_steps} steps; {DATA_KINDS[size.data]}")


def size_factories(module: str, name: str, size: Size):
    """The four factories of the size module `module` (its __name__), registered with nemo-run as
    `name`: `model()`, `trainer(...)`, `pretrain_recipe(...)` and `finetune_recipe(...)`.

    They serve `--factory NAME`, `model=NAME` and `trainer=NAME` on the command line and
    `recipes.NAME.pretrain_recipe(...)` in Python; to nemo-run, inspect and pickle each is a
    function of `module` by its own name, with a help text made from the module's first docstring
    line and `size`."""
    title = (sys.modules[module].__doc__ or name).strip().splitlines()[0].rstrip(".")

    def model() -> run.Config[pl.LightningModule]:
        return lightning_module(model_config(size.preset), size.lr, size.warmup_fraction)

    def trainer(dir: str = f"runs/{name}", max_steps: int = size.max_steps, num_nodes: int = size.num_nodes,
                num_gpus_per_node: int = size.num_gpus_per_node) -> run.Config[pl.Trainer]:
        run_size = dataclasses.replace(size, max_steps=max_steps, num_nodes=num_nodes,
                                       num_gpus_per_node=num_gpus_per_node)
        return trainer_config(run_size, dir)

    def pretrain_recipe(dir: str | None = None, name: str = name, num_nodes: int = size.num_nodes,
                        num_gpus_per_node: int = size.num_gpus_per_node,
                        max_steps: int = size.max_steps) -> run.Partial:
        return pretrain_task(model(), trainer(dir or f"runs/{name}", max_steps, num_nodes, num_gpus_per_node),
                             default_data(size))

    def finetune_recipe(checkpoint: str | None = None, data: str | None = None, dir: str | None = None,
                        name: str = name, num_nodes: int = size.num_nodes,
                        num_gpus_per_node: int = size.num_gpus_per_node, max_steps: int = FINETUNE_MAX_STEPS,
                        peft_scheme: str | None = "lora") -> run.Partial:
        return finetune_task(size, checkpoint, data, trainer(dir or f"runs/{name}_finetune", max_steps, num_nodes,
                                                             num_gpus_per_node), peft_scheme)

    help_texts = {
        model: f"{title}: the model config - preset {size.preset!r}, AdamW at peak LR {_lr(size.lr)}, WSD schedule "
               f"with {size.warmup_fraction * 100:g}% warm-up.",
        trainer: f"{title}: the trainer config - {layout(size)} on `num_nodes` x `num_gpus_per_node` processes, "
                 f"`max_steps` steps, writing to `dir`; validation every {size.val_check_interval} steps, a "
                 f"checkpoint every {size.checkpoint_every_n_steps}.",
        pretrain_recipe: f"{title}: pretraining from scratch - {describe(size)}. Continues from the latest "
                         f"checkpoint under `dir` (default runs/`name`).",
        finetune_recipe: f"{title}: fine-tuning from `checkpoint` (ours, or `falcon-h1 import` of the HF release) "
                         "on the SFT jsonl `data`: LoRA adapters (peft_scheme=\"lora\") or all weights "
                         "(peft_scheme=\"none\"), Falcon-H1's post-training settings.",
    }
    for factory, text in help_texts.items():
        factory.__module__, factory.__qualname__ = module, factory.__name__
        factory.__doc__ = textwrap.fill(text, 96)
    return (run.cli.factory(name=name)(model), run.cli.factory(name=name)(trainer),
            run.cli.factory(target=pretrain, name=name)(pretrain_recipe),
            run.cli.factory(target=finetune, name=name)(finetune_recipe))
