"""RMSNorm as Falcon-H1 computes it: normalize in float32, cast back, then scale by the weight."""

from __future__ import annotations

import torch

from falcon_h1.model.utils import param_device


class RMSNorm(torch.nn.Module):
    """Megatron's norm interface (config, hidden_size, eps); sequence-parallel aware: under SP each
    rank sees part of the sequence, so the weight is marked for Megatron's TP gradient all-reduce."""

    def __init__(self, config, hidden_size: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = torch.nn.Parameter(
            torch.ones(hidden_size, dtype=config.params_dtype, device=param_device(config))
        )
        setattr(self.weight, "sequence_parallel", config.sequence_parallel)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(dim=-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)
