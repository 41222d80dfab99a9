"""A column-parallel linear whose output rows are scaled (µP multipliers), by scaling its weight.

(x W^T) * s == x (s * W)^T, with the same gradient for W. The weight is [rows, in] and the output
[tokens, rows], so at training lengths scaling the weight moves less memory than scaling the
output. The scaled weight is made in one pass each way (scale_rows): the float32 product rounded
once, straight into the weight's dtype, with no float32 copy of the weight in between.
"""

from __future__ import annotations

import torch
from megatron.core.tensor_parallel import ColumnParallelLinear


class _ScaleRows(torch.autograd.Function):
    """weight * row_scale[:, None] in weight's dtype; its gradient is grad * row_scale[:, None]."""

    @staticmethod
    def forward(ctx, weight, row_scale):
        ctx.save_for_backward(row_scale)
        return _scaled(weight, row_scale)

    @staticmethod
    def backward(ctx, grad):
        (row_scale,) = ctx.saved_tensors
        return _scaled(grad, row_scale), None


def _scaled(t: torch.Tensor, row_scale: torch.Tensor) -> torch.Tensor:
    # torch computes a bf16 x float32 product in float32 and rounds it on store: one kernel.
    return torch.mul(t, row_scale.view(-1, *([1] * (t.dim() - 1))), out=torch.empty_like(t))


def scale_rows(weight: torch.Tensor, row_scale: torch.Tensor) -> torch.Tensor:
    """weight [rows, ...] * row_scale [rows] (float32), rounded once to weight's dtype."""
    return _ScaleRows.apply(weight, row_scale)


def row_scaled_linear(linear, x: torch.Tensor, row_scale: torch.Tensor | None):
    """(linear(x) * row_scale, linear's skipped bias, unscaled) for a column-parallel `linear`;
    row_scale [rows of this rank] in float32, or None for no scaling."""
    if row_scale is None:
        return linear(x)
    if type(linear) is ColumnParallelLinear and linear.weight is not None:
        return linear(x, weight=scale_rows(linear.weight, row_scale))
    out, bias = linear(x)  # other linears (Transformer Engine's) take no weight argument
    return out * row_scale.to(out.dtype), bias
