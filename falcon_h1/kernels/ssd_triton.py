"""The Mamba-2 SSD scan in Triton, forward and backward, written for Falcon-H1's shapes.

Per head h (of group g), with dt already discretized (ssd.py) and a_t = dt_t * A_h <= 0:

    S_t = exp(a_t) S_{t-1} + dt_t x_t B_t^T        (state [head_dim, d_state])
    y_t = S_t C_t + D_h x_t

The sequence is cut into chunks of T tokens (T is this kernel's choice, not the model's chunk size:
the result is the same up to rounding). With G_t the cumulative sum of a inside the chunk:

    y_i  = sum_{j<=i} (C_i . B_j) exp(G_i - G_j) dt_j x_j + exp(G_i) S_in C_i + D x_i
    S_out = exp(G_last) S_in + sum_j exp(G_last - G_j) dt_j x_j B_j^T

Forward: _ssd_dt_cumsum, _ssd_states_fwd, _ssd_output_fwd; backward: those two again (the states are
recomputed, not kept), _ssd_dstates_bwd, _ssd_dx_bwd, _ssd_dbc_bwd, _ssd_dt_bwd:
  _ssd_dt_cumsum      dt = clamp(softplus(dt_raw + bias)) and G, per head, as [b, h, L] float32;
  _ssd_states_fwd     the state entering every chunk, one sequential loop over the chunks that keeps the
                  state in registers (mamba_ssm writes float32 chunk states, then passes them on in
                  a second kernel);
  _ssd_output_fwd     y per chunk; C.B^T is formed once per chunk and group and reused by its heads;
  _ssd_dstates_bwd    the gradient of the state leaving every chunk, the same loop run backwards;
  _ssd_dx_bwd         dx, and the part of d(dt) that flows through dt_j x_j;
  _ssd_dbc_bwd        dB and dC summed over the heads of a group in registers, and dG per head;
  _ssd_dt_bwd         d(dt_raw), and partial sums of dA and d(dt_bias).
The gradient of the decays uses dG_t = C_t . dC_t - B_t . dB_t (per head, plus the state terms at
the chunk's last token), reverse-summed inside the chunk into d(a).

Packed rows (seq_idx, the document of each token): a pair (i, j) counts only inside one
document, the state entering a chunk only for tokens of the document it carries, and the state
leaving a chunk only from tokens of the chunk's last document.

Tensor-core dots take the inputs' dtype (bf16 in training; float32 inputs use TF32x3, which is
about float32-accurate); accumulation, decays and the carried state are float32.
"""

from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs
    triton = None

# chunk: tokens per chunk; block_n: state columns per program of the sequential kernels and of
# _ssd_dbc_bwd; heads: heads sharing one C.B^T in _ssd_output_fwd and _ssd_dx_bwd; warps, stages: Triton's
# num_warps and num_stages. From benchmarks/ssd_tiles.py's sweep on an H200.
TILE = dict(chunk=64, block_n=64, state_n=32, heads=8, warps=4, stages=3, keep_states=True)


