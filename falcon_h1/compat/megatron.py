"""The patches of Megatron Core (0.19.2), each applied by one function and idempotent."""

from __future__ import annotations

import multiprocessing
import multiprocessing.managers
import queue

import torch

from falcon_h1.compat import require_tested


def _foreach_l2_norm(chunk_size, noop_flag, tensor_lists, per_tensor, *args):
    """Drop-in for amp_C.multi_tensor_l2norm: the norm of all tensors of tensor_lists[0], on device."""
    norms = torch._foreach_norm(tensor_lists[0], 2.0, dtype=torch.float32)
    return torch.linalg.vector_norm(torch.stack(norms), 2.0).reshape(1), None


def _foreach_scale(chunk_size, noop_flag, tensor_lists, scale):
    """Drop-in for amp_C.multi_tensor_scale: tensor_lists[1][i] = tensor_lists[0][i] * scale."""
    sources, targets = tensor_lists
    if all(s is t for s, t in zip(sources, targets)):
        torch._foreach_mul_(targets, scale)
    else:
        torch._foreach_copy_(targets, torch._foreach_mul(sources, scale))


def use_foreach_grad_norm() -> None:
    """Without Apex or Transformer Engine, Megatron's gradient clipping falls back to a norm that
    turns every tensor's norm into a Python float (one device sync per parameter, hundreds per
    step) and to a scale (and main-to-model weight copy) of one kernel pair per tensor; use
    torch's multi-tensor ops instead."""
    from megatron.core import utils as megatron_utils
    from megatron.core.optimizer import clip_grads
    from megatron.core.optimizer import optimizer as megatron_optimizer

    if clip_grads.l2_norm_impl is megatron_utils.local_multi_tensor_l2_norm:
        require_tested("megatron-core", "foreach gradient norm")
        clip_grads.l2_norm_impl = _foreach_l2_norm
    for module in (clip_grads, megatron_optimizer):
        if module.multi_tensor_scale_impl is megatron_utils.local_multi_tensor_scale:
            require_tested("megatron-core", "foreach gradient norm")
            module.multi_tensor_scale_impl = _foreach_scale


def use_wgrad_fusion(gemm_module) -> None:
    """Give Megatron's linears `gemm_module` (falcon_h1.kernels.wgrad_fusion) as their
    `fused_weight_gradient_mlp_cuda`, so that gradient_accumulation_fusion=True builds and runs
    without Apex (also where Apex is installed: the GEMM is the same, and the row-scaled linears
    need this one)."""
    from megatron.core.tensor_parallel import layers

    require_tested("megatron-core", "weight-gradient fusion without Apex")
    layers.fused_weight_gradient_mlp_cuda = gemm_module
    layers._grad_accum_fusion_available = True  # ColumnParallelLinear refuses the fusion without it


def wgrad_fusion_module():
    """What Megatron's linears call for their fused weight gradients (None without Apex or us)."""
    from megatron.core.tensor_parallel import layers

    return getattr(layers, "fused_weight_gradient_mlp_cuda", None)


