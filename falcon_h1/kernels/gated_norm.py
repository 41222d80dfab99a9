"""Gated grouped RMSNorm of the Mamba output: norm(y) * silu(z) or norm(y * silu(z)).

The RMS is taken over groups of `group_size` channels (one group per SSM group). Under tensor
parallelism a rank may hold only part of a group; `sum_squares_across_ranks` then completes the
per-group sum of squares across the ranks that share it.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F


def gated_rms_norm_torch(
    y: torch.Tensor,
    z: torch.Tensor,
    weight: torch.Tensor,
    eps: float,
    group_size: int,
    norm_before_gate: bool,
    sum_squares_across_ranks: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> torch.Tensor:
    """y, z: [..., d]; weight: [d]. Computed in float32, returned in y's dtype.

    With `sum_squares_across_ranks`, the local d channels are one part of a single group of
    `group_size` channels; the callable receives the local per-token sum of squares [..., 1] and
    returns the group's total.
    """
    dtype = y.dtype
    y = y.float()
    gate = F.silu(z.float())
    if not norm_before_gate:
        y = y * gate
    if sum_squares_across_ranks is None:
        grouped = y.view(*y.shape[:-1], -1, group_size)
        mean_sq = grouped.pow(2).mean(dim=-1, keepdim=True)
        y = (grouped * torch.rsqrt(mean_sq + eps)).view_as(y)
    else:
        sum_sq = sum_squares_across_ranks(y.pow(2).sum(dim=-1, keepdim=True))
        y = y * torch.rsqrt(sum_sq / group_size + eps)
    y = y * weight.float()
    if norm_before_gate:
        y = y * gate
    return y.to(dtype)


def gated_rms_norm_triton(y, z, weight, eps, group_size, norm_before_gate):
    """mamba_ssm's Triton gated RMSNorm (forward and backward in one kernel each)."""
    from falcon_h1.compat.mamba_ssm_triton import rmsnorm_fn

    return rmsnorm_fn(y, weight, None, z=z, eps=eps, group_size=group_size,
                      norm_before_gate=norm_before_gate)
