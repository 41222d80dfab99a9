"""Falcon-H1-1.5B (1.55B parameters; flagship).

One 8x H100 node, pure data parallelism (weights 3 GB in bf16, gradients 6 GB in fp32,
AdamW state sharded by the distributed optimizer): TP=1 keeps every GEMM whole. 4096-token
sequences, 256 per step (about 1M tokens), micro-batch 2.

    recipe = falcon_h1_1p5b.pretrain_recipe(dir="runs/falcon_h1_1p5b")     # then run.run(recipe, executor=...)
    falcon-h1 pretrain --factory falcon_h1_1p5b trainer.max_steps=1000
"""

from recipes.common import Size, size_factories

NAME = "falcon_h1_1p5b"
SIZE = Size(preset="1.5b", seq_length=4096, global_batch_size=256, micro_batch_size=2)

model, trainer, pretrain_recipe, finetune_recipe = size_factories(__name__, NAME, SIZE)
