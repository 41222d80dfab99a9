"""A column-parallel linear whose output rows are scaled (µP multipliers), by scaling its weight.

(x W^T) * s == x (s * W)^T, with the same gradient for W. The weight is [rows, in] and the output
[tokens, rows], so at training lengths scaling the weight moves several times less memory than
scaling the output, in forward and in backward.
"""

from __future__ import annotations

import torch
from megatron.core.tensor_parallel import ColumnParallelLinear


def row_scaled_linear(linear, x: torch.Tensor, row_scale: torch.Tensor | None):
    """(linear(x) * row_scale, linear's skipped bias, unscaled) for a column-parallel `linear`;
    row_scale [rows of this rank] in float32, or None for no scaling."""
    if row_scale is None:
        return linear(x)
    if type(linear) is ColumnParallelLinear and linear.weight is not None:
        weight = (linear.weight * row_scale[:, None]).to(linear.weight.dtype)  # one rounding
        return linear(x, weight=weight)
    out, bias = linear(x)  # other linears (Transformer Engine's) take no weight argument
    return out * row_scale.to(out.dtype), bias
