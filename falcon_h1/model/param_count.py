"""Parameter counts computed from the config alone, without allocating weights."""

from __future__ import annotations

from falcon_h1.model.config import FalconH1Config


def layer_parameter_counts(config: FalconH1Config) -> dict[str, int]:
    """Parameters of one layer, by part."""
    h, hd = config.hidden_size, config.kv_channels
    q, kv = config.num_attention_heads * hd, 2 * config.num_query_groups * hd if config.num_attention_heads else 0
    d, mh = config.d_ssm, config.mamba_num_heads
    bc = 2 * config.mamba_num_groups * config.mamba_state_dim if mh else 0
    attention = h * (q + kv) + q * h
    if config.attention_bias and q:
        attention += q + kv + h
    ssm = 0
    if mh:
        conv_channels = d + bc
        ssm = h * (2 * d + bc + mh) + d * h + conv_channels * config.mamba_conv_kernel + 3 * mh
        ssm += conv_channels if config.mamba_conv_bias else 0
        ssm += d if config.mamba_rms_norm else 0
        ssm += 2 * d + bc + mh if config.mamba_proj_bias else 0
        ssm += h if config.projectors_bias else 0
    ffn = config.ffn_hidden_size
    mlp = 3 * h * ffn + (2 * ffn + h if config.add_bias_linear else 0)
    return {"attention": attention, "ssm": ssm, "mlp": mlp, "norms": 2 * h}


def parameter_count(config: FalconH1Config, padded_vocab: bool = False) -> dict[str, int]:
    """Whole-model parameter counts: embedding, layers (by part), final norm, lm_head, total.

    With padded_vocab, the embedding and lm_head use the TP-padded vocabulary the built model
    allocates; without, the vocabulary of the released checkpoint."""
    vocab = config.padded_vocab_size if padded_vocab else config.vocab_size
    per_layer = layer_parameter_counts(config)
    counts = {"embedding": vocab * config.hidden_size}
    counts.update({part: n * config.num_layers for part, n in per_layer.items()})
    counts["final_norm"] = config.hidden_size
    counts["lm_head"] = 0 if config.share_embeddings_and_output_weights else vocab * config.hidden_size
    counts["total"] = sum(counts.values())
    return counts

