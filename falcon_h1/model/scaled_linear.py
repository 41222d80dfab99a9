"""A column-parallel linear whose output rows are scaled (µP multipliers), by scaling its weight.

(x W^T) * s == x (s * W)^T, with the same gradient for W. The weight is [rows, in] and the output
[tokens, rows], so at training lengths scaling the weight moves less memory than scaling the
output. The scaled weight is made in one pass each way (scale_rows): the float32 product rounded
once, straight into the weight's dtype, with no float32 copy of the weight in between.

Under Megatron's gradient-accumulation fusion the linear's weight-gradient GEMM adds straight into
the weight's main_grad and no gradient flows back through the scaled copy: that GEMM applies the
row scale itself (kernels/wgrad_fusion.py), and the copy's backward only passes on the placeholder.
"""

from __future__ import annotations

import torch
from megatron.core.tensor_parallel import ColumnParallelLinear

from falcon_h1.kernels import wgrad_fusion


class _ScaleRows(torch.autograd.Function):
    """weight * row_scale[:, None] in weight's dtype; its gradient is grad * row_scale[:, None].
    `fused`: the linear's GEMM accumulates the scaled gradient into weight.main_grad itself."""

    @staticmethod
    def forward(ctx, weight, row_scale, fused):
        ctx.save_for_backward(row_scale)
        ctx.fused_weight = weight if fused else None
        return _scaled(weight, row_scale)

    @staticmethod
    def backward(ctx, grad):
        if ctx.fused_weight is not None:
            # `grad` is Megatron's placeholder (empty, or zeros under zero_out_wgrad). Marked as
            # Megatron marks a weight it fuses directly, DDP's hook leaves main_grad alone.
            ctx.fused_weight.grad_added_to_main_grad = True
            return grad, None, None
        (row_scale,) = ctx.saved_tensors
        return _scaled(grad, row_scale), None, None


def _scaled(t: torch.Tensor, row_scale: torch.Tensor) -> torch.Tensor:
    # torch computes a bf16 x float32 product in float32 and rounds it on store: one kernel.
    return torch.mul(t, row_scale.view(-1, *([1] * (t.dim() - 1))), out=torch.empty_like(t))


def scale_rows(weight: torch.Tensor, row_scale: torch.Tensor) -> torch.Tensor:
    """weight [rows, ...] * row_scale [rows] (float32), rounded once to weight's dtype."""
    return _ScaleRows.apply(weight, row_scale, False)


def row_scaled_linear(linear, x: torch.Tensor, row_scale: torch.Tensor | None):
    """(linear(x) * row_scale, linear's skipped bias, unscaled) for a column-parallel `linear`;
    row_scale [rows of this rank] in float32, or None for no scaling."""
    if row_scale is None:
        return linear(x)
    if type(linear) is ColumnParallelLinear and linear.weight is not None:
        if _fuses_wgrad(linear):
            return linear(x, weight=_scaled_for_fused_wgrad(linear, row_scale))
        return linear(x, weight=scale_rows(linear.weight, row_scale))
    out, bias = linear(x)  # other linears (Transformer Engine's) take no weight argument
    return out * row_scale.to(out.dtype), bias


def _fuses_wgrad(linear) -> bool:
    """Whether Megatron's GEMM accumulates this linear's weight gradient into main_grad (DDP's)."""
    weight = linear.weight
    return (linear.gradient_accumulation_fusion and weight.requires_grad and hasattr(weight, "main_grad")
            and hasattr(weight, "grad_added_to_main_grad"))


def _scaled_for_fused_wgrad(linear, row_scale: torch.Tensor) -> torch.Tensor:
    """The scaled weight, carrying what Megatron's fused path reads from the weight it is given:
    a main_grad (the weight's, filled row-scaled) and the attributes that make it hand back a
    placeholder gradient."""
    if not wgrad_fusion.installed():
        raise RuntimeError("gradient_accumulation_fusion with µP row scales needs falcon_h1's fused weight-gradient "
                           "GEMM in Megatron (falcon_h1.kernels.wgrad_fusion.install()), which applies the scales")
    weight = linear.weight
    # The scale is a fixed buffer: its runs are read once (one host sync, in the first eager step,
    # never while a CUDA graph is captured) and kept on the linear.
    runs = getattr(linear, "_row_scale_runs", None)
    if runs is None:
        runs = linear._row_scale_runs = wgrad_fusion.scale_runs(row_scale)
    scaled = _ScaleRows.apply(weight, row_scale, True)
    scaled.main_grad = wgrad_fusion.row_scaled_main_grad(weight.main_grad, runs)
    scaled.grad_added_to_main_grad = False
    scaled.zero_out_wgrad = getattr(weight, "zero_out_wgrad", False)
    return scaled
