"""Falcon-H1-3B (3.15B parameters).

Still data parallel on one 8x H100 node (weights 6 GB, fp32 gradients 12.6 GB per GPU,
AdamW state sharded); 4096-token sequences, 256 per step (about 1M tokens), micro-batch 1.

    recipe = falcon_h1_3b.pretrain_recipe(dir="runs/falcon_h1_3b")     # then run.run(recipe, executor=...)
    falcon-h1 pretrain --factory falcon_h1_3b trainer.max_steps=1000
"""

from recipes.common import Size, size_factories

NAME = "falcon_h1_3b"
SIZE = Size(preset="3b", seq_length=4096, global_batch_size=256, micro_batch_size=1)

model, trainer, pretrain_recipe, finetune_recipe = size_factories(__name__, NAME, SIZE)