if triton is not None:
    @triton.jit
    def _mm(a, b, PRECISION: tl.constexpr):
        return tl.dot(a, b, input_precision=PRECISION)

    @triton.jit
    def _chunk_tokens(seq_ptr, stride_sb, b, c, length, T: tl.constexpr, HAS_SEQ_IDX: tl.constexpr):
        """The chunk's tokens, their validity, and (with seq_idx) their document, the document of
        the chunk's last token and that of the token before the chunk."""
        t = c * T + tl.arange(0, T)
        valid = t < length
        if HAS_SEQ_IDX:
            row = seq_ptr + b * stride_sb
            doc = tl.load(row + tl.minimum(t, length - 1))
            doc_last = tl.load(row + tl.minimum(c * T + T - 1, length - 1))
            doc_prev = tl.load(row + tl.maximum(c * T - 1, 0))
        else:
            doc = tl.zeros([T], dtype=tl.int32)
            doc_last = tl.full([], 0, tl.int32)
            doc_prev = tl.full([], 0, tl.int32)
        return t, valid, doc, doc_last, doc_prev

    @triton.jit
    def _softplus(x):
        """torch's softplus (x above 20 passes through), with log1p(u) = log(1 + u) u / ((1 + u) - 1)
        so that small dt keep float32's relative precision."""
        u = tl.exp(tl.minimum(x, 20.0))
        w = 1.0 + u
        log1p = tl.where(w == 1.0, u, tl.log(w) * u / (w - 1.0))
        return tl.where(x > 20.0, x, log1p)

    @triton.jit
    def _ssd_dt_cumsum(dt_ptr, bias_ptr, A_ptr, dt_out_ptr, G_out_ptr, length, heads, padded_length,
                   stride_db, stride_dl, stride_dh, dt_min, dt_max,
                   T: tl.constexpr, HAS_LIMIT: tl.constexpr):
        pid_bh, c = tl.program_id(0), tl.program_id(1)
        b, h = pid_bh // heads, pid_bh % heads
        t = c * T + tl.arange(0, T)
        valid = t < length
        raw = tl.load(dt_ptr + b * stride_db + t * stride_dl + h * stride_dh, mask=valid, other=0.0).to(tl.float32)
        raw += tl.load(bias_ptr + h).to(tl.float32)
        dt = _softplus(raw)
        if HAS_LIMIT:
            dt = tl.minimum(tl.maximum(dt, dt_min), dt_max)
        dt = tl.where(valid, dt, 0.0)  # padding neither decays nor adds
        G = tl.cumsum(dt * tl.load(A_ptr + h).to(tl.float32), axis=0)
        out = pid_bh.to(tl.int64) * padded_length + t
        tl.store(dt_out_ptr + out, dt)
        tl.store(G_out_ptr + out, G)

    @triton.jit
    def _ssd_dt_bwd(dG_ptr, ddt_ptr, dt_ptr, dt_raw_ptr, bias_ptr, A_ptr, ddt_raw_ptr, dA_ptr, dbias_ptr,
                batch, length, heads, chunks, padded_length, n_blocks,
                stride_db, stride_dl, stride_dh, stride_ob, stride_ol, stride_oh, dt_min, dt_max,
                T: tl.constexpr, HAS_LIMIT: tl.constexpr):
        """d(a) = reverse cumulative sum of dG inside the chunk (a = dt A, G its cumulative sum);
        d(dt) = its direct part + A d(a), taken through clamp(softplus(dt_raw + bias)). Per-chunk
        partial sums of dA and d(bias), added by torch."""
        pid_bh, c = tl.program_id(0), tl.program_id(1)
        b, h = pid_bh // heads, pid_bh % heads
        t = c * T + tl.arange(0, T)
        valid = t < length
        at = pid_bh.to(tl.int64) * padded_length + t
        dG = tl.zeros([T], dtype=tl.float32)
        for k in range(n_blocks):
            dG += tl.load(dG_ptr + k * batch * heads * padded_length + at)
        da = tl.cumsum(dG, axis=0, reverse=True)
        A = tl.load(A_ptr + h).to(tl.float32)
        ddt = tl.load(ddt_ptr + at) + A * da
        raw = tl.load(dt_raw_ptr + b * stride_db + t * stride_dl + h * stride_dh, mask=valid, other=0.0).to(tl.float32)
        raw += tl.load(bias_ptr + h).to(tl.float32)
        ddt *= tl.where(raw > 20.0, 1.0, tl.sigmoid(raw))
        if HAS_LIMIT:
            soft = _softplus(raw)
            ddt = tl.where((soft >= dt_min) & (soft <= dt_max), ddt, 0.0)
        ddt = tl.where(valid, ddt, 0.0)
        tl.store(ddt_raw_ptr + b * stride_ob + t * stride_ol + h * stride_oh, ddt.to(ddt_raw_ptr.dtype.element_ty),
                 mask=valid)
        part = pid_bh.to(tl.int64) * chunks + c
        tl.store(dA_ptr + part, tl.sum(tl.load(dt_ptr + at) * da))
        tl.store(dbias_ptr + part, tl.sum(ddt))

    @triton.jit
    def _state_block(heads, heads_per_group, head_dim, d_state, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr):
        """A sequential kernel's program: its batch row, head, group, block of the state's rows (p)
        and columns (n), their offsets in a [p, n] state and mask, and the (b, h) row as int64."""
        pid_bh, pid_p, pid_n = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        b, h = pid_bh // heads, pid_bh % heads
        p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
        n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        pn = p[:, None] * d_state + n[None, :]
        pn_mask = (p[:, None] < head_dim) & (n[None, :] < d_state)
        return b, h, h // heads_per_group, p, n, pn, pn_mask, pid_bh.to(tl.int64)

    @triton.jit
    def _first_state(ptr, offsets, mask, GIVEN: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr):
        """The state (or its gradient) a sequential loop starts from: given, or zeros."""
        if GIVEN:
            return tl.load(ptr + offsets, mask=mask, other=0.0).to(tl.float32)
        return tl.zeros([BLOCK_P, BLOCK_N], dtype=tl.float32)

    @triton.jit
    def _ssd_states_fwd(x_ptr, B_ptr, dt_ptr, G_ptr, init_ptr, states_ptr, final_ptr, seq_ptr,
                    length, heads, heads_per_group, chunks, head_dim, d_state, padded_length,
                    stride_xb, stride_xl, stride_xh, stride_Bb, stride_Bl, stride_Bg, stride_sb,
                    T: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr,
                    HAS_INIT: tl.constexpr, HAS_FINAL: tl.constexpr, HAS_SEQ_IDX: tl.constexpr,
                    PRECISION: tl.constexpr):
        """states[b, c, h] = the state entering chunk c (p x n block of it), for every c."""
        b, h, g, p, n, pn, pn_mask, bh = _state_block(heads, heads_per_group, head_dim, d_state, BLOCK_P, BLOCK_N)
        S = _first_state(init_ptr, bh * head_dim * d_state + pn, pn_mask, HAS_INIT, BLOCK_P, BLOCK_N)
        x_row = x_ptr + b.to(tl.int64) * stride_xb + h * stride_xh
        B_row = B_ptr + b.to(tl.int64) * stride_Bb + g * stride_Bg
        for c in range(chunks):
            tl.store(states_ptr + ((b.to(tl.int64) * chunks + c) * heads + h) * head_dim * d_state + pn,
                     S.to(states_ptr.dtype.element_ty), mask=pn_mask)
            t, valid, doc, doc_last, doc_prev = _chunk_tokens(seq_ptr, stride_sb, b, c, length, T, HAS_SEQ_IDX)
            G = tl.load(G_ptr + bh * padded_length + t)
            G_last = tl.load(G_ptr + bh * padded_length + c * T + T - 1)
            dt = tl.load(dt_ptr + bh * padded_length + t)
            to_end = tl.where(doc == doc_last, tl.exp(G_last - G) * dt, 0.0)
            xT = tl.load(x_row + t[None, :] * stride_xl + p[:, None], mask=valid[None, :] & (p[:, None] < head_dim),
                         other=0.0)
            Bc = tl.load(B_row + t[:, None] * stride_Bl + n[None, :], mask=valid[:, None] & (n[None, :] < d_state),
                         other=0.0)
            carry = tl.where(doc_last == doc_prev, tl.exp(G_last), 0.0)
            S = S * carry + _mm(xT, (Bc * to_end[:, None]).to(xT.dtype), PRECISION)
        if HAS_FINAL:
            tl.store(final_ptr + bh * head_dim * d_state + pn, S, mask=pn_mask)

    @triton.jit
    def _group_scores(B_row, C_row, t, valid, stride_Bl, stride_Cl, d_state,
                      T: tl.constexpr, BLOCK_N: tl.constexpr, PRECISION: tl.constexpr):
        """C_i . B_j over the chunk's tokens, float32 [T, T]."""
        scores = tl.zeros([T, T], dtype=tl.float32)
        for n0 in range(0, d_state, BLOCK_N):
            n = n0 + tl.arange(0, BLOCK_N)
            nm = n < d_state
            Cc = tl.load(C_row + t[:, None] * stride_Cl + n[None, :], mask=valid[:, None] & nm[None, :], other=0.0)
            BcT = tl.load(B_row + t[None, :] * stride_Bl + n[:, None], mask=valid[None, :] & nm[:, None], other=0.0)
            scores += _mm(Cc, BcT, PRECISION)
        return scores

    @triton.jit
    def _heads_program(B_ptr, C_ptr, seq_ptr, length, heads_per_group, chunks, d_state,
                       stride_Bb, stride_Bl, stride_Bg, stride_Cb, stride_Cl, stride_Cg, stride_sb,
                       T: tl.constexpr, BLOCK_N: tl.constexpr, HEADS: tl.constexpr, HAS_SEQ_IDX: tl.constexpr,
                       PRECISION: tl.constexpr):
        """A program over one chunk and HEADS heads of a group (_ssd_output_fwd, _ssd_dx_bwd): its batch row,
        chunk, first head, tokens, B and C rows, the group's C.B^T and the (i, j) pairs that count."""
        pid_h, pid_bc = tl.program_id(0), tl.program_id(1)  # programs sharing a chunk run together
        b, c = pid_bc // chunks, pid_bc % chunks
        h0 = pid_h * HEADS
        g = h0 // heads_per_group
        t, valid, doc, doc_last, doc_prev = _chunk_tokens(seq_ptr, stride_sb, b, c, length, T, HAS_SEQ_IDX)
        B_row = B_ptr + b.to(tl.int64) * stride_Bb + g * stride_Bg
        C_row = C_ptr + b.to(tl.int64) * stride_Cb + g * stride_Cg
        scores = _group_scores(B_row, C_row, t, valid, stride_Bl, stride_Cl, d_state, T, BLOCK_N, PRECISION)
        return b, c, pid_bc, h0, t, valid, doc, doc_last, doc_prev, B_row, C_row, scores, _pairs(doc, T)

    @triton.jit
    def _pairs(doc, T: tl.constexpr):
        """(i, j) with j <= i in one document: the pairs of the chunk's masked products."""
        i = tl.arange(0, T)
        return (i[:, None] >= i[None, :]) & (doc[:, None] == doc[None, :])

    @triton.jit
    def _ssd_output_fwd(x_ptr, B_ptr, C_ptr, dt_ptr, G_ptr, D_ptr, states_ptr, y_ptr, seq_ptr,
                    length, heads, heads_per_group, chunks, head_dim, d_state, padded_length,
                    stride_xb, stride_xl, stride_xh, stride_Bb, stride_Bl, stride_Bg,
                    stride_Cb, stride_Cl, stride_Cg, stride_yb, stride_yl, stride_yh, stride_sb,
                    T: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr, HEADS: tl.constexpr,
                    HAS_D: tl.constexpr, HAS_SEQ_IDX: tl.constexpr, PRECISION: tl.constexpr):
        b, c, pid_bc, h0, t, valid, doc, doc_last, doc_prev, B_row, C_row, scores, pair = _heads_program(
            B_ptr, C_ptr, seq_ptr, length, heads_per_group, chunks, d_state, stride_Bb, stride_Bl, stride_Bg,
            stride_Cb, stride_Cl, stride_Cg, stride_sb, T, BLOCK_N, HEADS, HAS_SEQ_IDX, PRECISION)
        from_state = doc == doc_prev
        p = tl.arange(0, BLOCK_P)
        pm = p < head_dim
        for h in range(h0, h0 + HEADS):
            bh = (b * heads + h).to(tl.int64)
            G = tl.load(G_ptr + bh * padded_length + t)
            dt = tl.load(dt_ptr + bh * padded_length + t)
            x_rows = x_ptr + b.to(tl.int64) * stride_xb + h * stride_xh + t[:, None] * stride_xl + p[None, :]
            xc = tl.load(x_rows, mask=valid[:, None] & pm[None, :], other=0.0)
            decay = tl.exp(tl.where(pair, G[:, None] - G[None, :], float("-inf")))
            y = _mm((scores * decay * dt[None, :]).to(xc.dtype), xc, PRECISION)
            inter = tl.zeros([T, BLOCK_P], dtype=tl.float32)
            state = states_ptr + ((b.to(tl.int64) * chunks + c) * heads + h) * head_dim * d_state
            for n0 in range(0, d_state, BLOCK_N):
                n = n0 + tl.arange(0, BLOCK_N)
                nm = n < d_state
                Cc = tl.load(C_row + t[:, None] * stride_Cl + n[None, :], mask=valid[:, None] & nm[None, :], other=0.0)
                ST = tl.load(state + p[None, :] * d_state + n[:, None], mask=pm[None, :] & nm[:, None], other=0.0)
                inter += _mm(Cc, ST.to(Cc.dtype), PRECISION)
            y += inter * tl.where(from_state, tl.exp(G), 0.0)[:, None]
            if HAS_D:
                y += tl.load(D_ptr + h).to(tl.float32) * xc.to(tl.float32)
            tl.store(y_ptr + b.to(tl.int64) * stride_yb + h * stride_yh + t[:, None] * stride_yl + p[None, :],
                     y.to(y_ptr.dtype.element_ty), mask=valid[:, None] & pm[None, :])

    @triton.jit
    def _ssd_dstates_bwd(dy_ptr, C_ptr, G_ptr, dfinal_ptr, dstates_ptr, dinit_ptr, seq_ptr,
                     length, heads, heads_per_group, chunks, head_dim, d_state, padded_length,
                     stride_yb, stride_yl, stride_yh, stride_Cb, stride_Cl, stride_Cg, stride_sb,
                     T: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr,
                     HAS_DFINAL: tl.constexpr, HAS_DINIT: tl.constexpr, HAS_SEQ_IDX: tl.constexpr,
                     PRECISION: tl.constexpr):
        """dstates[b, c, h] = the gradient of the state leaving chunk c, for every c (backwards)."""
        b, h, g, p, n, pn, pn_mask, bh = _state_block(heads, heads_per_group, head_dim, d_state, BLOCK_P, BLOCK_N)
        dS = _first_state(dfinal_ptr, bh * head_dim * d_state + pn, pn_mask, HAS_DFINAL, BLOCK_P, BLOCK_N)
        dy_row = dy_ptr + b.to(tl.int64) * stride_yb + h * stride_yh
        C_row = C_ptr + b.to(tl.int64) * stride_Cb + g * stride_Cg
        for k in range(chunks):
            c = chunks - 1 - k
            tl.store(dstates_ptr + ((b.to(tl.int64) * chunks + c) * heads + h) * head_dim * d_state + pn,
                     dS.to(dstates_ptr.dtype.element_ty), mask=pn_mask)
            t, valid, doc, doc_last, doc_prev = _chunk_tokens(seq_ptr, stride_sb, b, c, length, T, HAS_SEQ_IDX)
            G = tl.load(G_ptr + bh * padded_length + t)
            G_last = tl.load(G_ptr + bh * padded_length + c * T + T - 1)
            from_state = tl.where(doc == doc_prev, tl.exp(G), 0.0)
            dyT = tl.load(dy_row + t[None, :] * stride_yl + p[:, None], mask=valid[None, :] & (p[:, None] < head_dim),
                          other=0.0)
            Cc = tl.load(C_row + t[:, None] * stride_Cl + n[None, :], mask=valid[:, None] & (n[None, :] < d_state),
                         other=0.0)
            carry = tl.where(doc_last == doc_prev, tl.exp(G_last), 0.0)
            dS = dS * carry + _mm(dyT.to(Cc.dtype), (Cc * from_state[:, None]).to(Cc.dtype), PRECISION)
        if HAS_DINIT:
            tl.store(dinit_ptr + bh * head_dim * d_state + pn, dS, mask=pn_mask)

    @triton.jit
    def _ssd_dx_bwd(x_ptr, B_ptr, C_ptr, dt_ptr, G_ptr, D_ptr, dstates_ptr, dy_ptr, dx_ptr, ddt_ptr, dD_ptr, seq_ptr,
                length, heads, heads_per_group, chunks, head_dim, d_state, padded_length,
                stride_xb, stride_xl, stride_xh, stride_Bb, stride_Bl, stride_Bg,
                stride_Cb, stride_Cl, stride_Cg, stride_yb, stride_yl, stride_yh,
                stride_dxb, stride_dxl, stride_dxh, stride_sb,
                T: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr, HEADS: tl.constexpr,
                HAS_D: tl.constexpr, HAS_SEQ_IDX: tl.constexpr, PRECISION: tl.constexpr):
        """dv_j = sum_i P_ij dy_i + exp(G_last - G_j) dS_out B_j (P the decayed scores), then
        dx = dt dv + D dy, d(dt)_direct = x . dv, and dD's per-chunk partial sums."""
        b, c, pid_bc, h0, t, valid, doc, doc_last, doc_prev, B_row, C_row, scores, pair = _heads_program(
            B_ptr, C_ptr, seq_ptr, length, heads_per_group, chunks, d_state, stride_Bb, stride_Bl, stride_Bg,
            stride_Cb, stride_Cl, stride_Cg, stride_sb, T, BLOCK_N, HEADS, HAS_SEQ_IDX, PRECISION)
        to_end_doc = doc == doc_last
        p = tl.arange(0, BLOCK_P)
        pm = p < head_dim
        tp_mask = valid[:, None] & pm[None, :]
        for h in range(h0, h0 + HEADS):
            bh = (b * heads + h).to(tl.int64)
            G = tl.load(G_ptr + bh * padded_length + t)
            G_last = tl.load(G_ptr + bh * padded_length + c * T + T - 1)
            dt = tl.load(dt_ptr + bh * padded_length + t)
            dy = tl.load(dy_ptr + b.to(tl.int64) * stride_yb + h * stride_yh + t[:, None] * stride_yl + p[None, :],
                         mask=tp_mask, other=0.0)
            decay = tl.exp(tl.where(pair, G[:, None] - G[None, :], float("-inf")))
            dv = _mm(tl.trans((scores * decay).to(dy.dtype)), dy, PRECISION)
            from_state = tl.zeros([T, BLOCK_P], dtype=tl.float32)
            dstate = dstates_ptr + ((b.to(tl.int64) * chunks + c) * heads + h) * head_dim * d_state
            for n0 in range(0, d_state, BLOCK_N):
                n = n0 + tl.arange(0, BLOCK_N)
                nm = n < d_state
                Bc = tl.load(B_row + t[:, None] * stride_Bl + n[None, :], mask=valid[:, None] & nm[None, :], other=0.0)
                dST = tl.load(dstate + p[None, :] * d_state + n[:, None], mask=pm[None, :] & nm[:, None], other=0.0)
                from_state += _mm(Bc, dST.to(Bc.dtype), PRECISION)
            dv += from_state * tl.where(to_end_doc, tl.exp(G_last - G), 0.0)[:, None]
            xc = tl.load(x_ptr + b.to(tl.int64) * stride_xb + h * stride_xh + t[:, None] * stride_xl + p[None, :],
                         mask=tp_mask, other=0.0).to(tl.float32)
            dx = dv * dt[:, None]
            if HAS_D:
                dx += tl.load(D_ptr + h).to(tl.float32) * dy.to(tl.float32)
                tl.store(dD_ptr + pid_bc.to(tl.int64) * heads + h, tl.sum(dy.to(tl.float32) * xc))
            tl.store(dx_ptr + b.to(tl.int64) * stride_dxb + h * stride_dxh + t[:, None] * stride_dxl + p[None, :],
                     dx.to(dx_ptr.dtype.element_ty), mask=tp_mask)
            tl.store(ddt_ptr + bh * padded_length + t, tl.sum(dv * xc, axis=1))

    @triton.jit
    def _ssd_dbc_bwd(x_ptr, B_ptr, C_ptr, dt_ptr, G_ptr, states_ptr, dstates_ptr, dy_ptr, dB_ptr, dC_ptr, dG_ptr,
                 seq_ptr, batch, length, heads, heads_per_group, chunks, head_dim, d_state, padded_length,
                 stride_xb, stride_xl, stride_xh, stride_Bb, stride_Bl, stride_Bg,
                 stride_Cb, stride_Cl, stride_Cg, stride_yb, stride_yl, stride_yh,
                 stride_ob, stride_ol, stride_og, stride_sb,
                 T: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr, HAS_SEQ_IDX: tl.constexpr,
                 PRECISION: tl.constexpr):
        """dC_i = sum_h [sum_j W_ij B_j + exp(G_i) S_in^T dy_i], dB_j = sum_h [sum_i W_ij C_i +
        dt_j exp(G_last - G_j) dS_out^T x_j] with W_ij = (dy_i . x_j) exp(G_i - G_j) dt_j, for one
        block of state columns; dG per head and column block (summed over blocks by torch)."""
        pid_n, pid_bc, g = tl.program_id(0), tl.program_id(1), tl.program_id(2)  # sharing a chunk: together
        b, c = pid_bc // chunks, pid_bc % chunks
        t, valid, doc, doc_last, doc_prev = _chunk_tokens(seq_ptr, stride_sb, b, c, length, T, HAS_SEQ_IDX)
        n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        nm = n < d_state
        tn_mask = valid[:, None] & nm[None, :]
        B_rows = B_ptr + b.to(tl.int64) * stride_Bb + g * stride_Bg + t[:, None] * stride_Bl + n[None, :]
        C_rows = C_ptr + b.to(tl.int64) * stride_Cb + g * stride_Cg + t[:, None] * stride_Cl + n[None, :]
        Bc = tl.load(B_rows, mask=tn_mask, other=0.0)
        Cc = tl.load(C_rows, mask=tn_mask, other=0.0)
        i = tl.arange(0, T)
        pair = _pairs(doc, T)
        from_state_doc = doc == doc_prev
        to_end_doc = doc == doc_last
        carry_doc = doc_last == doc_prev
        last = i == T - 1
        p = tl.arange(0, BLOCK_P)
        pm = p < head_dim
        tp_mask = valid[:, None] & pm[None, :]
        pn_mask = pm[:, None] & nm[None, :]
        dB = tl.zeros([T, BLOCK_N], dtype=tl.float32)
        dC = tl.zeros([T, BLOCK_N], dtype=tl.float32)
        for h in range(g * heads_per_group, (g + 1) * heads_per_group):
            bh = (b * heads + h).to(tl.int64)
            G = tl.load(G_ptr + bh * padded_length + t)
            G_last = tl.load(G_ptr + bh * padded_length + c * T + T - 1)
            dt = tl.load(dt_ptr + bh * padded_length + t)
            xc = tl.load(x_ptr + b.to(tl.int64) * stride_xb + h * stride_xh + t[:, None] * stride_xl + p[None, :],
                         mask=tp_mask, other=0.0)
            dy = tl.load(dy_ptr + b.to(tl.int64) * stride_yb + h * stride_yh + t[:, None] * stride_yl + p[None, :],
                         mask=tp_mask, other=0.0).to(xc.dtype)
            chunk_state = ((b.to(tl.int64) * chunks + c) * heads + h) * head_dim * d_state + p[:, None] * d_state + n[None, :]
            S_in = tl.load(states_ptr + chunk_state, mask=pn_mask, other=0.0)
            dS_out = tl.load(dstates_ptr + chunk_state, mask=pn_mask, other=0.0)
            decay = tl.exp(tl.where(pair, G[:, None] - G[None, :], float("-inf")))
            W = (_mm(dy, tl.trans(xc), PRECISION) * decay * dt[None, :]).to(xc.dtype)
            in_scale = tl.where(from_state_doc, tl.exp(G), 0.0)
            out_scale = tl.where(to_end_doc, tl.exp(G_last - G) * dt, 0.0)
            dC_h = _mm(W, Bc, PRECISION) + _mm(dy, S_in.to(xc.dtype), PRECISION) * in_scale[:, None]
            dB_state = _mm(xc, dS_out.to(xc.dtype), PRECISION) * out_scale[:, None]
            dB_h = _mm(tl.trans(W), Cc, PRECISION) + dB_state
            dG = tl.sum(Cc.to(tl.float32) * dC_h, axis=1) - tl.sum(Bc.to(tl.float32) * dB_h, axis=1)
            # The state leaving the chunk grows with exp(G_last) (carried part) and exp(G_last - G_j).
            carried = tl.where(carry_doc, tl.exp(G_last), 0.0) * tl.sum(S_in.to(tl.float32) * dS_out.to(tl.float32))
            dG += tl.where(last, carried + tl.sum(Bc.to(tl.float32) * dB_state), 0.0)
            tl.store(dG_ptr + ((pid_n * batch + b) * heads + h).to(tl.int64) * padded_length + t, dG)
            dB += dB_h
            dC += dC_h
        out = b.to(tl.int64) * stride_ob + g * stride_og + t[:, None] * stride_ol + n[None, :]
        tl.store(dB_ptr + out, dB.to(dB_ptr.dtype.element_ty), mask=tn_mask)
        tl.store(dC_ptr + out, dC.to(dC_ptr.dtype.element_ty), mask=tn_mask)


