"""Falcon-H1-3B (3.15B parameters).

Still data parallel on one 8x H100 node (weights 6 GB, fp32 gradients 12.6 GB per GPU,
AdamW state sharded); 4096-token sequences, 256 per step (about 1M tokens), micro-batch 1.

    recipe = falcon_h1_3b.pretrain_recipe(dir="runs/falcon_h1_3b")     # then run.run(recipe, executor=...)
    falcon-h1 pretrain --factory falcon_h1_3b trainer.max_steps=1000
"""

import nemo_run as run
import pytorch_lightning as pl

from falcon_h1.api import finetune, pretrain
from recipes import common
from recipes.common import Size

NAME = "falcon_h1_3b"
SIZE = Size(preset="3b", seq_length=4096, global_batch_size=256, micro_batch_size=1)


@run.cli.factory(name=NAME)
def model() -> run.Config[pl.LightningModule]:
    return common.lightning_module(common.model_config(SIZE.preset), SIZE.lr, SIZE.warmup_fraction)


@run.cli.factory(name=NAME)
def trainer(dir: str = "runs/" + NAME, max_steps: int = SIZE.max_steps, num_nodes: int = SIZE.num_nodes,
            num_gpus_per_node: int = SIZE.num_gpus_per_node) -> run.Config[pl.Trainer]:
    return common.trainer(SIZE, dir, max_steps, num_nodes, num_gpus_per_node)


@run.cli.factory(target=pretrain, name=NAME)
def pretrain_recipe(dir: str | None = None, name: str = NAME, num_nodes: int = SIZE.num_nodes,
                    num_gpus_per_node: int = SIZE.num_gpus_per_node, max_steps: int = SIZE.max_steps) -> run.Partial:
    return common.pretrain_recipe(model(), trainer(dir or f"runs/{name}", max_steps, num_nodes, num_gpus_per_node),
                                  common.mock_data(SIZE))


@run.cli.factory(target=finetune, name=NAME)
def finetune_recipe(checkpoint: str | None = None, data: str | None = None, dir: str | None = None, name: str = NAME,
                    num_nodes: int = SIZE.num_nodes, num_gpus_per_node: int = SIZE.num_gpus_per_node,
                    max_steps: int = 1000, peft_scheme: str | None = "lora") -> run.Partial:
    """Fine-tuning from `checkpoint` (ours, or `falcon-h1 import` of the HF release) on the SFT
    jsonl `data`: LoRA adapters (peft_scheme="lora") or all weights (peft_scheme="none")."""
    return common.finetune_recipe(SIZE, checkpoint, data, trainer(dir or f"runs/{name}_finetune", max_steps, num_nodes,
                                                                  num_gpus_per_node), peft_scheme)