"""Tiny (4.3M parameters, not a released size).

The README's main job (`python -m falcon_h1.train` takes its defaults from here) and CI's smoke
test: trains for real on the bundled corpus in a few minutes on one CPU core or GPU. 128-token
sequences, 16 per step, LR 3e-3 (a model this small tolerates it), 10% warm-up; validation every
50 steps (8 batches), a checkpoint every 100.

    recipe = tiny.pretrain_recipe(dir="runs/tiny")     # then run.run(recipe, executor=...)
    falcon-h1 pretrain --factory tiny trainer.max_steps=1000
"""

from recipes.common import Size, size_factories

NAME = "tiny"
SIZE = Size(preset="tiny", seq_length=128, global_batch_size=16, micro_batch_size=8, num_gpus_per_node=1,
            lr=3e-3, warmup_fraction=0.1, max_steps=300, data="corpus", val_check_interval=50, limit_val_batches=8,
            checkpoint_every_n_steps=100)

model, trainer, pretrain_recipe, finetune_recipe = size_factories(__name__, NAME, SIZE)
