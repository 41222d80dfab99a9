"""Tensor-parallel communication that Megatron's layers do not already do for the mixer.

When TP exceeds the number of KV heads, SSM groups or attention heads, some rows of the mixer's
parameters are replicated on several ranks (layout.py). Those replicas must start equal and get
the same update, so their gradients are summed over the ranks that hold them. The sums use one
all-reduce over the whole TP group of a buffer shaped like the canonical tensor, into which every
rank adds its own rows at their canonical offset: ranks holding the same rows add into the same
place, ranks holding other rows into other places.

The same trick completes the gated RMSNorm's per-group statistics when a group's channels are
spread over several ranks.
"""

from __future__ import annotations

from typing import Iterable

import torch
import torch.distributed as dist

from falcon_h1.model.layout import Segment

# Attribute set on parameters some of whose rows are replicated: [(local_row_start, Segment), ...].
REPLICATED_ROWS_ATTR = "tp_replicated_rows"


def mark_replicated_rows(param: torch.nn.Parameter, segments: Iterable[Segment]) -> None:
    """Record which rows (dim 0) of `param` are replicas, given its segments in local order."""
    replicated, start = [], 0
    for segment in segments:
        if segment.replicas > 1:
            replicated.append((start, segment))
        start += segment.rows
    if replicated:
        setattr(param, REPLICATED_ROWS_ATTR, replicated)


def _sum_rows_over_replicas(tensor: torch.Tensor, replicated, group, primary_only: bool) -> None:
    """In place: rows of each replicated segment become their sum over the ranks holding them
    (or, with primary_only, the value on the replica with index 0)."""
    buffers = []
    for start, seg in replicated:
        canonical = tensor.new_zeros(seg.canonical_rows, *tensor.shape[1:])
        if not primary_only or seg.replica_index == 0:
            canonical[seg.offset: seg.offset + seg.rows] = tensor[start: start + seg.rows]
        buffers.append(canonical)
    flat = torch.cat([b.flatten() for b in buffers])
    if flat.device.type == "cpu" and "gloo" not in str(dist.get_backend(group)):
        # Parameters built on the CPU (use_cpu_initialization) in an NCCL run: reduce on the GPU.
        flat = flat.cuda()
    dist.all_reduce(flat, group=group)
    flat = flat.to(tensor.device)
    for (start, seg), canonical in zip(replicated, flat.split([b.numel() for b in buffers])):
        rows = canonical.view(seg.canonical_rows, *tensor.shape[1:])[seg.offset: seg.offset + seg.rows]
        tensor[start: start + seg.rows].copy_(rows)


def _replicated_params(module: torch.nn.Module):
    return [p for p in module.parameters() if hasattr(p, REPLICATED_ROWS_ATTR)]


@torch.no_grad()
def sync_replicated_params(module: torch.nn.Module, group) -> None:
    """Make every replica equal to the primary copy (after random init)."""
    for param in _replicated_params(module):
        _sum_rows_over_replicas(param.data, getattr(param, REPLICATED_ROWS_ATTR), group, primary_only=True)


@torch.no_grad()
def sync_replicated_grads(module: torch.nn.Module, group) -> None:
    """Sum the gradients of replicated rows over their replicas (`main_grad` under Megatron DDP).

    Call after backward and before the optimizer step, like Megatron's own sequence-parallel
    layer-norm gradient all-reduce."""
    for param in _replicated_params(module):
        grad = getattr(param, "main_grad", None)
        if grad is None:
            grad = param.grad
        if grad is not None:
            _sum_rows_over_replicas(grad, getattr(param, REPLICATED_ROWS_ATTR), group, primary_only=False)


class _AllReduceSum(torch.autograd.Function):
    """Sum over the group in forward and backward: every rank's output depends on every rank's
    input, and each rank uses the result for different channels downstream."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        x = x.clone()
        dist.all_reduce(x, group=group)
        return x

    @staticmethod
    def backward(ctx, grad):
        grad = grad.clone()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


def group_sum_across_ranks(local: torch.Tensor, group_index: int, num_groups: int, group) -> torch.Tensor:
    """local [..., 1]: this rank's partial value for SSM group `group_index`. Returns the group's
    total over all ranks holding parts of it, differentiably."""
    canonical = torch.zeros(*local.shape[:-1], num_groups, dtype=local.dtype, device=local.device)
    canonical = canonical.index_add(-1, torch.tensor([group_index], device=local.device), local)
    return _AllReduceSum.apply(canonical, group)[..., group_index: group_index + 1]
