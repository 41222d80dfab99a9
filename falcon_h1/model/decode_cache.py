"""The hybrid cache of generation: per layer, the attention keys/values and the Mamba conv and SSM
states of each sequence of a batch, and the recurrent steps that use them.

Sequences of different lengths share one cache without padding their computation: a prompt is
prefilled on its own (batch row `rows`), which leaves exactly its own states; decoding then steps
every sequence at its own position (`lengths`), attending only to its own cached keys. The cache
is what HybridMixer receives as `inference_context`.
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from falcon_h1.kernels.ssd import discretize_dt


@dataclass
class LayerCache:
    key: torch.Tensor | None = None  # [batch, kv_heads, max_length, head_dim]
    value: torch.Tensor | None = None
    conv_state: torch.Tensor | None = None  # [batch, channels, kernel - 1]: the last pre-conv inputs
    ssm_state: torch.Tensor | None = None  # [batch, heads, head_dim, state] in float32


class HybridCache:
    """States of `batch_size` sequences of up to `max_length` tokens, filled layer by layer."""

    def __init__(self, batch_size: int, max_length: int, device: torch.device | str = "cpu"):
        self.batch_size, self.max_length = batch_size, max_length
        self.lengths = torch.zeros(batch_size, dtype=torch.long, device=device)  # tokens cached per row
        self.layers: dict[int, LayerCache] = {}
        self.rows = slice(None)
        self.prefilling = False

    # --- what the generation loop sets before each forward, and updates after it
    def start_prefill(self, row: int) -> None:
        """The next forward is one prompt, alone, for batch row `row`."""
        self.rows, self.prefilling = slice(row, row + 1), True

    def start_decode(self) -> None:
        """The next forward is one new token for every row."""
        self.rows, self.prefilling = slice(None), False

    def advance(self, tokens: int) -> None:
        self.lengths[self.rows] += tokens
        if int(self.lengths.max()) > self.max_length:
            raise RuntimeError(f"HybridCache of max_length={self.max_length} is full")

    def positions(self, seq_len: int) -> torch.Tensor:
        """[seq_len, rows] positions of the tokens of the current forward."""
        start = self.lengths[self.rows]
        return start[None, :] + torch.arange(seq_len, device=start.device)[:, None]

    def layer(self, number: int) -> LayerCache:
        return self.layers.setdefault(number, LayerCache())

    # --- Megatron's blocks ask an inference context these (for CUDA graphs, which are off here)
    def is_static_batching(self) -> bool:
        return True

    def is_decode_only(self) -> bool:
        return not self.prefilling


def store_keys_values(cache: HybridCache, layer: LayerCache, key: torch.Tensor, value: torch.Tensor) -> None:
    """Write this forward's keys and values [s, rows, kv_heads, d] at their positions."""
    s, b, kv_heads, d = key.shape
    if layer.key is None:
        layer.key = key.new_zeros(cache.batch_size, kv_heads, cache.max_length, d)
        layer.value = value.new_zeros(cache.batch_size, kv_heads, cache.max_length, d)
    rows = torch.arange(cache.batch_size, device=key.device)[cache.rows]
    positions = cache.positions(s)  # [s, b]
    layer.key[rows[None, :], :, positions] = key
    layer.value[rows[None, :], :, positions] = value


def attend_to_cache(cache: HybridCache, layer: LayerCache, query: torch.Tensor, scale: float) -> torch.Tensor:
    """Attention of this forward's queries [s, rows, heads, d] to every cached key of their row up
    to their own position -> [s, rows, heads, d]."""
    s = query.shape[0]
    keys, values = layer.key[cache.rows], layer.value[cache.rows]  # [b, kv, max_length, d]
    positions = cache.positions(s).T  # [b, s]
    visible = torch.arange(cache.max_length, device=query.device)[None, None, :] <= positions[:, :, None]
    out = F.scaled_dot_product_attention(
        query.permute(1, 2, 0, 3), keys.to(query.dtype), values.to(query.dtype), attn_mask=visible[:, None],
        scale=scale, enable_gqa=keys.shape[1] != query.shape[2])
    return out.permute(2, 0, 1, 3)


def conv_step(layer: LayerCache, xBC: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """One token through the causal depthwise conv + SiLU: xBC [b, channels] -> [b, channels],
    shifting it into the conv state."""
    window = torch.cat([layer.conv_state, xBC[:, :, None].to(layer.conv_state.dtype)], dim=-1)  # [b, ch, k]
    layer.conv_state = window[..., 1:]
    out = (window * weight[:, 0, :].to(window.dtype)).sum(-1)
    if bias is not None:
        out = out + bias.to(out.dtype)
    return F.silu(out)


def ssm_step(layer: LayerCache, x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor,
             C: torch.Tensor, D: torch.Tensor, dt_bias: torch.Tensor, dt_limit) -> torch.Tensor:
    """One token of the SSM recurrence: x [b, h, p], raw dt [b, h], B, C [b, g, n] ->
    y [b, h, p]; state <- exp(dt A) state + dt x B^T, y = C . state + D x."""
    heads, groups = x.shape[1], B.shape[1]
    dt = discretize_dt(dt, dt_bias, dt_limit)  # [b, h] float32
    B, C = (t.float().repeat_interleave(heads // groups, dim=1) for t in (B, C))  # [b, h, n]
    decay = torch.exp(dt * A.float())[..., None, None]
    layer.ssm_state = layer.ssm_state * decay + (dt[..., None] * x.float())[..., None] * B[:, :, None, :]
    y = (layer.ssm_state * C[:, :, None, :]).sum(-1) + D.float()[:, None] * x.float()
    return y.to(x.dtype)
