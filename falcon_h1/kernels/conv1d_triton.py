"""Causal depthwise conv1d + SiLU in Triton, forward and backward, on the channels-last layout the
mixer produces, with packed documents (seq_idx) kept apart.

The mixer's conv input is a [b, channels, s] view of the in-projection output [s, b, rows]: the
channels of one token are contiguous, tokens are `b * rows` apart. Every kernel takes a tile of
BLOCK_L tokens x BLOCK_C channels of one sequence, so every load reads whole runs of channels.
Outputs are written channels-last ([b, s, channels] in memory, returned as [b, channels, s]
views): the layout the SSD scan reads next and the in-projection's gradient is assembled from.

Forward:  pre[t] = bias + sum_k w[k] x[t - (W-1) + k],  y[t] = silu(pre[t]).
Backward, two passes that each read their inputs once (the conv is memory-bound):
  1. g[t] = dy[t] silu'(pre[t]), with pre recomputed from x (only the input is kept), stored in
     the input's dtype (torch's bf16 autograd rounds it there too); per tile, float32 partial sums
     dw[k] = sum_t g[t] x[t - (W-1) + k] and dbias = sum_t g[t], added by torch (deterministic);
  2. dx[t] = sum_j w[W-1-j] g[t+j].
With seq_idx [b, s] (the document of each token of packed rows) a tap is used only when both of
its tokens are in the same document, in all three sums, as if each document were alone.
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

# Tile shapes and warps: the fastest of benchmarks/conv_tiles.py's sweep on an H100 at 1 x 8192
# tokens of the 1.5B and 7B conv (3584 channels), 2026-11-28 (docs/performance.md).
FORWARD_TILE = dict(BLOCK_L=32, BLOCK_C=128, num_warps=4)
GRAD_TILE = dict(BLOCK_L=64, BLOCK_C=64, num_warps=4)
DX_TILE = dict(BLOCK_L=16, BLOCK_C=128, num_warps=4)

if triton is not None:
    @triton.jit
    def _tap(ptr, seq_ptr, src, t, seq_t, c, c_ok, length, stride_l, stride_c, HAS_SEQ_IDX: tl.constexpr):
        """ptr[src, c] as float32 for a tile of source tokens `src` feeding output tokens `t`; 0 where
        src is outside the sequence (or, with seq_idx, in another document than t)."""
        ok = (src >= 0) & (src < length) & (t < length)
        if HAS_SEQ_IDX:
            ok = ok & (tl.load(seq_ptr + src, mask=ok, other=-1) == seq_t)
        return tl.load(ptr + src[:, None] * stride_l + c[None, :] * stride_c, mask=ok[:, None] & c_ok[None, :],
                       other=0.0).to(tl.float32)

    @triton.jit
    def _silu_input(x_ptr, w_ptr, bias_ptr, seq_ptr, t, seq_t, c, c_ok, length, stride_xl, stride_xc,
                    WIDTH: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_SEQ_IDX: tl.constexpr,
                    BLOCK_L: tl.constexpr, BLOCK_C: tl.constexpr):
        """pre[t] = bias + sum_k w[k] x[t - (WIDTH-1) + k] for a tile of tokens t, in float32."""
        pre = tl.zeros([BLOCK_L, BLOCK_C], dtype=tl.float32)
        if HAS_BIAS:
            pre += tl.load(bias_ptr + c, mask=c_ok, other=0.0).to(tl.float32)[None, :]
        for k in tl.static_range(WIDTH):
            w = tl.load(w_ptr + c * WIDTH + k, mask=c_ok, other=0.0).to(tl.float32)
            pre += _tap(x_ptr, seq_ptr, t - (WIDTH - 1) + k, t, seq_t, c, c_ok, length, stride_xl, stride_xc,
                        HAS_SEQ_IDX) * w[None, :]
        return pre

    @triton.jit
    def _tile(length, channels, seq_ptr, stride_sb, HAS_SEQ_IDX: tl.constexpr,
              BLOCK_L: tl.constexpr, BLOCK_C: tl.constexpr):
        """This program's batch row, tokens, channels, channel mask, seq_idx row and its tokens' ids."""
        batch = tl.program_id(2).to(tl.int64)
        t = tl.program_id(0) * BLOCK_L + tl.arange(0, BLOCK_L)
        c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
        seq_row = seq_ptr + batch * stride_sb
        seq_t = tl.load(seq_row + t, mask=t < length, other=-2) if HAS_SEQ_IDX else t
        return batch, t, c, c < channels, seq_row, seq_t

    @triton.jit
    def _conv_silu_fwd(x_ptr, w_ptr, bias_ptr, seq_ptr, y_ptr, length, channels,
                       stride_xb, stride_xc, stride_xl, stride_sb, stride_yb, stride_yl,
                       WIDTH: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_SEQ_IDX: tl.constexpr,
                       BLOCK_L: tl.constexpr, BLOCK_C: tl.constexpr):
        batch, t, c, c_ok, seq_row, seq_t = _tile(length, channels, seq_ptr, stride_sb, HAS_SEQ_IDX, BLOCK_L, BLOCK_C)
        pre = _silu_input(x_ptr + batch * stride_xb, w_ptr, bias_ptr, seq_row, t, seq_t, c, c_ok, length,
                          stride_xl, stride_xc, WIDTH, HAS_BIAS, HAS_SEQ_IDX, BLOCK_L, BLOCK_C)
        y = pre * tl.sigmoid(pre)
        ok = (t < length)[:, None] & c_ok[None, :]
        tl.store(y_ptr + batch * stride_yb + t[:, None] * stride_yl + c[None, :], y.to(y_ptr.dtype.element_ty), mask=ok)

    @triton.jit
    def _conv_silu_bwd_g(x_ptr, w_ptr, bias_ptr, seq_ptr, dy_ptr, g_ptr, partial_ptr, length, channels,
                         stride_xb, stride_xc, stride_xl, stride_sb, stride_db, stride_dc, stride_dl,
                         stride_gb, stride_gl,
                         WIDTH: tl.constexpr, SUM_ROWS: tl.constexpr, HAS_BIAS: tl.constexpr,
                         HAS_SEQ_IDX: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_C: tl.constexpr):
        batch, t, c, c_ok, seq_row, seq_t = _tile(length, channels, seq_ptr, stride_sb, HAS_SEQ_IDX, BLOCK_L, BLOCK_C)
        x_row = x_ptr + batch * stride_xb
        pre = _silu_input(x_row, w_ptr, bias_ptr, seq_row, t, seq_t, c, c_ok, length, stride_xl, stride_xc,
                          WIDTH, HAS_BIAS, HAS_SEQ_IDX, BLOCK_L, BLOCK_C)
        ok = (t < length)[:, None] & c_ok[None, :]
        dy = tl.load(dy_ptr + batch * stride_db + t[:, None] * stride_dl + c[None, :] * stride_dc, mask=ok,
                     other=0.0).to(tl.float32)
        sig = tl.sigmoid(pre)
        g = (dy * sig * (1.0 + pre * (1.0 - sig))).to(g_ptr.dtype.element_ty)
        g32 = g.to(tl.float32)  # the sums use the stored (rounded) g, as torch's autograd does
        # Rows 0..WIDTH-1: this tile's share of dw[k]; row WIDTH: of dbias. The x taps repeat the SiLU
        # input's loads with no store in between (so they come from cache or are reused).
        rows = tl.arange(0, SUM_ROWS)[:, None]
        sums = tl.where(rows == WIDTH, tl.sum(g32, axis=0)[None, :], 0.0)
        for k in tl.static_range(WIDTH):
            x = _tap(x_row, seq_row, t - (WIDTH - 1) + k, t, seq_t, c, c_ok, length, stride_xl, stride_xc, HAS_SEQ_IDX)
            sums += tl.where(rows == k, tl.sum(g32 * x, axis=0)[None, :], 0.0)
        # One partial-sum block per (batch, token tile): [WIDTH + 1, channels].
        part = partial_ptr + (batch * tl.num_programs(0) + tl.program_id(0)) * (WIDTH + 1) * channels
        tl.store(part + rows * channels + c[None, :], sums, mask=(rows <= WIDTH) & c_ok[None, :])
        tl.store(g_ptr + batch * stride_gb + t[:, None] * stride_gl + c[None, :], g, mask=ok)

    @triton.jit
    def _conv_bwd_dx(g_ptr, w_ptr, seq_ptr, dx_ptr, length, channels, stride_gb, stride_gl, stride_sb,
                     stride_dxb, stride_dxl, WIDTH: tl.constexpr, HAS_SEQ_IDX: tl.constexpr,
                     BLOCK_L: tl.constexpr, BLOCK_C: tl.constexpr):
        batch, t, c, c_ok, seq_row, seq_t = _tile(length, channels, seq_ptr, stride_sb, HAS_SEQ_IDX, BLOCK_L, BLOCK_C)
        dx = tl.zeros([BLOCK_L, BLOCK_C], dtype=tl.float32)
        for j in tl.static_range(WIDTH):  # x[t] feeds the outputs t .. t + WIDTH - 1
            w = tl.load(w_ptr + c * WIDTH + (WIDTH - 1 - j), mask=c_ok, other=0.0).to(tl.float32)
            dx += w[None, :] * _tap(g_ptr + batch * stride_gb, seq_row, t + j, t, seq_t, c, c_ok, length,
                                    stride_gl, 1, HAS_SEQ_IDX)
        ok = (t < length)[:, None] & c_ok[None, :]
        tl.store(dx_ptr + batch * stride_dxb + t[:, None] * stride_dxl + c[None, :], dx.to(dx_ptr.dtype.element_ty),
                 mask=ok)


def _grid(batch: int, channels: int, length: int, tile: dict) -> tuple[int, int, int]:
    return triton.cdiv(length, tile["BLOCK_L"]), triton.cdiv(channels, tile["BLOCK_C"]), batch


def conv_silu_forward(x, w, bias, seq_idx, tile=None) -> torch.Tensor:
    """y [b, l, channels] (channels-last) for x [b, channels, l], w [channels, width]."""
    tile = tile or FORWARD_TILE
    b, channels, length = x.shape
    y = x.new_empty(b, length, channels)
    seq = seq_idx if seq_idx is not None else w  # an unread placeholder pointer
    _conv_silu_fwd[_grid(b, channels, length, tile)](
        x, w, bias if bias is not None else w, seq, y, length, channels, x.stride(0), x.stride(1), x.stride(2),
        seq.stride(0), y.stride(0), y.stride(1), WIDTH=w.shape[1], HAS_BIAS=bias is not None,
        HAS_SEQ_IDX=seq_idx is not None, **tile)
    return y


def conv_silu_grad_g(x, w, bias, seq_idx, dy, tile=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Backward pass 1: (g [b, l, channels], float32 partial sums [tiles, width + 1, channels])."""
    tile = tile or GRAD_TILE
    b, channels, length = x.shape
    width = w.shape[1]
    seq = seq_idx if seq_idx is not None else w
    g = x.new_empty(b, length, channels)
    grid = _grid(b, channels, length, tile)
    partial = torch.empty(b * grid[0], width + 1, channels, device=x.device, dtype=torch.float32)
    _conv_silu_bwd_g[grid](
        x, w, bias if bias is not None else w, seq, dy, g, partial, length, channels,
        x.stride(0), x.stride(1), x.stride(2), seq.stride(0), dy.stride(0), dy.stride(1), dy.stride(2),
        g.stride(0), g.stride(1), WIDTH=width, SUM_ROWS=triton.next_power_of_2(width + 1), HAS_BIAS=bias is not None,
        HAS_SEQ_IDX=seq_idx is not None, **tile)
    return g, partial


