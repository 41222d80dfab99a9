"""Weight mapping between Hugging Face Falcon-H1 and this project's model.

Three layouts meet here:
- HF: `model.layers.N.self_attn.q_proj.weight`, `model.layers.N.mamba.in_proj.weight`, ...
- canonical: the tensors our checkpoints store (see HybridMixer.sharded_state_dict): the fused
  projections split into their q/k/v/z/x/B/C/dt row blocks and attention/SSM columns, MLP
  fc1 as [gate; up], unpadded vocabulary. Canonical tensors do not depend on the TP size.
- local: one tensor-parallel rank's `model.state_dict()`.

HF <-> canonical is a renaming plus splits/concatenations; canonical -> local slices each tensor
by the rank's layout (layout.py).
"""

from __future__ import annotations

import torch

from falcon_h1.model.config import FalconH1Config
from falcon_h1.model.layout import SSM_BLOCKS, mixer_layout


def _ssm_in_sizes(config: FalconH1Config) -> list[int]:
    gn = config.mamba_num_groups * config.mamba_state_dim
    return [config.d_ssm, config.d_ssm, gn, gn, config.mamba_num_heads]


def hf_to_canonical(hf: dict[str, torch.Tensor], config: FalconH1Config) -> dict[str, torch.Tensor]:
    """Rename and split an HF FalconH1ForCausalLM state dict into canonical tensors."""
    out = {"embedding.word_embeddings.weight": hf["model.embed_tokens.weight"],
           "decoder.final_layernorm.weight": hf["model.final_layernorm.weight"]}
    if not config.share_embeddings_and_output_weights:
        out["output_layer.weight"] = hf["lm_head.weight"]
    hd, heads = config.kv_channels, config.num_attention_heads
    for i in range(config.num_layers):
        h, m = f"model.layers.{i}.", f"decoder.layers.{i}."
        a = m + "self_attention."
        out[m + "input_layernorm.weight"] = hf[h + "input_layernorm.weight"]
        out[m + "pre_mlp_layernorm.weight"] = hf[h + "pre_ff_layernorm.weight"]
        if heads:
            for name in ("q", "k", "v"):
                out[a + f"in_proj.weight.{name}"] = hf[h + f"self_attn.{name}_proj.weight"]
                if config.attention_bias:
                    out[a + f"qkv_bias.{name}"] = hf[h + f"self_attn.{name}_proj.bias"]
            out[a + "out_proj.weight.attn"] = hf[h + "self_attn.o_proj.weight"].reshape(config.hidden_size, heads, hd)
            if config.attention_bias:
                out[a + "attn_out_bias"] = hf[h + "self_attn.o_proj.bias"]
        if config.mamba_num_heads:
            blocks = hf[h + "mamba.in_proj.weight"].split(_ssm_in_sizes(config))
            out.update({a + f"in_proj.weight.{n}": t for n, t in zip(SSM_BLOCKS, blocks)})
            if config.mamba_proj_bias:
                blocks = hf[h + "mamba.in_proj.bias"].split(_ssm_in_sizes(config))
                out.update({a + f"ssm_in_bias.{n}": t for n, t in zip(SSM_BLOCKS, blocks)})
            conv_sizes = _ssm_in_sizes(config)[1:4]
            out.update({a + f"conv1d.weight.{n}": t for n, t in
                        zip("xBC", hf[h + "mamba.conv1d.weight"].split(conv_sizes))})
            if config.mamba_conv_bias:
                out.update({a + f"conv1d.bias.{n}": t for n, t in
                            zip("xBC", hf[h + "mamba.conv1d.bias"].split(conv_sizes))})
            for name in ("A_log", "D", "dt_bias"):
                out[a + name] = hf[h + f"mamba.{name}"]
            if config.mamba_rms_norm:
                out[a + "norm_weight"] = hf[h + "mamba.norm.weight"]
            out[a + "out_proj.weight.ssm"] = hf[h + "mamba.out_proj.weight"]
            if config.projectors_bias:
                out[a + "ssm_out_bias"] = hf[h + "mamba.out_proj.bias"]
        ff = h + "feed_forward."
        out[m + "mlp.linear_fc1.weight"] = torch.cat([hf[ff + "gate_proj.weight"], hf[ff + "up_proj.weight"]])
        out[m + "mlp.linear_fc2.weight"] = hf[ff + "down_proj.weight"]
        if config.add_bias_linear:
            out[m + "mlp.linear_fc1.bias"] = torch.cat([hf[ff + "gate_proj.bias"], hf[ff + "up_proj.bias"]])
            out[m + "mlp.linear_fc2.bias"] = hf[ff + "down_proj.bias"]
    return out


def _rows(canonical, key, segments):
    return torch.cat([canonical[f"{key}.{s.name}"][s.offset: s.offset + s.rows] for s in segments])


