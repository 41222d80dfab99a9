"""Model FLOPs (falcon_h1/training/flops.py) against hand counts and torch's FLOP counter."""

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from falcon_h1.kernels.conv1d import causal_conv1d_torch
from falcon_h1.kernels.ssd import ssd_scan_torch
from falcon_h1.model.config import FalconH1Config
from falcon_h1.model.param_count import layer_parameter_counts, parameter_count
from falcon_h1.model.presets import PRESETS, preset_config
from falcon_h1.training import flops

SSD_KEYS = ("ssd_intra_chunk_scores", "ssd_intra_chunk_output", "ssd_chunk_states", "ssd_state_passing",
            "ssd_state_output")
GEMM_KEYS = ("in_proj_attention", "in_proj_ssm", "out_proj_attention", "out_proj_ssm", "mlp", "lm_head")


def attention_only_config(**overrides) -> FalconH1Config:
    fields = {"num_layers": 2, "hidden_size": 64, "ffn_hidden_size": 128, "num_attention_heads": 4,
              "num_query_groups": 2, "kv_channels": 16, "mamba_num_heads": 0, "vocab_size": 256,
              "share_embeddings_and_output_weights": False}
    return FalconH1Config(**{**fields, **overrides})


def test_attention_only_matches_hand_count():
    # hidden 64, 4 heads x 16 (2 KV heads), MLP 128, vocab 256 (already a multiple of 128), 2 layers.
    # GEMM weights per layer: q,k,v 64*(64+32+32) + o 64*64 + MLP 3*64*128 = 8192 + 4096 + 24576 = 36864.
    # N = 2 * 36864 + lm_head 256*64 = 90112;  T = 3 sequences x 32 tokens = 96.
    # 6 N T = 51,904,512.  Causal attention core: 3 (fwd+bwd) x 2 products x 2 FLOPs x (32^2 / 2)
    # scores x 16 dims x 4 heads x 2 layers x 3 sequences = 2,359,296.
    config = attention_only_config()
    step = flops.training_flops_breakdown(config, global_batch_size=3, seq_length=32)
    assert sum(step[k] for k in GEMM_KEYS) == 51_904_512
    assert step["attention_core"] == 2_359_296
    assert step["total"] == 51_904_512 + 2_359_296
    assert all(step[k] == 0 for k in (*SSD_KEYS, "conv1d"))
    assert flops.training_flops_per_step(config, 3, 32) == step["total"]


@pytest.mark.parametrize("tied", [False, True])
def test_attention_only_is_6nt_plus_attention(tied):
    """The standard dense-transformer count, with N from param_count (an independent module):
    GEMM FLOPs = 6 N T with N = layer matmul weights + the logits GEMM (also run when tied)."""
    config = attention_only_config(num_layers=3, vocab_size=300, share_embeddings_and_output_weights=tied)
    batch, length = 2, 96
    counts = parameter_count(config, padded_vocab=True)
    gemm_weights = counts["attention"] + counts["mlp"] + config.padded_vocab_size * config.hidden_size
    attention = 3 * 2 * length**2 * config.kv_channels * config.num_attention_heads * config.num_layers * batch
    step = flops.training_flops_breakdown(config, batch, length)
    assert sum(step[k] for k in GEMM_KEYS) == 6 * gemm_weights * batch * length
    assert step["total"] == 6 * gemm_weights * batch * length + attention
    # Non-causal counting doubles the attention core only.
    full = flops.training_flops_breakdown(config, batch, length, causal_half=False)
    assert full["attention_core"] == 2 * step["attention_core"]


@pytest.mark.parametrize("name", list(PRESETS))
def test_hybrid_gemms_are_6nt_of_the_projection_weights(name):
    """In-/out-projections and MLP of a hybrid layer: 6 T x (layer weights minus the non-GEMM
    Mamba parameters: conv weight and bias, A_log, D, dt_bias, norm weight)."""
    config = preset_config(name)
    layer = layer_parameter_counts(config)
    conv_channels = config.d_ssm + 2 * config.mamba_num_groups * config.mamba_state_dim
    non_gemm = (conv_channels * (config.mamba_conv_kernel + 1) + 3 * config.mamba_num_heads
                + (config.d_ssm if config.mamba_rms_norm else 0))
    gemm_weights = layer["attention"] + layer["ssm"] - non_gemm + layer["mlp"]
    length = 512
    per_layer = flops.layer_forward_flops(config, length)
    layer_gemms = sum(per_layer[k] for k in GEMM_KEYS if k != "lm_head")
    assert 3 * layer_gemms == 6 * gemm_weights * length