def keep_adam_step_on_state_load(optimizer, after_load) -> None:
    """Two gaps of megatron-core 0.19's distributed-optimizer loading with torch's Adam (used when
    Apex/TE fused Adam is absent), where each parameter's state holds a `step`:
    - the fully-reshardable loader expects `step` among each parameter's checkpoint tensors,
      where it is not (it is stored once, in the param groups, and restored from there): supply
      the current one so the loader copies the moments and main weights and leaves the step;
    - the restored step is one tensor shared by all parameters, which torch's foreach Adam then
      increments once per parameter: give every parameter its own copy.
    `after_load(torch_optimizer)` runs after each load (the project makes its Adam fused again there)."""
    require_tested("megatron-core", "distributed optimizer load with torch's Adam")
    set_states = optimizer._set_main_param_and_optimizer_states
    load_state_dict = optimizer.load_state_dict

    def set_states_keeping_step(model_param, tensors):
        group_index, group_order = optimizer.model_param_group_index_map[model_param]
        main_param = optimizer.optimizer.param_groups[group_index]["params"][group_order]
        step = optimizer.optimizer.state[main_param].get("step")
        if isinstance(step, torch.Tensor) and "step" not in tensors:
            tensors = {**tensors, "step": step}
        set_states(model_param, tensors)

    def load_state_dict_with_own_steps(state_dict):
        load_state_dict(state_dict)
        for param, state in optimizer.optimizer.state.items():
            if isinstance(state.get("step"), torch.Tensor):
                state["step"] = state["step"].to(param.device).clone()
        after_load(optimizer.optimizer)

    optimizer._set_main_param_and_optimizer_states = set_states_keeping_step
    optimizer.load_state_dict = load_state_dict_with_own_steps


def save_optimizer_state_at_unpadded_offsets(optimizer) -> None:
    """megatron-core 0.19's fully-reshardable save of the distributed optimizer gathers each buffer's
    state with the padding at the end of every bucket left out, then cuts each parameter's state at
    its offset in the padded buffer: once a bucket's end was padded (more than one bucket, which DDP
    makes on GPU past 40M parameters, and a parameter size that is not a multiple of 128, as the
    Mamba heads' are), every later parameter is saved with its neighbours' values and the last one
    runs off the end (Megatron's "param range exceeds unpadded buffer" warning). A resumed run loads
    those values as its main weights and moments. Save with the offsets rebased to the gathered,
    unpadded layout, as Megatron-LM does upstream (PR 5077): each bucket's parameters move back by
    the padding of the buckets before it."""
    require_tested("megatron-core", "distributed optimizer save at unpadded offsets")
    save = optimizer.sharded_param_state_fully_reshardable

    def save_at_unpadded_offsets(*args, **kwargs):
        padded = [buffer.param_index_map for buffer in optimizer.buffers]
        try:
            for buffer in optimizer.buffers:
                shift, unpadded_start = [], 0
                for bucket in buffer.buckets:
                    shift.append(bucket.offset - unpadded_start)
                    unpadded_start += bucket.numel_unpadded
                buffer.param_index_map = {param: (start - shift[bucket], end - shift[bucket], bucket)
                                          for param, (start, end, bucket) in buffer.param_index_map.items()}
            return save(*args, **kwargs)
        finally:
            for buffer, index_map in zip(optimizer.buffers, padded):
                buffer.param_index_map = index_map

    optimizer.sharded_param_state_fully_reshardable = save_at_unpadded_offsets


def write_results_queue_without_spawn(background: bool) -> None:
    """Megatron's checkpoint writer reports back through a queue that it makes, on first use, with
    a multiprocessing Manager in a *spawned* process, and a spawned process re-runs the user's
    `__main__` script: a script without an `if __name__ == "__main__":` guard trained again inside
    its own save (EADDRINUSE, EOFError, an unfinished checkpoint). A synchronous save writes in
    this process and needs only a thread-safe queue; the background writer is a forked process,
    and a Manager forked (not spawned) serves it without re-running anything."""
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    require_tested("megatron-core", "checkpoint results queue without spawn")
    if background:
        if not isinstance(filesystem_async._results_queue, multiprocessing.managers.BaseProxy):
            filesystem_async._results_queue = multiprocessing.get_context("fork").Manager().Queue()
    else:
        filesystem_async._results_queue = queue.Queue()


def open_checkpoint_shards_with(open_fn) -> None:
    """Megatron's torch_dist writer opens each shard with the name `open` of its module (in the
    training process, its writer threads, or the forked background writer of an async save); give
    that name `open_fn` (falcon_h1.training.checksums hashes the shards as they are written)."""
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    require_tested("megatron-core", "checkpoint shards hashed as written")
    filesystem_async.open = open_fn
