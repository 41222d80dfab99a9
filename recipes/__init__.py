"""Falcon-H1 recipes: one module per model size (its numbers, as data), the factories they share
(recipes/common.py), recipes built on the sizes (attention_baseline, long_context, ratio_sweep,
convergence) and executors.

Importing this package registers every factory with nemo-run (for `--factory NAME`,
`model=NAME`, `data=mock|pretraining(...)|sft(...)` (recipes/common.py), `run.executor=local|slurm`).
"""

from recipes import (  # noqa: F401  (imported for their factory registrations)
    attention_baseline,
    convergence,
    executors,
    falcon_h1_0p5b,
    falcon_h1_1p5b,
    falcon_h1_1p5b_deep,
    falcon_h1_3b,
    falcon_h1_7b,
    falcon_h1_34b,
    long_context,
    tiny,
)

SIZES = {module.NAME: module for module in (tiny, falcon_h1_0p5b, falcon_h1_1p5b, falcon_h1_1p5b_deep,
                                            falcon_h1_3b, falcon_h1_7b, falcon_h1_34b)}
