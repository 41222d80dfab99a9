"""Long-context training: 128k-token sequences with context parallelism.

Each sequence is split over CP ranks (the mixer exchanges sequence for heads around its cores)
and/or TP ranks with sequence parallelism on, and both cores are recomputed in backward
(selective recompute: "core_attn", and recompute_ssd_scan for conv1d + SSD scan) so that only
their inputs stay in memory per layer.
Falcon-H1 extends context after pretraining (16k, then 128k), so the recipe starts from a
checkpoint's weights by default; 8 sequences per step (1M tokens).

    recipe = long_context.pretrain_recipe(size="falcon_h1_7b", checkpoint="ckpts/falcon-h1-7b")
    falcon-h1 pretrain --factory "long_context(size=falcon_h1_7b, checkpoint=ckpts/falcon-h1-7b)"
"""

import nemo_run as run

import recipes
from falcon_h1.api import pretrain
from recipes import common

NAME = "long_context"
# (TP, CP): the GPUs one sequence is spread over. CP here trades sequence for heads around the
# mixer's cores, so it must divide each TP rank's attention and Mamba heads (FalconH1Config
# checks): models whose head counts allow it use CP (each GPU holds 128k / CP tokens), the others
# TP=8 with sequence parallelism (128k / 8 tokens per GPU outside the cores). The 7B takes TP=2
# for its weights and CP=2, the most its 6 heads per TP rank allow with 8 GPUs: two sequences
# per node.
LAYOUTS = {"falcon_h1_0p5b": (1, 8), "falcon_h1_1p5b": (1, 8), "falcon_h1_1p5b_deep": (8, 1),
           "falcon_h1_3b": (8, 1), "falcon_h1_7b": (2, 2), "falcon_h1_34b": (8, 1)}


@run.cli.factory(target=pretrain, name=NAME)
def pretrain_recipe(size: str = "falcon_h1_7b", checkpoint: str | None = None, seq_length: int = 131072,
                    dir: str | None = None, num_nodes: int = 1, max_steps: int = 2000,
                    global_batch_size: int = 8) -> run.Partial:
    """`size`'s recipe at `seq_length` tokens per sequence, continued from `checkpoint`'s weights."""
    if size not in LAYOUTS:
        raise ValueError(f"long_context: no layout for size {size!r}; choose one of {sorted(LAYOUTS)}")
    tp, cp = LAYOUTS[size]
    base = recipes.SIZES[size].SIZE
    size_spec = common.Size(preset=base.preset, seq_length=seq_length, global_batch_size=global_batch_size,
                            micro_batch_size=1, tensor_parallel=tp, context_parallel=cp,
                            sequence_parallel=tp > 1, num_nodes=num_nodes, lr=common.FINETUNE_LR,
                            warmup_fraction=0.025,  # 50 warm-up steps of the default 2000
                            max_steps=max_steps, val_check_interval=200, limit_val_batches=4,
                            checkpoint_every_n_steps=200)
    config = common.model_config(base.preset, max_position_embeddings=max(seq_length, 131072),
                                 recompute_granularity="selective", recompute_modules=["core_attn"],
                                 recompute_ssd_scan=True)
    recipe = common.pretrain_task(
        common.lightning_module(config, size_spec.lr, size_spec.warmup_fraction, weight_decay=0.0),
        common.trainer_config(size_spec, dir or f"runs/{size}_{NAME}"), common.default_data(size_spec))
    recipe.resume.restore_weights_from = checkpoint
    return recipe
