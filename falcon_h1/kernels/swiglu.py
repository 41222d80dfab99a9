"""SwiGLU, silu(gate) * up, over the fused [gate | up] output of the MLP's first GEMM.

On CUDA one Triton kernel does the forward and one the backward, each a single pass over memory;
autograd keeps only the GEMM output. The torch expression is the CPU path and the oracle.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def swiglu_torch(x: torch.Tensor) -> torch.Tensor:
    gate, up = x.chunk(2, dim=-1)
    return F.silu(gate) * up


try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs
    triton = None

if triton is not None:
    @triton.jit
    def _swiglu_fwd(x_ptr, out_ptr, width, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        mask = cols < width
        gate = tl.load(x_ptr + row * 2 * width + cols, mask=mask, other=0.0).to(tl.float32)
        up = tl.load(x_ptr + row * 2 * width + width + cols, mask=mask, other=0.0).to(tl.float32)
        out = gate * tl.sigmoid(gate) * up
        tl.store(out_ptr + row * width + cols, out.to(out_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _swiglu_bwd(x_ptr, grad_ptr, dx_ptr, width, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        mask = cols < width
        gate = tl.load(x_ptr + row * 2 * width + cols, mask=mask, other=0.0).to(tl.float32)
        up = tl.load(x_ptr + row * 2 * width + width + cols, mask=mask, other=0.0).to(tl.float32)
        grad = tl.load(grad_ptr + row * width + cols, mask=mask, other=0.0).to(tl.float32)
        sig = tl.sigmoid(gate)
        silu = gate * sig
        d_gate = grad * up * sig * (1.0 + gate * (1.0 - sig))
        tl.store(dx_ptr + row * 2 * width + cols, d_gate.to(dx_ptr.dtype.element_ty), mask=mask)
        tl.store(dx_ptr + row * 2 * width + width + cols, (grad * silu).to(dx_ptr.dtype.element_ty), mask=mask)


_BLOCK = 1024


class _SwiGLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        x = x.contiguous()
        width = x.shape[-1] // 2
        rows = x.numel() // x.shape[-1]
        out = x.new_empty(*x.shape[:-1], width)
        _swiglu_fwd[(rows, triton.cdiv(width, _BLOCK))](x, out, width, BLOCK=_BLOCK)
        ctx.save_for_backward(x)
        return out

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        grad = grad.contiguous()
        width = x.shape[-1] // 2
        rows = x.numel() // x.shape[-1]
        dx = torch.empty_like(x)
        _swiglu_bwd[(rows, triton.cdiv(width, _BLOCK))](x, grad, dx, width, BLOCK=_BLOCK)
        return dx


def swiglu(x: torch.Tensor) -> torch.Tensor:
    """silu(x[..., :w]) * x[..., w:] for x [..., 2w]; the Triton kernels on CUDA."""
    if x.is_cuda and triton is not None:
        return _SwiGLU.apply(x)
    return swiglu_torch(x)
