"""RMSNorm as Falcon-H1 computes it: normalize in float32, cast back, then scale by the weight."""

from __future__ import annotations

import torch

from falcon_h1.kernels.rms_norm import rms_norm
from falcon_h1.model.utils import param_device


class RMSNorm(torch.nn.Module):
    """Megatron's norm interface (config, hidden_size, eps); sequence-parallel aware: under SP each
    rank sees part of the sequence, so the weight is marked for Megatron's TP gradient all-reduce.
    On CUDA one Triton kernel each way (kernels/rms_norm.py), unless kernel_backend="torch"."""

    def __init__(self, config, hidden_size: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.backend = config.kernel_backend
        self.weight = torch.nn.Parameter(
            torch.ones(hidden_size, dtype=config.params_dtype, device=param_device(config))
        )
        setattr(self.weight, "sequence_parallel", config.sequence_parallel)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps, self.backend)
