"""Tiny (4.3M parameters, not a released size).

The README's main job and CI's smoke test: trains for real on the bundled corpus in a few
minutes on one CPU core or GPU. 128-token sequences, 16 per step, LR 3e-3 (a model this small
tolerates it), 10% warm-up; validation every 50 steps.

    recipe = tiny.pretrain_recipe(dir="runs/tiny")     # then run.run(recipe, executor=...)
    falcon-h1 pretrain --factory tiny trainer.max_steps=1000
"""

import nemo_run as run
import pytorch_lightning as pl

from falcon_h1.api import finetune, pretrain
from recipes import common
from recipes.common import Size

NAME = "tiny"
SIZE = Size(preset="tiny", seq_length=128, global_batch_size=16, micro_batch_size=8, num_gpus_per_node=1,
            lr=3e-3, warmup_fraction=0.1, max_steps=300)


@run.cli.factory(name=NAME)
def model() -> run.Config[pl.LightningModule]:
    return common.lightning_module(common.model_config(SIZE.preset), SIZE.lr, SIZE.warmup_fraction)


@run.cli.factory(name=NAME)
def trainer(dir: str = "runs/" + NAME, max_steps: int = SIZE.max_steps, num_nodes: int = SIZE.num_nodes,
            num_gpus_per_node: int = SIZE.num_gpus_per_node) -> run.Config[pl.Trainer]:
    return common.trainer(SIZE, dir, max_steps, num_nodes, num_gpus_per_node, val_check_interval=50,
                          limit_val_batches=8, checkpoint_every_n_steps=100)


@run.cli.factory(target=pretrain, name=NAME)
def pretrain_recipe(dir: str | None = None, name: str = NAME, num_nodes: int = SIZE.num_nodes,
                    num_gpus_per_node: int = SIZE.num_gpus_per_node, max_steps: int = SIZE.max_steps) -> run.Partial:
    return common.pretrain_recipe(model(), trainer(dir or f"runs/{name}", max_steps, num_nodes, num_gpus_per_node),
                                  common.corpus_data(SIZE))


@run.cli.factory(target=finetune, name=NAME)
def finetune_recipe(checkpoint: str | None = None, data: str | None = None, dir: str | None = None, name: str = NAME,
                    num_nodes: int = SIZE.num_nodes, num_gpus_per_node: int = SIZE.num_gpus_per_node,
                    max_steps: int = 1000, peft_scheme: str | None = "lora") -> run.Partial:
    """Fine-tuning from `checkpoint` (ours, or `falcon-h1 import` of the HF release) on the SFT
    jsonl `data`: LoRA adapters (peft_scheme="lora") or all weights (peft_scheme="none")."""
    return common.finetune_recipe(SIZE, checkpoint, data, trainer(dir or f"runs/{name}_finetune", max_steps, num_nodes,
                                                                  num_gpus_per_node), peft_scheme)