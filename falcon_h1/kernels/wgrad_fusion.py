"""Megatron's gradient-accumulation fusion without Apex: main_grad += grad_output^T @ input in one GEMM.

With `gradient_accumulation_fusion` on, Megatron's ColumnParallelLinear / RowParallelLinear
(tensor_parallel/layers.py) give the weight-gradient GEMM the weight's float32 `main_grad` (Megatron
DDP's gradient buffer) to accumulate into, through Apex's `fused_weight_gradient_mlp_cuda`
extension, and hand DDP a placeholder instead of a gradient. Without it, each linear's backward
writes a bf16 weight gradient that DDP's hook then adds into main_grad: per weight and micro-batch a
bf16 write and read plus a float32 read-modify-write, and the gradient rounded to bf16 on the way.

Apex cannot be installed here, but torch's addmm takes bf16/fp16 operands with out_dtype=float32
(on CUDA only), and given main_grad as both the added matrix and `out` it is one cuBLAS GEMM with
beta = 1 into the float32 tensor, the call Apex makes. This module is that drop-in: `install()`
gives it to Megatron's linears in Apex's place (MegatronStrategy calls it on GPU and turns the
fusion on). Megatron's `defer_embedding_wgrad_compute` (a pipeline-parallel option the project does
not use) imports Apex's module by name and is not served.

Row-scaled linears (scaled_linear.py: µP multipliers folded into the weight's rows) pass Megatron a
scaled copy of the weight, whose gradient is the row scale times the copy's. Their main_grad is a
view of the weight's with the scale's runs attached (`row_scaled_main_grad`): each run of equal
scale is one GEMM into its rows, with the scale as alpha.
"""

from __future__ import annotations

import sys

import torch

# Attribute of a main_grad view: ((first row, end row, scale), ...) its GEMM accumulates with.
ROW_SCALE_RUNS = "row_scale_runs"


def available() -> bool:
    """Whether this torch has addmm with a float32 output from bf16/fp16 operands."""
    return "dtype_out" in torch.ops.aten.addmm.overloads()


def _accumulate(main_grad: torch.Tensor, grad_output_t: torch.Tensor, input: torch.Tensor, alpha: float) -> None:
    """main_grad += alpha * grad_output_t @ input, one GEMM reading and writing main_grad in place."""
    if input.dtype == main_grad.dtype:
        main_grad.addmm_(grad_output_t, input, alpha=alpha)
    else:  # bf16/fp16 operands into float32: the GEMM accumulates and adds in float32
        torch.addmm(main_grad, grad_output_t, input, out_dtype=main_grad.dtype, alpha=alpha, out=main_grad)


def wgrad_gemm_accum_fp32(input: torch.Tensor, grad_output: torch.Tensor, main_grad: torch.Tensor) -> None:
    """Apex's signature: main_grad [out, in] += grad_output [tokens, out]^T @ input [tokens, in]."""
    runs = getattr(main_grad, ROW_SCALE_RUNS, None)
    if runs is None:
        _accumulate(main_grad, grad_output.t(), input, 1.0)
        return
    for start, end, scale in runs:
        # Strided column slices of grad_output go to cuBLAS as they are (leading dimension = out).
        _accumulate(main_grad[start:end], grad_output[:, start:end].t(), input, scale)


# main_grad in the operands' dtype (DDP without grad_reduce_in_fp32): the same call.
wgrad_gemm_accum_fp16 = wgrad_gemm_accum_fp32


def row_scaled_main_grad(main_grad: torch.Tensor, runs: tuple[tuple[int, int, float], ...]) -> torch.Tensor:
    """A view of `main_grad` that wgrad_gemm_accum_fp32 fills with each row's gradient times its scale."""
    view = main_grad.view(main_grad.shape)
    setattr(view, ROW_SCALE_RUNS, runs)
    return view


def scale_runs(row_scale: torch.Tensor) -> tuple[tuple[int, int, float], ...]:
    """((first row, end row, scale), ...) of each run of equal values of `row_scale` (one host sync)."""
    values = row_scale.tolist()
    runs, start = [], 0
    for row in range(1, len(values) + 1):
        if row == len(values) or values[row] != values[start]:
            runs.append((start, row, values[start]))
            start = row
    return tuple(runs)


def install() -> bool:
    """Make Megatron's linears call this module for their fused weight gradients (where it is
    available: CUDA); returns available()."""
    if not available():
        return False
    from falcon_h1.compat.megatron import use_wgrad_fusion

    use_wgrad_fusion(sys.modules[__name__])
    return True


def installed() -> bool:
    """Whether Megatron's linears call this module for their fused weight gradients."""
    from falcon_h1.compat.megatron import wgrad_fusion_module

    return wgrad_fusion_module() is sys.modules[__name__]
