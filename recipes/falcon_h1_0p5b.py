"""Falcon-H1-0.5B (0.52B parameters).

One 8x H100 node, pure data parallelism: the model, its fp32 gradients and the sharded
AdamW state take a few GB per GPU, so TP would only add communication. 4096-token sequences,
256 per step (about 1M tokens, the batch Falcon-H1's settings are quoted at), micro-batch 4.

    recipe = falcon_h1_0p5b.pretrain_recipe(dir="runs/falcon_h1_0p5b")     # then run.run(recipe, executor=...)
    falcon-h1 pretrain --factory falcon_h1_0p5b trainer.max_steps=1000
"""

from recipes.common import Size, size_factories

NAME = "falcon_h1_0p5b"
SIZE = Size(preset="0.5b", seq_length=4096, global_batch_size=256, micro_batch_size=4)

model, trainer, pretrain_recipe, finetune_recipe = size_factories(__name__, NAME, SIZE)
