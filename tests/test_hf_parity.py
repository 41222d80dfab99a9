"""The model computes what transformers' FalconH1ForCausalLM computes, forward and backward.

Float32 on CPU, random weights (every parameter away from its init) and random tokens.
Tolerances: logits relative error (||ours - hf|| / ||hf||) <= 1e-5; every parameter's gradient
relative error <= 1e-4. Measured: ~5e-7 and ~5e-6.
"""

import pytest

from falcon_h1.parity import build_from_hf, compare_with_hf, make_hf_model, random_tokens

CONFIGS = {
    # head_dim (24) != hidden / heads (16); 1 SSM group; plain silu(z) gate; untied.
    "head_dim_differs": dict(),
    # 2 SSM groups, gated RMSNorm after the gate, tied embeddings, every bias on.
    "groups_norm_tied_biases": dict(mamba_n_groups=2, mamba_rms_norm=True, mamba_norm_before_gate=False,
                                    tie_word_embeddings=True, attention_bias=True, mamba_proj_bias=True,
                                    projectors_bias=True, mlp_bias=True),
    # 6:2 GQA, norm before the gate, no conv bias, a time-step limit, 3 layers, chunk 8.
    "gqa3_norm_first_dt_limit": dict(num_attention_heads=6, num_key_value_heads=2, mamba_n_groups=2,
                                     mamba_rms_norm=True, mamba_norm_before_gate=True, mamba_conv_bias=False,
                                     time_step_limit=(0.0, 0.5), num_hidden_layers=3, mamba_chunk_size=8),
    # Mamba-heavy 2:6 split, bigger state, vocabulary far from a multiple of 128 (padding masked).
    "mamba_heavy_padded_vocab": dict(num_attention_heads=2, num_key_value_heads=1, head_dim=32, mamba_n_heads=6,
                                     mamba_d_head=16, mamba_d_state=32, vocab_size=301),
}


@pytest.mark.parametrize("name", sorted(CONFIGS))
@pytest.mark.parametrize("seq_len", [37, 64])  # 37 is not a multiple of any chunk size used
def test_forward_and_backward_match_transformers(single_rank, name, seq_len):
    hf = make_hf_model(seed=len(name), **CONFIGS[name])
    model = build_from_hf(hf)
    report = compare_with_hf(hf, model, random_tokens(hf.config, batch=2, seq_len=seq_len, seed=seq_len))
    assert report.logits_error <= 1e-5
    assert report.max_grad_error <= 1e-4, (report.worst_grad, report.max_grad_error)
    assert len(report.grad_errors) == len(list(model.parameters()))


def test_per_token_loss_matches_transformers_loss(single_rank):
    import torch

    hf = make_hf_model(seed=11, vocab_size=250)
    model = build_from_hf(hf)
    tokens = random_tokens(hf.config, batch=2, seq_len=20, seed=5)
    labels = torch.roll(tokens, -1, dims=1)
    ours = model(tokens, labels=labels)  # [b, s] per-token loss; padded vocab masked out
    logits = hf(input_ids=tokens).logits
    reference = torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten(), reduction="none")
    torch.testing.assert_close(ours.flatten(), reference, rtol=1e-5, atol=1e-6)
