"""Causal depthwise conv1d + SiLU in Triton, forward and backward, on the channels-last layout the
mixer produces.

The mixer's conv input is a [b, channels, s] view of the in-projection output [s, b, rows]: the
channels of one token are contiguous, tokens are `b * rows` apart. Each program takes a tile of
BLOCK_L tokens x BLOCK_C channels of one sequence, so every load reads whole runs of channels. The
output is written channels-last ([b, s, channels] in memory, returned as a [b, channels, s] view),
which is the layout the SSD scan reads next, without a copy.

Forward:  pre[t] = bias + sum_k w[k] x[t - (W-1) + k],  y[t] = silu(pre[t]).
Backward: g[t] = dy[t] silu'(pre[t]), recomputed from x (nothing but the input is kept);
          dx[t] = sum_j w[W-1-j] g[t+j];  dw[k] = sum_t g[t] x[t - (W-1) + k];  dbias = sum_t g[t].
dw and dbias are summed per program in float32 and the partial sums added by torch (deterministic).
The torch version (conv1d.py) is the oracle: tests/test_triton_kernels_interpreted.py checks this
file under Triton's interpreter on the CPU, tests/gpu/test_gpu_kernels.py on the GPU.
"""

from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs
    triton = None

BLOCK_L, BLOCK_C = 64, 64

if triton is not None:
    @triton.jit
    def _load_x(x_ptr, src, c, c_ok, batch, length, stride_xb, stride_xc, stride_xl):
        """x[batch, c, src] for a tile of tokens src (0 outside the sequence), in float32."""
        ok = ((src >= 0) & (src < length))[:, None] & c_ok[None, :]
        x = tl.load(x_ptr + batch * stride_xb + src[:, None] * stride_xl + c[None, :] * stride_xc, mask=ok, other=0.0)
        return x.to(tl.float32)

    @triton.jit
    def _conv_pre(x_ptr, w_ptr, bias_ptr, t, c, c_ok, batch, length, stride_xb, stride_xc, stride_xl,
                  WIDTH: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_C: tl.constexpr):
        """The SiLU input for a tile of tokens t: bias + sum_k w[k] x[t - (WIDTH-1) + k]."""
        pre = tl.zeros([BLOCK_L, BLOCK_C], dtype=tl.float32)
        if HAS_BIAS:
            pre += tl.load(bias_ptr + c, mask=c_ok, other=0.0).to(tl.float32)[None, :]
        for k in tl.static_range(WIDTH):
            w = tl.load(w_ptr + c * WIDTH + k, mask=c_ok, other=0.0).to(tl.float32)
            pre += _load_x(x_ptr, t - (WIDTH - 1) + k, c, c_ok, batch, length, stride_xb, stride_xc, stride_xl) \
                * w[None, :]
        return pre

    @triton.jit
    def _conv_silu_fwd(x_ptr, w_ptr, bias_ptr, y_ptr, length, channels,
                       stride_xb, stride_xc, stride_xl, stride_yb, stride_yl,
                       WIDTH: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_C: tl.constexpr):
        batch = tl.program_id(2).to(tl.int64)
        t = tl.program_id(0) * BLOCK_L + tl.arange(0, BLOCK_L)
        c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
        c_ok = c < channels
        pre = _conv_pre(x_ptr, w_ptr, bias_ptr, t, c, c_ok, batch, length, stride_xb, stride_xc, stride_xl,
                        WIDTH, HAS_BIAS, BLOCK_L, BLOCK_C)
        y = pre * tl.sigmoid(pre)
        ok = (t < length)[:, None] & c_ok[None, :]
        tl.store(y_ptr + batch * stride_yb + t[:, None] * stride_yl + c[None, :], y.to(y_ptr.dtype.element_ty), mask=ok)

    @triton.jit
    def _conv_silu_bwd(x_ptr, w_ptr, bias_ptr, dy_ptr, dx_ptr, partial_ptr, length, channels,
                       stride_xb, stride_xc, stride_xl, stride_db, stride_dc, stride_dl, stride_dxb, stride_dxl,
                       WIDTH: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_C: tl.constexpr):
        batch = tl.program_id(2).to(tl.int64)
        t = tl.program_id(0) * BLOCK_L + tl.arange(0, BLOCK_L)
        c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
        c_ok = c < channels
        dx = tl.zeros([BLOCK_L, BLOCK_C], dtype=tl.float32)
        # One partial-sum row per (batch, token tile): [WIDTH + 1, channels] (dw rows, then dbias).
        part = (batch * tl.num_programs(0) + tl.program_id(0)) * (WIDTH + 1) * channels
        for j in tl.static_range(WIDTH):
            # g at tokens t + j: dy times silu' of the recomputed SiLU input (0 past the end).
            tj = t + j
            pre = _conv_pre(x_ptr, w_ptr, bias_ptr, tj, c, c_ok, batch, length, stride_xb, stride_xc, stride_xl,
                            WIDTH, HAS_BIAS, BLOCK_L, BLOCK_C)
            ok = (tj < length)[:, None] & c_ok[None, :]
            dy = tl.load(dy_ptr + batch * stride_db + tj[:, None] * stride_dl + c[None, :] * stride_dc, mask=ok,
                         other=0.0).to(tl.float32)
            sig = tl.sigmoid(pre)
            g = tl.where(ok, dy * sig * (1.0 + pre * (1.0 - sig)), 0.0)
            w = tl.load(w_ptr + c * WIDTH + (WIDTH - 1 - j), mask=c_ok, other=0.0).to(tl.float32)
            dx += w[None, :] * g
            if j == 0:  # this tile's own tokens: their share of dw and dbias
                for k in tl.static_range(WIDTH):
                    x = _load_x(x_ptr, t - (WIDTH - 1) + k, c, c_ok, batch, length, stride_xb, stride_xc, stride_xl)
                    tl.store(partial_ptr + part + k * channels + c, tl.sum(g * x, axis=0), mask=c_ok)
                tl.store(partial_ptr + part + WIDTH * channels + c, tl.sum(g, axis=0), mask=c_ok)
        ok = (t < length)[:, None] & c_ok[None, :]
        tl.store(dx_ptr + batch * stride_dxb + t[:, None] * stride_dxl + c[None, :], dx.to(dx_ptr.dtype.element_ty),
                 mask=ok)