def _blocks(head_dim: int, d_state: int, heads_per_group: int, tile: dict) -> dict:
    def pow2(v):
        return max(16, triton.next_power_of_2(v))

    heads = max(k for k in range(1, tile["heads"] + 1) if heads_per_group % k == 0)
    return dict(full_p=pow2(head_dim), block_p=min(64, pow2(head_dim)), block_n=min(tile["block_n"], pow2(d_state)),
                state_n=min(tile.get("state_n", tile["block_n"]), pow2(d_state)), heads=heads)


def _last_dim_contiguous(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


class _Scan:
    """The shapes, blocks and launch grids of one call, shared by forward and backward."""

    def __init__(self, x, B, seq_idx, tile):
        self.batch, self.length, self.heads, self.head_dim = x.shape
        self.groups, self.d_state = B.shape[2], B.shape[3]
        self.heads_per_group = self.heads // self.groups
        self.T = tile["chunk"]
        self.chunks = triton.cdiv(self.length, self.T)
        self.padded = self.chunks * self.T
        self.blocks = _blocks(self.head_dim, self.d_state, self.heads_per_group, tile)
        self.launch = dict(num_warps=tile["warps"], num_stages=tile["stages"])
        self.seq_idx = seq_idx
        self.precision = "tf32x3" if x.dtype == torch.float32 else None
        self.dims = (self.length, self.heads, self.heads_per_group, self.chunks, self.head_dim, self.d_state,
                     self.padded)

    def seq(self):
        return (self.seq_idx, self.seq_idx.stride(0)) if self.seq_idx is not None else (None, 0)

    def discretize(self, dt_raw, dt_bias, A, dt_limit):
        dt = torch.empty(self.batch, self.heads, self.padded, device=dt_raw.device, dtype=torch.float32)
        G = torch.empty_like(dt)
        lo, hi = dt_limit
        has_limit = (lo, hi) != (0.0, float("inf"))
        _ssd_dt_cumsum[(self.batch * self.heads, self.chunks)](
            dt_raw, dt_bias, A, dt, G, self.length, self.heads, self.padded, *dt_raw.stride(),
            float(lo), float(min(hi, 3.0e38)), T=self.T, HAS_LIMIT=has_limit)
        return dt, G

    def states(self, x, B, dt, G, initial_state, return_final):
        b = self.blocks
        states = torch.empty(self.batch, self.chunks, self.heads, self.head_dim, self.d_state, device=x.device,
                             dtype=x.dtype)
        final = torch.empty(self.batch, self.heads, self.head_dim, self.d_state, device=x.device,
                            dtype=torch.float32) if return_final else None
        seq, stride_sb = self.seq()
        grid = (self.batch * self.heads, triton.cdiv(self.head_dim, b["block_p"]), triton.cdiv(self.d_state, b["state_n"]))
        _ssd_states_fwd[grid](
            x, B, dt, G, initial_state, states, final, seq, *self.dims,
            x.stride(0), x.stride(1), x.stride(2), B.stride(0), B.stride(1), B.stride(2), stride_sb,
            T=self.T, BLOCK_P=b["block_p"], BLOCK_N=b["state_n"], HAS_INIT=initial_state is not None,
            HAS_FINAL=return_final, HAS_SEQ_IDX=seq is not None, PRECISION=self.precision, **self.launch)
        return states, final


class _SSDScan(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, dt_raw, A, B, C, D, dt_bias, dt_limit, initial_state, seq_idx, return_final_state, tile):
        x, B, C = (_last_dim_contiguous(t) for t in (x, B, C))
        scan = _Scan(x, B, seq_idx, tile)
        dt, G = scan.discretize(dt_raw, dt_bias, A, dt_limit)
        states, final = scan.states(x, B, dt, G, initial_state, return_final_state)
        y = torch.empty(x.shape, device=x.device, dtype=x.dtype)
        b = scan.blocks
        seq, stride_sb = scan.seq()
        _ssd_output_fwd[(scan.heads // b["heads"], scan.batch * scan.chunks)](
            x, B, C, dt, G, D, states, y, seq, *scan.dims,
            x.stride(0), x.stride(1), x.stride(2), B.stride(0), B.stride(1), B.stride(2),
            C.stride(0), C.stride(1), C.stride(2), y.stride(0), y.stride(1), y.stride(2), stride_sb,
            T=scan.T, BLOCK_P=b["full_p"], BLOCK_N=b["block_n"], HEADS=b["heads"], HAS_D=D is not None,
            HAS_SEQ_IDX=seq is not None, PRECISION=scan.precision, **scan.launch)
        ctx.save_for_backward(x, dt_raw, A, B, C, D, dt_bias, initial_state)
        ctx.scan, ctx.dt_limit = scan, dt_limit
        ctx.kept = (dt, G, states) if tile.get("keep_states") else None
        if return_final_state:
            return y, final
        return y

    @staticmethod
    def backward(ctx, dy, dfinal=None):
        x, dt_raw, A, B, C, D, dt_bias, initial_state = ctx.saved_tensors
        scan = ctx.scan
        b = scan.blocks
        dy = _last_dim_contiguous(dy)
        if ctx.kept is not None:
            dt, G, states = ctx.kept
        else:
            dt, G = scan.discretize(dt_raw, dt_bias, A, ctx.dt_limit)
            states, _ = scan.states(x, B, dt, G, initial_state, False)
        seq, stride_sb = scan.seq()
        dev = x.device

        dstates = torch.empty_like(states)
        dinit = torch.empty(initial_state.shape, device=dev, dtype=torch.float32) if (
            initial_state is not None and ctx.needs_input_grad[8]) else None
        grid = (scan.batch * scan.heads, triton.cdiv(scan.head_dim, b["block_p"]), triton.cdiv(scan.d_state, b["state_n"]))
        _ssd_dstates_bwd[grid](
            dy, C, G, dfinal, dstates, dinit, seq, *scan.dims,
            dy.stride(0), dy.stride(1), dy.stride(2), C.stride(0), C.stride(1), C.stride(2), stride_sb,
            T=scan.T, BLOCK_P=b["block_p"], BLOCK_N=b["state_n"], HAS_DFINAL=dfinal is not None,
            HAS_DINIT=dinit is not None, HAS_SEQ_IDX=seq is not None, PRECISION=scan.precision, **scan.launch)

        dx = torch.empty(x.shape, device=dev, dtype=x.dtype)
        ddt = torch.empty(scan.batch, scan.heads, scan.padded, device=dev, dtype=torch.float32)
        dD = torch.empty(scan.batch * scan.chunks, scan.heads, device=dev, dtype=torch.float32)
        _ssd_dx_bwd[(scan.heads // b["heads"], scan.batch * scan.chunks)](
            x, B, C, dt, G, D, dstates, dy, dx, ddt, dD, seq, *scan.dims,
            x.stride(0), x.stride(1), x.stride(2), B.stride(0), B.stride(1), B.stride(2),
            C.stride(0), C.stride(1), C.stride(2), dy.stride(0), dy.stride(1), dy.stride(2),
            dx.stride(0), dx.stride(1), dx.stride(2), stride_sb,
            T=scan.T, BLOCK_P=b["full_p"], BLOCK_N=b["block_n"], HEADS=b["heads"], HAS_D=D is not None,
            HAS_SEQ_IDX=seq is not None, PRECISION=scan.precision, **scan.launch)

        n_blocks = triton.cdiv(scan.d_state, b["block_n"])
        dB = torch.empty(scan.batch, scan.length, scan.groups, scan.d_state, device=dev, dtype=B.dtype)
        dC = torch.empty_like(dB)
        dG = torch.empty(n_blocks, scan.batch, scan.heads, scan.padded, device=dev, dtype=torch.float32)
        _ssd_dbc_bwd[(n_blocks, scan.batch * scan.chunks, scan.groups)](
            x, B, C, dt, G, states, dstates, dy, dB, dC, dG, seq, scan.batch, *scan.dims,
            x.stride(0), x.stride(1), x.stride(2), B.stride(0), B.stride(1), B.stride(2),
            C.stride(0), C.stride(1), C.stride(2), dy.stride(0), dy.stride(1), dy.stride(2),
            dB.stride(0), dB.stride(1), dB.stride(2), stride_sb,
            T=scan.T, BLOCK_P=b["full_p"], BLOCK_N=b["block_n"], HAS_SEQ_IDX=seq is not None,
            PRECISION=scan.precision, **scan.launch)

        ddt_raw = torch.empty(dt_raw.shape, device=dev, dtype=dt_raw.dtype)
        dA = torch.empty(scan.batch, scan.heads, scan.chunks, device=dev, dtype=torch.float32)
        ddt_bias = torch.empty_like(dA)
        lo, hi = ctx.dt_limit
        _ssd_dt_bwd[(scan.batch * scan.heads, scan.chunks)](
            dG, ddt, dt, dt_raw, dt_bias, A, ddt_raw, dA, ddt_bias, scan.batch, scan.length, scan.heads,
            scan.chunks, scan.padded, n_blocks, *dt_raw.stride(), *ddt_raw.stride(), float(lo), float(min(hi, 3.0e38)),
            T=scan.T, HAS_LIMIT=(lo, hi) != (0.0, float("inf")))
        dA, ddt_bias = dA.sum((0, 2)), ddt_bias.sum((0, 2))
        dD = dD.sum(0).to(D.dtype) if D is not None else None
        return (dx, ddt_raw, dA.to(A.dtype), dB, dC, dD, ddt_bias.to(dt_bias.dtype), None, dinit, None, None, None)


def ssd_scan_triton(x, dt, A, B, C, *, D, dt_bias, dt_limit=(0.0, float("inf")), initial_state=None,
                    return_final_state=False, seq_idx=None, tile=None):
    """The SSD scan of x [b, l, h, p] with raw dt [b, l, h], A [h], B, C [b, l, g, n], D [h]:
    y [b, l, h, p] (and the float32 final state [b, h, p, n] if asked). See the module docstring."""
    if seq_idx is not None:
        if initial_state is not None:
            raise ValueError("ssd_scan over packed documents takes no initial state")
        seq_idx = seq_idx.to(torch.int32).contiguous()
    if initial_state is not None:
        initial_state = initial_state.contiguous()
    return _SSDScan.apply(x, dt, A, B, C, D, dt_bias, tuple(float(v) for v in dt_limit), initial_state, seq_idx,
                          return_final_state, dict(TILE, **(tile or {})))