def canonical_to_local(canonical: dict[str, torch.Tensor], config: FalconH1Config, tp_rank: int = 0,
                       tp_size: int = 1, layers: range | None = None, pre_process: bool = True,
                       post_process: bool = True) -> dict[str, torch.Tensor]:
    """One model chunk's state dict from canonical tensors: tensor-parallel rank `tp_rank`, holding
    the global `layers` (all by default) and, per the pipeline flags, the embedding and the
    final norm and output layer."""
    layout = mixer_layout(config, tp_size, tp_rank)
    vocab_rows = config.padded_vocab_size // tp_size
    layers = range(config.num_layers) if layers is None else layers

    def vocab_shard(weight):
        padded = weight.new_zeros(config.padded_vocab_size, weight.shape[1])
        padded[: weight.shape[0]] = weight
        return padded[tp_rank * vocab_rows: (tp_rank + 1) * vocab_rows]

    def even_shard(tensor, dim=0):
        return tensor.chunk(tp_size, dim=dim)[tp_rank]

    out = {}
    if pre_process:
        out["embedding.word_embeddings.weight"] = vocab_shard(canonical["embedding.word_embeddings.weight"])
    if post_process:
        out["decoder.final_layernorm.weight"] = canonical["decoder.final_layernorm.weight"]
        if "output_layer.weight" in canonical:
            out["output_layer.weight"] = vocab_shard(canonical["output_layer.weight"])
        elif not pre_process:  # tied embeddings: the last stage keeps its own copy
            out["output_layer.weight"] = vocab_shard(canonical["embedding.word_embeddings.weight"])
    attn_segments, ssm_segments = layout.attention_segments, layout.ssm_segments
    for local_index, i in enumerate(layers):
        c = f"decoder.layers.{i}."  # canonical keys use global layer numbers
        a = c + "self_attention."
        layer = {}
        for name in ("input_layernorm.weight", "pre_mlp_layernorm.weight"):
            layer[name] = canonical[c + name]
        layer["self_attention.in_proj.weight"] = _rows(canonical, a + "in_proj.weight", layout.in_proj)
        if config.attention_bias and attn_segments:
            layer["self_attention.qkv_bias"] = _rows(canonical, a + "qkv_bias", attn_segments)
            layer["self_attention.attn_out_bias"] = canonical[a + "attn_out_bias"]
        if config.mamba_proj_bias and ssm_segments:
            layer["self_attention.ssm_in_bias"] = _rows(canonical, a + "ssm_in_bias", ssm_segments)
        out_cols = []
        if layout.attention_heads:
            shard = tp_rank // layout.attention_replicas
            heads = slice(shard * layout.attention_heads, (shard + 1) * layout.attention_heads)
            attn = canonical[a + "out_proj.weight.attn"][:, heads, layout.attention_out_dims]
            out_cols.append(attn.reshape(config.hidden_size, -1))
        if layout.mamba_heads:
            out_cols.append(even_shard(canonical[a + "out_proj.weight.ssm"], dim=1))
            layer["self_attention.conv1d.weight"] = _rows(canonical, a + "conv1d.weight", layout.conv)
            if config.mamba_conv_bias:
                layer["self_attention.conv1d.bias"] = _rows(canonical, a + "conv1d.bias", layout.conv)
            for name in ("A_log", "D", "dt_bias") + (("norm_weight",) if config.mamba_rms_norm else ()):
                layer[f"self_attention.{name}"] = even_shard(canonical[a + name])
            if config.projectors_bias:
                layer["self_attention.ssm_out_bias"] = canonical[a + "ssm_out_bias"]
        layer["self_attention.out_proj.weight"] = torch.cat(out_cols, dim=1)
        gate, up = canonical[c + "mlp.linear_fc1.weight"].chunk(2)
        layer["mlp.linear_fc1.weight"] = torch.cat([even_shard(gate), even_shard(up)])
        layer["mlp.linear_fc2.weight"] = even_shard(canonical[c + "mlp.linear_fc2.weight"], dim=1)
        if config.add_bias_linear:
            gate, up = canonical[c + "mlp.linear_fc1.bias"].chunk(2)
            layer["mlp.linear_fc1.bias"] = torch.cat([even_shard(gate), even_shard(up)])
            layer["mlp.linear_fc2.bias"] = canonical[c + "mlp.linear_fc2.bias"]
        out.update({f"decoder.layers.{local_index}.{name}": t for name, t in layer.items()})
    return out


def hf_to_local(hf: dict[str, torch.Tensor], config: FalconH1Config, tp_rank: int = 0,
                tp_size: int = 1) -> dict[str, torch.Tensor]:
    """HF state dict -> one TP rank's model state dict (in memory; the converter streams instead)."""
    return canonical_to_local(hf_to_canonical(hf, config), config, tp_rank, tp_size)