def _grid(batch: int, channels: int, length: int):
    return (triton.cdiv(length, BLOCK_L), triton.cdiv(channels, BLOCK_C), batch)


class _CausalConv1dSiLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias):
        b, channels, length = x.shape
        width = weight.shape[-1]
        w = weight.reshape(channels, width).contiguous()
        y = x.new_empty(b, length, channels)  # channels-last
        _conv_silu_fwd[_grid(b, channels, length)](
            x, w, bias if bias is not None else w, y, length, channels, x.stride(0), x.stride(1), x.stride(2),
            y.stride(0), y.stride(1), WIDTH=width, HAS_BIAS=bias is not None, BLOCK_L=BLOCK_L, BLOCK_C=BLOCK_C)
        ctx.save_for_backward(x, w, bias)
        ctx.weight_shape = weight.shape
        return y.transpose(1, 2)

    @staticmethod
    def backward(ctx, dy):
        x, w, bias = ctx.saved_tensors
        b, channels, length = x.shape
        width = w.shape[-1]
        dx = x.new_empty(b, length, channels)  # channels-last, like the input it came from
        grid = _grid(b, channels, length)
        partial = torch.empty(b * grid[0], width + 1, channels, device=x.device, dtype=torch.float32)
        _conv_silu_bwd[grid](
            x, w, bias if bias is not None else w, dy, dx, partial, length, channels,
            x.stride(0), x.stride(1), x.stride(2), dy.stride(0), dy.stride(1), dy.stride(2), dx.stride(0), dx.stride(1),
            WIDTH=width, HAS_BIAS=bias is not None, BLOCK_L=BLOCK_L, BLOCK_C=BLOCK_C)
        sums = partial.sum(0)
        dw = sums[:width].t().reshape(ctx.weight_shape).to(w.dtype)
        dbias = sums[width].to(bias.dtype) if bias is not None else None
        return dx.transpose(1, 2), dw, dbias


def causal_conv1d_triton(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x [b, d, l] (any strides), weight [d, 1, k], bias [d] or None -> silu(causal conv) [b, d, l],
    stored channels-last."""
    if triton is None:
        raise RuntimeError("causal_conv1d_triton needs Triton")
    return _CausalConv1dSiLU.apply(x, weight, bias)
