"""Causal depthwise conv1d followed by SiLU, over the [x | B | C] channels of the Mamba stream."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def causal_conv1d_torch(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, activation: str | None = "silu"
) -> torch.Tensor:
    """x: [b, d, l] channels first; weight: [d, 1, k]; bias: [d] or None. Output: [b, d, l].

    Output t sees inputs t-k+1 .. t (left zero padding), i.e. nothing from the future.
    """
    length, width = x.shape[-1], weight.shape[-1]
    out = F.conv1d(x, weight.to(x.dtype), None if bias is None else bias.to(x.dtype),
                   padding=width - 1, groups=x.shape[1])[..., :length]
    if activation == "silu":
        out = F.silu(out)
    elif activation is not None:
        raise ValueError(f"unsupported conv activation {activation!r}; Falcon-H1 uses 'silu'")
    return out


def causal_conv1d_cuda(x, weight, bias, activation="silu", seq_idx=None):
    """The causal-conv1d package's CUDA kernel (forward and backward); seq_idx [b, l] restarts the
    convolution at each packed document (the kernel takes it in its channels-last layout only)."""
    from causal_conv1d import causal_conv1d_fn

    if seq_idx is not None:
        if x.stride(1) != 1 or x.stride(0) % 8 or x.stride(2) % 8:
            x = x.transpose(1, 2).contiguous().transpose(1, 2)
        return causal_conv1d_fn(x, weight.squeeze(1), bias, seq_idx=seq_idx.int(), activation=activation)
    if x.stride(1) == 1 and (x.stride(0) % 8 or x.stride(2) % 8):
        x = x.contiguous()  # its channels-last path needs 8-aligned batch and time strides
    return causal_conv1d_fn(x, weight.squeeze(1), bias, activation=activation)