def conv_grad_x(g, w, seq_idx, tile=None) -> torch.Tensor:
    """Backward pass 2: dx [b, l, channels] (channels-last) from g [b, l, channels]."""
    tile = tile or DX_TILE
    b, length, channels = g.shape
    seq = seq_idx if seq_idx is not None else w
    dx = g.new_empty(b, length, channels)
    _conv_bwd_dx[_grid(b, channels, length, tile)](
        g, w, seq, dx, length, channels, g.stride(0), g.stride(1), seq.stride(0), dx.stride(0), dx.stride(1),
        WIDTH=w.shape[1], HAS_SEQ_IDX=seq_idx is not None, **tile)
    return dx


class _CausalConv1dSiLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, seq_idx):
        channels, width = weight.shape[0], weight.shape[-1]
        w = weight.reshape(channels, width).contiguous()
        ctx.save_for_backward(x, w, bias, seq_idx)
        ctx.weight_shape = weight.shape
        return conv_silu_forward(x, w, bias, seq_idx).transpose(1, 2)

    @staticmethod
    def backward(ctx, dy):
        x, w, bias, seq_idx = ctx.saved_tensors
        width = w.shape[1]
        g, partial = conv_silu_grad_g(x, w, bias, seq_idx, dy)
        dx = conv_grad_x(g, w, seq_idx)  # channels-last, like the input it came from
        sums = partial.sum(0)
        dw = sums[:width].t().reshape(ctx.weight_shape).to(w.dtype)
        dbias = sums[width].to(bias.dtype) if bias is not None else None
        return dx.transpose(1, 2), dw, dbias, None


def causal_conv1d_triton(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                         seq_idx: torch.Tensor | None = None) -> torch.Tensor:
    """x [b, d, l] (any strides), weight [d, 1, k], bias [d] or None, seq_idx [b, l] or None ->
    silu(causal conv) [b, d, l], stored channels-last."""
    if triton is None:
        raise RuntimeError("causal_conv1d_triton needs Triton")
    if seq_idx is not None:
        seq_idx = seq_idx.to(torch.int32).contiguous()
    return _CausalConv1dSiLU.apply(x, weight, bias, seq_idx)
