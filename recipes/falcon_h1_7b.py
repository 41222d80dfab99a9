"""Falcon-H1-7B (7.6B parameters; flagship).

TP=2 with sequence parallelism inside each pair of NVLink-connected GPUs halves the weights,
gradients and activations per GPU (fp32 gradients alone would be 30 GB at TP=1); data parallel
over the rest. 8192-token sequences, 128 per step (about 1M tokens), micro-batch 1.

    recipe = falcon_h1_7b.pretrain_recipe(dir="runs/falcon_h1_7b")     # then run.run(recipe, executor=...)
    falcon-h1 pretrain --factory falcon_h1_7b trainer.max_steps=1000
"""

import nemo_run as run
import pytorch_lightning as pl

from falcon_h1.api import finetune, pretrain
from recipes import common
from recipes.common import Size

NAME = "falcon_h1_7b"
SIZE = Size(preset="7b", seq_length=8192, global_batch_size=128, micro_batch_size=1, tensor_parallel=2,
            sequence_parallel=True)


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