"""Falcon-H1-1.5B-Deep (1.55B parameters, 66 layers).

Same budget as the 1.5B (data parallel on one 8x H100 node, about 1M tokens per step); its 66
narrower layers keep more activations per token, hence micro-batch 1.

    recipe = falcon_h1_1p5b_deep.pretrain_recipe(dir="runs/falcon_h1_1p5b_deep")  # then run.run(recipe, ...)
    falcon-h1 pretrain --factory falcon_h1_1p5b_deep trainer.max_steps=1000
"""

import nemo_run as run
import pytorch_lightning as pl

from falcon_h1.api import finetune, pretrain
from recipes import common
from recipes.common import Size

NAME = "falcon_h1_1p5b_deep"
SIZE = Size(preset="1.5b-deep", seq_length=4096, global_batch_size=256, micro_batch_size=1)


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