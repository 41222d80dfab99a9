"""Falcon-H1-7B (7.6B parameters; flagship).

TP=2 with sequence parallelism inside each pair of NVLink-connected GPUs halves the weights,
gradients and activations per GPU (fp32 gradients alone would be 30 GB at TP=1); data parallel
over the rest. 8192-token sequences, 128 per step (about 1M tokens), micro-batch 1.

    recipe = falcon_h1_7b.pretrain_recipe(dir="runs/falcon_h1_7b")     # then run.run(recipe, executor=...)
    falcon-h1 pretrain --factory falcon_h1_7b trainer.max_steps=1000
"""

from recipes.common import Size, size_factories

NAME = "falcon_h1_7b"
SIZE = Size(preset="7b", seq_length=8192, global_batch_size=128, micro_batch_size=1, tensor_parallel=2,
            sequence_parallel=True)

model, trainer, pretrain_recipe, finetune_recipe = size_factories(__name__, NAME, SIZE)
