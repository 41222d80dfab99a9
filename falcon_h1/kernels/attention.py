"""Causal attention core: torch scaled_dot_product_attention (flash / cuDNN / memory-efficient
backends on GPU), with the interface of Megatron's DotProductAttention so a layer spec can swap
it for Transformer Engine's TEDotProductAttention.

It never materialises the [s, s] score matrix in training on GPU; on CPU torch picks its math
backend, which does (CPU runs are for debugging and tests).
"""

from __future__ import annotations

from contextlib import nullcontext

import torch.nn.functional as F
from megatron.core import tensor_parallel
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule


class SDPAttention(MegatronModule):
    def __init__(self, config, layer_number: int, attn_mask_type=AttnMaskType.causal,
                 attention_type: str = "self", attention_dropout: float | None = None,
                 softmax_scale: float | None = None, k_channels=None, v_channels=None,
                 cp_comm_type=None, pg_collection=None):
        super().__init__(config=config)
        if attn_mask_type != AttnMaskType.causal or attention_type != "self":
            raise ValueError("SDPAttention implements causal self-attention only")
        self.dropout = config.attention_dropout if attention_dropout is None else attention_dropout
        self.softmax_scale = softmax_scale

    def forward(self, query, key, value, attention_mask=None, attn_mask_type=None,
                attention_bias=None, packed_seq_params=None):
        """query [s, b, heads, d], key/value [s, b, kv_heads, d] -> [s, b, heads * d]."""
        if packed_seq_params is not None:
            raise NotImplementedError("packed sequences need the Transformer Engine attention spec")
        s, b, heads, d = query.shape
        # [b, h, s, d], contiguous: q/k/v arrive as strided views of the fused in-projection (or of
        # the context-parallel exchange), and SDPA's CUDA backends have had silent errors on
        # non-contiguous inputs (pytorch/pytorch#112577); the copies are small next to attention.
        q, k, v = (t.permute(1, 2, 0, 3).contiguous() for t in (query, key, value))
        dropout = self.dropout if self.training else 0.0
        rng = tensor_parallel.get_cuda_rng_tracker().fork() if dropout > 0 else nullcontext()
        with rng:
            out = F.scaled_dot_product_attention(
                q, k, v, is_causal=True, dropout_p=dropout, scale=self.softmax_scale,
                enable_gqa=k.shape[1] != heads,
            )
        return out.permute(2, 0, 1, 3).reshape(s, b, heads * d)

