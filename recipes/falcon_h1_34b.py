"""Falcon-H1-34B (33.6B parameters).

TP=4 with sequence parallelism within a node and 2 pipeline stages of 2 virtual stages each
(72 layers: 18 per virtual stage, to shrink the pipeline bubble); 4 nodes by default, so DP=4.
8192-token sequences, 128 per step (about 1M tokens), micro-batch 1.

    recipe = falcon_h1_34b.pretrain_recipe(dir="runs/falcon_h1_34b")     # then run.run(recipe, executor=...)
    falcon-h1 pretrain --factory falcon_h1_34b trainer.max_steps=1000
"""

from recipes.common import Size, size_factories

NAME = "falcon_h1_34b"
SIZE = Size(preset="34b", seq_length=8192, global_batch_size=128, micro_batch_size=1, tensor_parallel=4,
            sequence_parallel=True, pipeline_parallel=2, virtual_pipeline=2, num_nodes=4)

model, trainer, pretrain_recipe, finetune_recipe = size_factories(__name__, NAME, SIZE)
