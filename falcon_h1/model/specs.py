"""Layer specs: which module implements each part of a Falcon-H1 layer.

A layer is Megatron's TransformerLayer with the HybridMixer as its `self_attention`:
    x = x + HybridMixer(input_layernorm(x));  x = x + MLP(pre_mlp_layernorm(x))
The local spec runs anywhere (torch SDPA attention, pure-torch/Triton kernels); the Transformer
Engine spec swaps in TE's linears, norm and attention where TE is installed (not yet verified: no
machine here has TE).
"""

from __future__ import annotations

from functools import partial

from megatron.core.fusions.fused_bias_dropout import get_bias_dropout_add
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
from megatron.core.transformer.mlp import MLPSubmodules
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_layer import TransformerLayer, TransformerLayerSubmodules

from falcon_h1.kernels.attention import SDPAttention
from falcon_h1.model.mixer import HybridMixer, HybridMixerSubmodules
from falcon_h1.model.mlp import FalconH1MLP
from falcon_h1.model.norm import RMSNorm


def _layer_spec(norm, column_linear, row_linear, core_attention) -> ModuleSpec:
    return ModuleSpec(
        module=TransformerLayer,
        submodules=TransformerLayerSubmodules(
            input_layernorm=norm,
            self_attention=ModuleSpec(
                module=HybridMixer,
                submodules=HybridMixerSubmodules(
                    in_proj=column_linear, core_attention=core_attention, out_proj=row_linear),
            ),
            self_attn_bda=get_bias_dropout_add,
            pre_mlp_layernorm=norm,
            mlp=partial(FalconH1MLP.as_mlp_submodule,
                        submodules=MLPSubmodules(linear_fc1=column_linear, linear_fc2=row_linear)),
            mlp_bda=get_bias_dropout_add,
        ),
    )


def local_layer_spec() -> ModuleSpec:
    """Megatron's own parallel linears, torch SDPA attention, float32-accumulating RMSNorm."""
    return _layer_spec(RMSNorm, ColumnParallelLinear, RowParallelLinear, SDPAttention)


def te_layer_spec() -> ModuleSpec:
    """Transformer Engine linears, norm and fused attention. Raises ImportError without TE."""
    from megatron.core.extensions.transformer_engine import (
        TEColumnParallelLinear,
        TEDotProductAttention,
        TENorm,
        TERowParallelLinear,
    )

    return _layer_spec(TENorm, TEColumnParallelLinear, TERowParallelLinear, TEDotProductAttention)


def default_layer_spec(use_transformer_engine: bool = False) -> ModuleSpec:
    """The local spec, or the TE spec when asked for. The local spec is the default: it is the
    one verified against transformers on CPU and GPU; the TE spec is not yet run anywhere."""
    return te_layer_spec() if use_transformer_engine else local_layer_spec()
