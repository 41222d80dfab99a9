"""SwiGLU MLP with Falcon-H1's µP multipliers: down(up(x) * silu(gate(x) * gate_mult)) * down_mult.

Both multipliers scale fc1's weight rows: gate_mult its gate rows, down_mult its up rows (the MLP
is linear in up), so they cost no pass over the activations.
"""

from __future__ import annotations

import torch
from megatron.core.transformer.mlp import MLP, apply_swiglu_sharded_factory
from megatron.core.transformer.utils import ensure_metadata_has_dp_cp_group

from falcon_h1.kernels.swiglu import swiglu
from falcon_h1.model.lora import AdapterDict, add_adapter
from falcon_h1.model.scaled_linear import row_scaled_linear
from falcon_h1.model.utils import buffer_for_autograd


class FalconH1MLP(MLP):
    """Megatron's MLP (fused [gate | up] column-parallel fc1, row-parallel fc2, TP-reshardable
    checkpoints) with the gate and down multipliers on fc1's rows and a fused SwiGLU."""

    def __init__(self, config, submodules, is_expert=False, input_size=None, ffn_hidden_size=None,
                 tp_group=None, name=None):
        super().__init__(config, submodules, is_expert=is_expert, input_size=input_size,
                         ffn_hidden_size=ffn_hidden_size or config.ffn_hidden_size, tp_group=tp_group,
                         name=name)
        self.gate_multiplier, self.down_multiplier = config.mlp_multipliers
        scale = None
        if config.mlp_multipliers != (1.0, 1.0):
            rows = self.linear_fc1.weight.shape[0] // 2  # this rank's [gate | up] rows
            scale = torch.tensor([self.gate_multiplier] * rows + [self.down_multiplier] * rows)
            scale = scale.to(self.linear_fc1.weight.device)
        self.register_buffer("fc1_row_scale", scale, persistent=False)
        self.adapters = AdapterDict()  # LoRA on linear_fc1 / linear_fc2 (lora.py)

    def forward(self, hidden_states, per_token_scale=None, **kwargs):
        scale = buffer_for_autograd(self.fc1_row_scale, self.config)
        fc1, fc1_bias = row_scaled_linear(self.linear_fc1, hidden_states, scale)
        for extra in (self.adapters["linear_fc1"](hidden_states) if "linear_fc1" in self.adapters else None,
                      fc1_bias):
            if extra is not None:
                fc1 = fc1 + (extra if scale is None else extra * scale).to(fc1.dtype)
        hidden = swiglu(fc1)  # = silu(gate * gate_mult) * up * down_mult
        out, out_bias = self.linear_fc2(hidden)
        out = add_adapter(self, "linear_fc2", hidden, out)
        if out_bias is not None:
            out_bias = out_bias * self.down_multiplier
        return out, out_bias

    def sharded_state_dict(self, prefix="", sharded_offsets=(), metadata=None):
        sharded = super().sharded_state_dict(prefix, sharded_offsets, metadata)
        key = f"{prefix}adapters.linear_fc1.lora_b"
        if key in sharded:  # its rows are [gate | up] of this rank, like linear_fc1's weight
            metadata = ensure_metadata_has_dp_cp_group(metadata)
            sharded[key] = apply_swiglu_sharded_factory(
                sharded[key], sharded_offsets, tp_group=self.tp_group, dp_group=metadata["dp_cp_group"])
        return sharded
