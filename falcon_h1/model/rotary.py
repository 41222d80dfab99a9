"""Rotary position embedding (RoPE, rotate-half form) with Falcon-H1's large base (1e11).

Frequencies are computed in float32 and kept out of the module's buffers so that casting the
model to bf16 cannot round them. The output is in Megatron's layout [s, 1, 1, head_dim], consumed
by falcon_h1.kernels.rotary.

Under context parallelism the angles still cover the whole sequence: the mixer applies RoPE after
trading sequence chunks for heads, when each rank holds every position (context_parallel.py).
Megatron's own selection (get_pos_emb_on_this_cp_rank) would be wrong here: it assumes the
load-balanced zig-zag split of ring attention, not contiguous chunks.
"""

from __future__ import annotations

import torch


class RotaryEmbedding(torch.nn.Module):
    def __init__(self, head_dim: int, base: float):
        super().__init__()
        self.inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))

    def forward(self, seq_len: int, device: torch.device, offset: int = 0) -> torch.Tensor:
        """Angles for positions offset .. offset + seq_len - 1."""
        positions = torch.arange(offset, offset + seq_len, device=device, dtype=torch.float32)
        freqs = torch.outer(positions, self.inv_freq.to(device))
        return torch.cat((freqs, freqs), dim=-1)[:, None, None, :]
