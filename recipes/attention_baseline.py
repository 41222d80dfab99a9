"""A pure-attention model of the same size as a Falcon-H1 recipe, for like-for-like comparisons.

The Falcon-H1 layer keeps its shape except the mixer: all heads are attention heads
(hidden_size / head_dim of them, the usual full-width attention, GQA groups as the original) and
no Mamba heads; the MLP grows until the parameter count matches the hybrid's (within one
multiple of 128 in the MLP width). Everything else - data, schedule, layout, steps - is the
original recipe's, so the two runs differ only in the mixer.

    recipe = attention_baseline.pretrain_recipe(size="falcon_h1_1p5b")
    falcon-h1 pretrain --factory "attention_baseline(size=falcon_h1_1p5b)" trainer.max_steps=1000
"""

import fiddle as fdl
import nemo_run as run

import recipes
from falcon_h1.api import pretrain
from falcon_h1.model.presets import attention_only_fields

NAME = "attention_baseline"


@run.cli.factory(target=pretrain, name=NAME)
def pretrain_recipe(size: str = "falcon_h1_1p5b", dir: str | None = None, num_nodes: int | None = None,
                    num_gpus_per_node: int | None = None, max_steps: int | None = None) -> run.Partial:
    """`size`'s pretraining recipe (a name in recipes.SIZES) with its model replaced by the
    pure-attention model of the same parameter count."""
    if size not in recipes.SIZES:
        raise ValueError(f"attention_baseline: unknown size {size!r}; choose one of {sorted(recipes.SIZES)}")
    module = recipes.SIZES[size]
    base = module.SIZE
    recipe = module.pretrain_recipe(dir=dir or f"runs/{size}_{NAME}", num_nodes=num_nodes or base.num_nodes,
                                    num_gpus_per_node=num_gpus_per_node or base.num_gpus_per_node,
                                    max_steps=max_steps or base.max_steps)
    from falcon_h1.model.config import FalconH1Config

    recipe.model.config = fdl.Config(FalconH1Config, **attention_only_fields(base.preset))
    return recipe
