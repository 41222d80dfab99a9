"""SwiGLU MLP with Falcon-H1's µP multipliers: down(up(x) * silu(gate(x) * gate_mult)) * down_mult."""

from __future__ import annotations

import torch.nn.functional as F
from megatron.core.transformer.mlp import MLP, apply_swiglu_sharded_factory
from megatron.core.transformer.utils import ensure_metadata_has_dp_cp_group

from falcon_h1.model.lora import AdapterDict, add_adapter


class FalconH1MLP(MLP):
    """Megatron's MLP (fused [gate | up] column-parallel fc1, row-parallel fc2, TP-reshardable
    checkpoints) with the gate and down multipliers applied in forward."""

    def __init__(self, config, submodules, is_expert=False, input_size=None, ffn_hidden_size=None,
                 tp_group=None, name=None):
        super().__init__(config, submodules, is_expert=is_expert, input_size=input_size,
                         ffn_hidden_size=ffn_hidden_size or config.ffn_hidden_size, tp_group=tp_group,
                         name=name)
        self.gate_multiplier, self.down_multiplier = config.mlp_multipliers
        self.adapters = AdapterDict()  # LoRA on linear_fc1 / linear_fc2 (lora.py)

    def forward(self, hidden_states, per_token_scale=None, **kwargs):
        fc1, fc1_bias = self.linear_fc1(hidden_states)
        fc1 = add_adapter(self, "linear_fc1", hidden_states, fc1)
        if fc1_bias is not None:
            fc1 = fc1 + fc1_bias
        gate, up = fc1.chunk(2, dim=-1)
        hidden = F.silu(gate * self.gate_multiplier) * up
        out, out_bias = self.linear_fc2(hidden)
        out = add_adapter(self, "linear_fc2", hidden, out)
        out = out * self.down_multiplier
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
