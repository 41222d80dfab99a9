"""Megatron in this one process: what conversion, generation, the parity checks, the tests and a
notebook need before they build a model outside a training run.

    with single_process_megatron():        # a conversion: undone at the end of the block
        ...
    single_process_megatron(seed=1234)     # a notebook or a test session: for the life of the process
"""

from __future__ import annotations

import contextlib

import torch.distributed as dist
from megatron.core import parallel_state

from falcon_h1.compat import cpu


def single_process_megatron(seed: int | None = None) -> contextlib.ExitStack:
    """Start what is missing of a one-process Megatron: a gloo world of one process, Megatron's
    parallel state (TP = PP = CP = DP = 1), the CPU mode when there is no GPU; with `seed`, Megatron's
    RNG streams seeded. What the caller already runs in one process is kept.

    Returns an ExitStack that undoes what this call started (its `with` block, or close())."""
    with contextlib.ExitStack() as started:  # a failure half-way undoes the first half
        if not dist.is_initialized():
            dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
            started.callback(dist.destroy_process_group)
        elif dist.get_world_size() != 1:
            raise RuntimeError(f"this runs in a single process, not in a world of {dist.get_world_size()}; "
                               "do not launch it with torchrun")
        if not parallel_state.model_parallel_is_initialized():
            parallel_state.initialize_model_parallel()
            started.callback(parallel_state.destroy_model_parallel)
        cpu.enable()  # does nothing where CUDA is available
        if seed is not None:
            cpu.model_parallel_manual_seed(seed)
        return started.pop_all()
