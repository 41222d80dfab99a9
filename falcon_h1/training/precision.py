"""MegatronMixedPrecision: bf16 the Megatron way, as a Lightning precision plugin.

Megatron keeps bf16 model weights (Float16Module), fp32 main weights in the optimizer and fp32
gradient reduction; Lightning must not autocast on top of that. This plugin only records the
choice; MegatronStrategy applies it to the model config, DDP and the optimizer.
"""

from __future__ import annotations

import torch
from pytorch_lightning.plugins.precision import Precision

_DTYPES = {"bf16-mixed": torch.bfloat16, "32": torch.float32, "32-true": torch.float32}


class MegatronMixedPrecision(Precision):
    """precision: "bf16-mixed" (bf16 weights and activations, fp32 main weights and gradient
    reduction) or "32" (float32 throughout: debugging, CPU, exactness tests)."""

    def __init__(self, precision: str = "bf16-mixed", grad_reduce_in_fp32: bool = True):
        if precision not in _DTYPES:
            raise ValueError(f"MegatronMixedPrecision(precision={precision!r}): choose one of {sorted(_DTYPES)}")
        self.precision = precision
        self.grad_reduce_in_fp32 = grad_reduce_in_fp32

    @property
    def params_dtype(self) -> torch.dtype:
        return _DTYPES[self.precision]

    def config_overrides(self) -> dict:
        bf16 = self.params_dtype == torch.bfloat16
        return dict(bf16=bf16, fp16=False, params_dtype=self.params_dtype, pipeline_dtype=self.params_dtype,
                    autocast_dtype=self.params_dtype)
