"""The Mamba-2 SSD scan: a chunked pure-torch implementation and mamba_ssm's Triton kernel.

The recurrence, per head h with state S of shape [head_dim, d_state]:

    dt_t  = clamp(softplus(dt_raw_t + dt_bias), *dt_limit)
    S_t   = exp(dt_t * A) * S_{t-1} + dt_t * x_t B_t^T
    y_t   = S_t C_t + D * x_t

The chunked form splits the sequence into chunks of `chunk_size`: inside a chunk the output is
an attention-like masked product (C_i . B_j weighted by the decay between j and i); across chunks
only the states at chunk boundaries are carried, so the sequential part is `L / chunk_size` long.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def discretize_dt(dt: torch.Tensor, dt_bias: torch.Tensor, dt_limit: tuple[float, float]) -> torch.Tensor:
    """softplus(dt + dt_bias), clamped to dt_limit, in float32."""
    dt = F.softplus(dt.float() + dt_bias.float())
    if tuple(dt_limit) != (0.0, math.inf):
        dt = dt.clamp(min=dt_limit[0], max=dt_limit[1])
    return dt


def _segment_sums(a: torch.Tensor) -> torch.Tensor:
    """seg[..., i, j] = sum(a[..., j+1 : i+1]) for i >= j, and -inf above the diagonal.

    Built from masked cumulative sums of `a` itself rather than differences of one long
    cumulative sum, so no precision is lost to cancellation.
    """
    t = a.shape[-1]
    keep_after_j = torch.ones(t, t, dtype=torch.bool, device=a.device).triu(diagonal=1)  # [j, k]: k > j
    a_jk = a[..., None, :].expand(*a.shape[:-1], t, t).masked_fill(~keep_after_j, 0.0)
    seg = a_jk.cumsum(dim=-1).transpose(-1, -2)  # [i, j] = sum_{j < k <= i} a[k]
    return seg.masked_fill(keep_after_j, -math.inf)  # i < j: no path from j to i


def ssd_scan_torch(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    chunk_size: int,
    D: torch.Tensor | None = None,
    initial_state: torch.Tensor | None = None,
    return_final_state: bool = False,
):
    """Chunked SSD scan in float32 (float64 for float64 inputs).

    Args:
        x: [b, l, h, p] inputs.
        dt: [b, l, h] discretized time steps (already softplus'ed and clamped).
        A: [h] negative decay rates.
        B, C: [b, l, g, n] input and output projections of the state, g groups shared by h/g heads.
        chunk_size: chunk length of the chunked algorithm.
        D: [h] skip connection, or None.
        initial_state: [b, h, p, n] state before the first token, or None for zeros.
        return_final_state: also return the state after the last token.

    Returns:
        y [b, l, h, p] in x's dtype, and the final state [b, h, p, n] (compute dtype) if asked.
    """
    out_dtype = x.dtype
    compute = torch.float64 if x.dtype == torch.float64 else torch.float32
    b, l, h, p = x.shape
    g, n = B.shape[2], B.shape[3]
    heads_per_group = h // g
    x_in = x
    x, dt, B, C = (t.to(compute) for t in (x, dt, B, C))

    pad = (-l) % chunk_size
    if pad:
        # dt = 0 on padding: no decay and no input, so the final state is unaffected.
        x, B, C = (F.pad(t, (0, 0, 0, 0, 0, pad)) for t in (x, B, C))
        dt = F.pad(dt, (0, 0, 0, pad))
    nc = (l + pad) // chunk_size
    x = x.view(b, nc, chunk_size, h, p)
    dt = dt.view(b, nc, chunk_size, h)
    B = B.view(b, nc, chunk_size, g, n).repeat_interleave(heads_per_group, dim=3)
    C = C.view(b, nc, chunk_size, g, n).repeat_interleave(heads_per_group, dim=3)

    dA = (dt * A.to(compute)).permute(0, 1, 3, 2)  # [b, c, h, t]
    seg = _segment_sums(dA)  # [b, c, h, i, j]: log decay from j to i
    dA_cum = dA.cumsum(dim=-1)  # [b, c, h, t]: log decay from the chunk start to t

    # 1. Within each chunk: y_i = sum_{j<=i} (C_i . B_j) exp(seg_ij) dt_j x_j
    scores = torch.einsum("bcihn,bcjhn->bchij", C, B) * seg.exp()
    y = torch.einsum("bchij,bcjh,bcjhp->bcihp", scores, dt, x)

    # 2. State contributed by each chunk at its end.
    decay_to_end = seg[..., -1, :].exp()  # [b, c, h, j]
    chunk_states = torch.einsum("bchj,bcjh,bcjhn,bcjhp->bchpn", decay_to_end, dt, B, x)

    # 3. Carry states across chunk boundaries (sequential over chunks).
    chunk_decay = dA_cum[..., -1].exp()  # [b, c, h]
    state = x.new_zeros(b, h, p, n) if initial_state is None else initial_state.to(compute)
    states_before = []
    for c in range(nc):
        states_before.append(state)
        state = state * chunk_decay[:, c, :, None, None] + chunk_states[:, c]
    states_before = torch.stack(states_before, dim=1)  # [b, c, h, p, n]

    # 4. Contribution of the carried-in state to every position of the chunk.
    y = y + torch.einsum("bcihn,bchpn,bchi->bcihp", C, states_before, dA_cum.exp())

    y = y.reshape(b, nc * chunk_size, h, p)[:, :l]
    if D is not None:
        y = y + x_in.to(compute) * D.to(compute)[:, None]
    y = y.to(out_dtype)
    return (y, state) if return_final_state else y


def ssd_scan_sequential(x, dt, A, B, C, D=None, initial_state=None):
    """Token-by-token recurrence, the definition of the scan. Slow; a test oracle only."""
    b, l, h, p = x.shape
    heads_per_group = h // B.shape[2]
    B = B.repeat_interleave(heads_per_group, dim=2)
    C = C.repeat_interleave(heads_per_group, dim=2)
    state = x.new_zeros(b, h, p, B.shape[-1]) if initial_state is None else initial_state.clone()
    ys = []
    for t in range(l):
        decay = torch.exp(dt[:, t] * A)[:, :, None, None]
        state = decay * state + (dt[:, t, :, None, None] * x[:, t, :, :, None]) * B[:, t, :, None, :]
        y = torch.einsum("bhpn,bhn->bhp", state, C[:, t])
        if D is not None:
            y = y + D[:, None] * x[:, t]
        ys.append(y)
    return torch.stack(ys, dim=1), state
