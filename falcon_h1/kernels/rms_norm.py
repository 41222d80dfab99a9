"""RMSNorm as Falcon-H1 (and transformers) compute it, in one Triton pass forward and one backward.

    y = weight * round(x * rsqrt(mean(x^2) + eps))      round: back to x's dtype, in float32 math

The torch expression (rms_norm_torch) makes about ten passes over float32 copies of the
activations per norm, forward and backward; a 1.5B step at 8192 tokens runs 49 norms. Here the
forward reads x once and writes y (and one float32 rstd per row); the backward reads x and dy,
writes dx and a float32 partial sum of dweight per program, which torch adds up. Each program
takes a whole row (the hidden size fits one block).

Backward, with n = x * rstd (float32) and g = dy * weight:
    dx = rstd * (g - n * mean(g * n)),   dweight = sum over rows of dy * round(n).
The rounding of n is passed straight through, as autograd does for a dtype cast.
"""

from __future__ import annotations

import torch

from falcon_h1.kernels import _gpu_kernel

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs
    triton = None


def rms_norm_torch(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """The reference: normalize in float32, cast back to x's dtype, then scale by the weight."""
    x32 = x.float()
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(dim=-1, keepdim=True) + eps)
    return weight * x32.to(x.dtype)


if triton is not None:
    @triton.jit
    def _rms_norm_fwd(x_ptr, w_ptr, y_ptr, rstd_ptr, width, eps, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.arange(0, BLOCK)
        mask = cols < width
        x = tl.load(x_ptr + row * width + cols, mask=mask, other=0.0).to(tl.float32)
        rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=0) / width + eps)
        n = (x * rstd).to(x_ptr.dtype.element_ty).to(tl.float32)  # the reference's cast back
        w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
        tl.store(y_ptr + row * width + cols, (w * n).to(y_ptr.dtype.element_ty), mask=mask)
        tl.store(rstd_ptr + row, rstd)

    @triton.jit
    def _rms_norm_bwd(x_ptr, w_ptr, dy_ptr, rstd_ptr, dx_ptr, dw_partial_ptr, rows, width,
                      ROWS_PER_PROGRAM: tl.constexpr, BLOCK: tl.constexpr):
        program = tl.program_id(0)
        cols = tl.arange(0, BLOCK)
        mask = cols < width
        w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
        dw = tl.zeros([BLOCK], dtype=tl.float32)
        for i in range(ROWS_PER_PROGRAM):
            row = program * ROWS_PER_PROGRAM + i
            ok = mask & (row < rows)  # the last program's rows may run out
            offset = row.to(tl.int64) * width
            x = tl.load(x_ptr + offset + cols, mask=ok, other=0.0).to(tl.float32)
            dy = tl.load(dy_ptr + offset + cols, mask=ok, other=0.0).to(tl.float32)
            rstd = tl.load(rstd_ptr + row, mask=row < rows, other=0.0)
            n = x * rstd
            g = dy * w
            dx = rstd * (g - n * (tl.sum(g * n, axis=0) / width))
            tl.store(dx_ptr + offset + cols, dx.to(dx_ptr.dtype.element_ty), mask=ok)
            dw += dy * n.to(x_ptr.dtype.element_ty).to(tl.float32)
        tl.store(dw_partial_ptr + program * width + cols, dw, mask=mask)


_BWD_ROWS_PER_PROGRAM = 32  # 256 programs at 8192 tokens: about two per SM on an H100


def _block(width: int) -> int:
    return triton.next_power_of_2(width)


def _warps(width: int) -> int:
    return min(max(_block(width) // 256, 1), 16)


class _RMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, eps):
        shape = x.shape
        x = x.reshape(-1, shape[-1]).contiguous()
        rows, width = x.shape
        y = torch.empty(rows, width, device=x.device, dtype=torch.promote_types(x.dtype, weight.dtype))
        rstd = torch.empty(rows, device=x.device, dtype=torch.float32)
        _rms_norm_fwd[(rows,)](x, weight, y, rstd, width, eps, BLOCK=_block(width), num_warps=_warps(width))
        ctx.save_for_backward(x, weight, rstd)
        return y.view(shape)

    @staticmethod
    def backward(ctx, dy):
        x, weight, rstd = ctx.saved_tensors
        shape = dy.shape
        rows, width = x.shape
        dy = dy.reshape(rows, width).contiguous()
        dx = torch.empty_like(x)
        programs = triton.cdiv(rows, _BWD_ROWS_PER_PROGRAM)  # each sums its rows' share of dweight
        dw_partial = torch.empty(programs, width, device=x.device, dtype=torch.float32)
        _rms_norm_bwd[(programs,)](x, weight, dy, rstd, dx, dw_partial, rows, width,
                                   ROWS_PER_PROGRAM=_BWD_ROWS_PER_PROGRAM, BLOCK=_block(width),
                                   num_warps=_warps(width))
        return dx.view(shape), dw_partial.sum(0).to(weight.dtype), None


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, backend: str = "auto") -> torch.Tensor:
    """RMSNorm over the last dimension: the Triton kernels or the torch expression, chosen by
    `backend` as for the other kernels (falcon_h1.kernels)."""
    if _gpu_kernel(x, backend, "triton"):
        return _RMSNorm.apply(x, weight, eps)
    return rms_norm_torch(x, weight, eps)
