"""Gradient norm with the mixer's TP-replicated rows counted once, and without a host sync per tensor.

Megatron's grad norm sums the squares of every tensor-parallel parameter's gradient over the TP
ranks. The mixer replicates some rows (KV heads, SSM groups, attention heads when TP exceeds
them; see layout.py) on r ranks, each holding the same summed gradient, so those rows would count
r times and clipping at TP > 1 would differ from TP = 1. Scaling those rows' gradients by
1/sqrt(r) in the tensors handed to the norm makes the total exactly the TP = 1 norm; the
gradients the optimizer applies are untouched.
"""

from __future__ import annotations

import torch
from megatron.core import utils as megatron_utils
from megatron.core.optimizer import ChainedOptimizer, clip_grads
from megatron.core.optimizer import optimizer as megatron_optimizer
from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

from falcon_h1.model.tensor_parallel import REPLICATED_ROWS_ATTR


def _row_scale(param: torch.Tensor) -> torch.Tensor | None:
    """Per-element factor (flattened like the parameter): 1/sqrt(replicas) on replicated rows."""
    replicated = getattr(param, REPLICATED_ROWS_ATTR, None)
    if not replicated:
        return None
    rows = torch.ones(param.shape[0], dtype=torch.float32, device=param.device)
    for start, segment in replicated:
        rows[start:start + segment.rows] = segment.replicas ** -0.5
    return rows.view(-1, *([1] * (param.dim() - 1))).expand(param.shape).reshape(-1)


def _main_params_with_scale(optimizer):
    """(main parameter, its per-element scale) for parameters with replicated rows."""
    if isinstance(optimizer, DistributedOptimizer):
        pairs = []
        for models, shards in ((optimizer.model_float16_groups, optimizer.shard_fp32_from_float16_groups),
                               (optimizer.model_fp32_groups, optimizer.shard_fp32_groups)):
            for model_group, shard_group in zip(models, shards):
                for model_param, shard in zip(model_group, shard_group):
                    scale = _row_scale(model_param)
                    if scale is not None:
                        owned = optimizer._get_model_param_range_map(model_param)["param"]
                        pairs.append((shard, scale[owned.start:owned.end].view(shard.shape)))
        return pairs
    if hasattr(optimizer, "float16_groups"):  # mixed precision, fp32 main copies
        pairs = [(main, _row_scale(model)) for models, mains in zip(optimizer.float16_groups,
                                                                      optimizer.fp32_from_float16_groups)
                 for model, main in zip(models, mains)]
        pairs += [(p, _row_scale(p)) for group in optimizer.fp32_from_fp32_groups for p in group]
    else:  # float32: the optimizer steps the model parameters themselves
        pairs = [(p, _row_scale(p)) for group in optimizer.param_groups for p in group["params"]]
    return [(main, scale.view(main.shape)) for main, scale in pairs if scale is not None]


def count_replicated_rows_once(optimizer) -> None:
    """Make `optimizer`'s gradient norm (and so its clipping) count replicated rows once."""
    inner = optimizer.chained_optimizers if isinstance(optimizer, ChainedOptimizer) else [optimizer]
    for opt in inner:
        scaled = _main_params_with_scale(opt)
        if not scaled:
            continue
        original = opt.get_grads_for_grad_norm

        def grads_for_norm(*args, _original=original, _scaled=scaled, **kwargs):
            scale_of = {id(main.grad): scale for main, scale in _scaled if main.grad is not None}
            return [g * scale_of[id(g)] if id(g) in scale_of else g for g in _original(*args, **kwargs)]

        opt.get_grads_for_grad_norm = grads_for_norm


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
    if clip_grads.l2_norm_impl is megatron_utils.local_multi_tensor_l2_norm:
        clip_grads.l2_norm_impl = _foreach_l2_norm
    for module in (clip_grads, megatron_optimizer):
        if module.multi_tensor_scale_impl is megatron_utils.local_multi_tensor_scale:
            module.multi_tensor_scale_impl = _foreach_scale
