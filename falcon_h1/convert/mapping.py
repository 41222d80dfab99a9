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

from collections.abc import Callable
from dataclasses import dataclass

import torch

from falcon_h1.model.config import FalconH1Config
from falcon_h1.model.layout import SSM_BLOCKS, mixer_layout


def _ssm_in_sizes(config: FalconH1Config) -> list[int]:
    gn = config.mamba_num_groups * config.mamba_state_dim
    return [config.d_ssm, config.d_ssm, gn, gn, config.mamba_num_heads]


@dataclass(frozen=True)
class Link:
    """HF tensors <-> canonical tensors that are each other's pieces (1:1 renames, a fused HF
    tensor split into blocks, two HF tensors concatenated), with both directions."""
    hf: tuple[str, ...]
    canonical: tuple[str, ...]
    to_canonical: Callable[[list[torch.Tensor]], list[torch.Tensor]]
    to_hf: Callable[[list[torch.Tensor]], list[torch.Tensor]]


def _same(hf: str, canonical: str) -> Link:
    return Link((hf,), (canonical,), list, list)


def _split(hf: str, canonical: list[str], sizes: list[int]) -> Link:
    """One HF tensor = its canonical blocks stacked along dim 0."""
    return Link((hf,), tuple(canonical), lambda t: list(t[0].split(sizes)), lambda t: [torch.cat(t)])


def _concat(hf: list[str], canonical: str) -> Link:
    """One canonical tensor = HF tensors of equal size stacked along dim 0 (MLP [gate; up])."""
    return Link(tuple(hf), (canonical,), lambda t: [torch.cat(t)], lambda t: list(t[0].chunk(len(hf))))


def links(config: FalconH1Config) -> list[Link]:
    """Every HF <-> canonical correspondence of a model, in HF checkpoint order."""
    out = [_same("model.embed_tokens.weight", "embedding.word_embeddings.weight")]
    hd, heads, hidden = config.kv_channels, config.num_attention_heads, config.hidden_size
    ssm_sizes, blocks = _ssm_in_sizes(config), list(SSM_BLOCKS)
    for i in range(config.num_layers):
        h, m = f"model.layers.{i}.", f"decoder.layers.{i}."
        a = m + "self_attention."
        if heads:
            for name in ("q", "k", "v"):
                out.append(_same(h + f"self_attn.{name}_proj.weight", a + f"in_proj.weight.{name}"))
                if config.attention_bias:
                    out.append(_same(h + f"self_attn.{name}_proj.bias", a + f"qkv_bias.{name}"))
            out.append(Link((h + "self_attn.o_proj.weight",), (a + "out_proj.weight.attn",),
                            lambda t: [t[0].reshape(hidden, heads, hd)], lambda t: [t[0].reshape(hidden, heads * hd)]))
            if config.attention_bias:
                out.append(_same(h + "self_attn.o_proj.bias", a + "attn_out_bias"))
        if config.mamba_num_heads:
            out.append(_split(h + "mamba.in_proj.weight", [a + f"in_proj.weight.{n}" for n in blocks], ssm_sizes))
            if config.mamba_proj_bias:
                out.append(_split(h + "mamba.in_proj.bias", [a + f"ssm_in_bias.{n}" for n in blocks], ssm_sizes))
            out.append(_split(h + "mamba.conv1d.weight", [a + f"conv1d.weight.{n}" for n in "xBC"], ssm_sizes[1:4]))
            if config.mamba_conv_bias:
                out.append(_split(h + "mamba.conv1d.bias", [a + f"conv1d.bias.{n}" for n in "xBC"], ssm_sizes[1:4]))
            for name in ("dt_bias", "A_log", "D"):
                out.append(_same(h + f"mamba.{name}", a + name))
            if config.mamba_rms_norm:
                out.append(_same(h + "mamba.norm.weight", a + "norm_weight"))
            out.append(_same(h + "mamba.out_proj.weight", a + "out_proj.weight.ssm"))
            if config.projectors_bias:
                out.append(_same(h + "mamba.out_proj.bias", a + "ssm_out_bias"))
        ff = h + "feed_forward."
        out.append(_concat([ff + "gate_proj.weight", ff + "up_proj.weight"], m + "mlp.linear_fc1.weight"))
        out.append(_same(ff + "down_proj.weight", m + "mlp.linear_fc2.weight"))
        if config.add_bias_linear:
            out.append(_concat([ff + "gate_proj.bias", ff + "up_proj.bias"], m + "mlp.linear_fc1.bias"))
            out.append(_same(ff + "down_proj.bias", m + "mlp.linear_fc2.bias"))
        out.append(_same(h + "input_layernorm.weight", m + "input_layernorm.weight"))
        out.append(_same(h + "pre_ff_layernorm.weight", m + "pre_mlp_layernorm.weight"))
    out.append(_same("model.final_layernorm.weight", "decoder.final_layernorm.weight"))
    if not config.share_embeddings_and_output_weights:
        out.append(_same("lm_head.weight", "output_layer.weight"))
    return out


def hf_to_canonical(hf: dict[str, torch.Tensor], config: FalconH1Config) -> dict[str, torch.Tensor]:
    """Rename and split an HF FalconH1ForCausalLM state dict into canonical tensors."""
    out = {}
    for link in links(config):
        out.update(zip(link.canonical, link.to_canonical([hf[name] for name in link.hf])))
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