def _counted(fn, *args, **kwargs) -> int:
    with FlopCounterMode(display=False) as counter:
        fn(*args, **kwargs)
    return counter.get_total_flops()


def _ssd_inputs(batch, length, heads, head_dim, groups, state, requires_grad=False):
    torch.manual_seed(0)
    tensors = (torch.randn(batch, length, heads, head_dim), torch.rand(batch, length, heads) * 0.1,
               -torch.rand(heads), torch.randn(batch, length, groups, state), torch.randn(batch, length, groups, state))
    for t in tensors:
        t.requires_grad_(requires_grad)
    return tensors


# (batch, length, heads, head_dim, groups, state, chunk); 200 is not a multiple of its chunk.
SSD_SHAPES = [(2, 256, 4, 8, 4, 16, 64), (1, 200, 6, 16, 6, 32, 64), (3, 96, 2, 32, 2, 64, 32)]


@pytest.mark.parametrize("shape", SSD_SHAPES)
def test_ssd_terms_match_flop_counter_on_torch_scan(shape):
    """torch.utils.flop_counter counts the matmuls (bmm) of the chunked torch scan. With one head
    per group the counts agree EXACTLY (integer equality), except the state passing, an
    elementwise multiply-add the counter does not see. Backward counts 2x forward exactly."""
    batch, length, heads, head_dim, groups, state, chunk = shape
    expected = flops.ssd_scan_flops(length, heads, head_dim, state, groups, chunk)
    expected_matmuls = batch * sum(v for k, v in expected.items() if k != "ssd_state_passing")

    x, dt, A, B, C = _ssd_inputs(batch, length, heads, head_dim, groups, state)
    assert _counted(ssd_scan_torch, x, dt, A, B, C, chunk) == expected_matmuls

    x, dt, A, B, C = _ssd_inputs(batch, length, heads, head_dim, groups, state, requires_grad=True)
    assert _counted(lambda: ssd_scan_torch(x, dt, A, B, C, chunk).sum().backward()) == 3 * expected_matmuls


def test_ssd_scores_are_counted_once_per_group():
    """The torch scan repeats B and C per head and so forms C B^T per head; mamba_ssm (and this
    count) forms it once per group. The difference is exactly (heads - groups) score products."""
    batch, length, heads, head_dim, groups, state, chunk = 2, 128, 6, 16, 2, 32, 32
    expected = flops.ssd_scan_flops(length, heads, head_dim, state, groups, chunk)
    expected_matmuls = batch * sum(v for k, v in expected.items() if k != "ssd_state_passing")
    per_group_scores = expected["ssd_intra_chunk_scores"] / groups
    x, dt, A, B, C = _ssd_inputs(batch, length, heads, head_dim, groups, state)
    counted = _counted(ssd_scan_torch, x, dt, A, B, C, chunk)
    assert counted == expected_matmuls + batch * (heads - groups) * per_group_scores


def test_conv1d_matches_flop_counter():
    """F.conv1d with padding k-1 computes L + k - 1 outputs (the causal conv keeps the first L):
    the counter sees exactly (L + k - 1) / L times the count of the L kept outputs."""
    config = preset_config("tiny-90m", num_layers=1)
    length, batch = 64, 2
    channels = config.d_ssm + 2 * config.mamba_num_groups * config.mamba_state_dim
    kernel = config.mamba_conv_kernel
    x, weight, bias = torch.randn(batch, channels, length), torch.randn(channels, 1, kernel), torch.randn(channels)
    counted = _counted(causal_conv1d_torch, x, weight, bias)
    expected = batch * flops.layer_forward_flops(config, length)["conv1d"]
    assert counted == expected * (length + kernel - 1) / length


def test_per_token_and_batch_scaling():
    config = preset_config("1.5b")
    one = flops.training_flops_per_step(config, 1, 4096)
    assert flops.training_flops_per_step(config, 8, 4096) == 8 * one
    assert flops.model_flops_per_token(config, 4096) == pytest.approx(one / 4096, rel=1e-15)
    # Within a few percent of 6N at 4k for the 1.5B shape (the attention core adds, the embedding
    # lookup subtracts): a sanity bound, the exact figures are in docs/flops.md.
    six_n = 6 * parameter_count(config)["total"]
    assert 0.95 < flops.model_flops_per_token(config, 4096) / six_n < 1.05


def test_cli_prints_breakdown_and_table(capsys):
    flops.main(["--preset", "tiny-90m", "--seq-length", "256"])
    out = capsys.readouterr().out
    assert "ssd_chunk_states" in out and "training FLOPs per step" in out
    flops.main(["--seq-length", "256"])
    table = capsys.readouterr().out
    assert all(f"| {name} |" in table for name in PRESETS)
