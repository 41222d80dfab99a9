"""Falcon-H1-1.5B-Deep (1.55B parameters, 66 layers).

Same budget as the 1.5B (data parallel on one 8x H100 node, about 1M tokens per step); its 66
narrower layers keep more activations per token, hence micro-batch 1.

    recipe = falcon_h1_1p5b_deep.pretrain_recipe(dir="runs/falcon_h1_1p5b_deep")  # then run.run(recipe, ...)
    falcon-h1 pretrain --factory falcon_h1_1p5b_deep trainer.max_steps=1000
"""

from recipes.common import Size, size_factories

NAME = "falcon_h1_1p5b_deep"
SIZE = Size(preset="1.5b-deep", seq_length=4096, global_batch_size=256, micro_batch_size=1)

model, trainer, pretrain_recipe, finetune_recipe = size_factories(__name__, NAME, SIZE)
