"""HybridMixer: attention heads and Mamba-2 heads side by side, one in-projection, one out-projection."""

import pytest
import torch

from falcon_h1.model.config import FalconH1Config
from falcon_h1.model.model import FalconH1Model
from falcon_h1.model.param_count import parameter_count
from falcon_h1.model.presets import preset_config
from falcon_h1.model.specs import local_layer_spec
from falcon_h1.parity import build_from_hf, make_hf_model, relative_error


def test_mixer_with_2_attention_and_2_mamba_heads_is_the_sum_of_hf_attention_and_mamba(single_rank):
    hf = make_hf_model(seed=5, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1, head_dim=16,
                       mamba_n_heads=2, mamba_d_head=16, mamba_d_state=8, mamba_chunk_size=4)
    model = build_from_hf(hf)
    mixer, layer = model.decoder.layers[0].self_attention, hf.model.layers[0]
    cfg = hf.config

    # One fused GEMM in, one out: rows q(32) k(16) v(16) z(32) x(32) B(8) C(8) dt(2); cols attn(32) ssm(32).
    assert mixer.in_proj.weight.shape == (32 + 16 + 16 + 32 + 32 + 8 + 8 + 2, 64)
    assert mixer.out_proj.weight.shape == (64, 32 + 32)

    h = torch.randn(2, 11, 64)
    positions = torch.arange(11)[None]
    cos_sin = hf.model.rotary_emb(h, positions)
    causal = torch.full((11, 11), float("-inf")).triu(1)[None, None]
    expected = (layer.mamba(h) * cfg.ssm_out_multiplier
                + layer.self_attn(h * cfg.attention_in_multiplier, cos_sin, causal)[0] * cfg.attention_out_multiplier)
    out, bias = mixer(h.transpose(0, 1), rotary_pos_emb=model.rotary_pos_emb(11, h.device))
    assert bias is None
    assert relative_error(out.transpose(0, 1).detach(), expected.detach()) < 1e-5


def test_mixer_is_causal(single_rank):
    hf = make_hf_model(seed=6, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2, head_dim=16,
                       mamba_n_heads=2, mamba_d_head=16, mamba_chunk_size=4)
    model = build_from_hf(hf)
    tokens = torch.randint(1, 200, (1, 16))
    changed = tokens.clone()
    changed[0, 9:] = torch.randint(1, 200, (7,))
    with torch.no_grad():
        torch.testing.assert_close(model(changed)[:, :9], model(tokens)[:, :9])
        assert not torch.allclose(model(changed)[:, 9:], model(tokens)[:, 9:])


def _ratio_config(attention_heads: int, mamba_heads: int) -> FalconH1Config:
    return FalconH1Config(
        num_layers=2, hidden_size=64, ffn_hidden_size=128, vocab_size=256,
        num_attention_heads=attention_heads, num_query_groups=2 if attention_heads else 0, kv_channels=16,
        mamba_num_heads=mamba_heads, mamba_head_dim=16, mamba_state_dim=16, mamba_num_groups=1,
        mamba_chunk_size=8, use_cpu_initialization=True, kernel_backend="torch",
    )


def _hand_count(a: int, m: int) -> int:
    """Parameters of _ratio_config(a, m), derived by hand.

    Per layer, hidden 64: attention rows q = 16a, k = v = 2 * 16 in, 16a columns out;
    Mamba rows z = x = 16m, B = C = 16, dt = m in, 16m columns out; conv over x, B, C
    (16m + 32 channels, kernel 4, with bias); A_log, D, dt_bias: one each per Mamba head;
    SwiGLU MLP 3 * 64 * 128; two RMSNorm weights. Plus embedding and lm_head (256 x 64, untied)
    and the final norm."""
    attention = 64 * (16 * a + 64) + 16 * a * 64 if a else 0
    mamba = 64 * (32 * m + 32 + m) + 16 * m * 64 + (16 * m + 32) * 5 + 3 * m if m else 0
    per_layer = attention + mamba + 3 * 64 * 128 + 2 * 64
    return 2 * per_layer + 2 * 256 * 64 + 64


@pytest.mark.parametrize("attention_heads, mamba_heads", [(8, 0), (6, 2), (4, 4), (2, 6), (0, 8)])
def test_attention_to_mamba_ratios_build_train_and_have_the_hand_derived_size(single_rank, attention_heads, mamba_heads):
    config = _ratio_config(attention_heads, mamba_heads)
    model = FalconH1Model(config, local_layer_spec())
    tokens = torch.randint(0, 256, (2, 24))
    loss = model(tokens, labels=torch.roll(tokens, -1, 1)).mean()
    loss.backward()
    assert torch.isfinite(loss)
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, f"{name} gets no gradient"
    built = sum(p.numel() for p in model.parameters())
    assert built == _hand_count(attention_heads, mamba_heads) == parameter_count(config)["total"]


def _loss_grads_and_core_calls(model, tokens):
    """(loss, parameter gradients, core_attention calls) of one training step. Calls are counted
    by a forward pre-hook: torch's checkpoint stops its recompute once the saved tensors are
    rebuilt, before forward hooks would run."""
    calls = []
    hooks = [layer.self_attention.core_attention.register_forward_pre_hook(lambda *_: calls.append(1))
             for layer in model.decoder.layers]
    loss = model(tokens, labels=torch.roll(tokens, -1, 1)).mean()
    loss.backward()
    for hook in hooks:
        hook.remove()
    return loss.detach(), {n: p.grad for n, p in model.named_parameters()}, len(calls)


@pytest.mark.filterwarnings("ignore:If you are using transformer_engine")  # Megatron's note on "core_attn"
def test_selective_recompute_of_core_attention_recomputes_it_and_changes_nothing(single_rank):
    def build(**recompute):
        config = preset_config("tiny", num_layers=2, use_cpu_initialization=True, kernel_backend="torch",
                               **recompute)
        return FalconH1Model(config)

    plain = build()
    recomputed = build(recompute_granularity="selective", recompute_modules=["core_attn"])
    recomputed.load_state_dict(plain.state_dict())
    assert all(layer.self_attention.recompute_core_attention for layer in recomputed.decoder.layers)
    assert not any(layer.self_attention.recompute_core_attention for layer in plain.decoder.layers)
    tokens = torch.randint(1, 4096, (2, 32), generator=torch.Generator().manual_seed(0))

    loss, grads, calls = _loss_grads_and_core_calls(plain, tokens)
    loss_r, grads_r, calls_r = _loss_grads_and_core_calls(recomputed, tokens)
    assert (calls, calls_r) == (2, 4)  # 2 layers: once each, or once more in backward
    assert torch.equal(loss_r, loss)
    for name, grad in grads.items():
        assert (grads_r[name] - grad).abs().max() <= 1e-6, name


def _saved_bytes_and_grads(model, tokens):
    """(bytes autograd keeps for backward, loss, parameter gradients) of one training step."""
    saved = {}

    def pack(t):
        saved[(t.untyped_storage().data_ptr(), t.dtype)] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(tokens, labels=torch.roll(tokens, -1, 1)).mean()
    loss.backward()
    return sum(saved.values()), loss.detach(), {n: p.grad for n, p in model.named_parameters()}


def test_recompute_of_the_ssd_scan_keeps_less_for_backward_and_changes_nothing(single_rank):
    def build(**recompute):
        config = preset_config("tiny", num_layers=2, use_cpu_initialization=True, kernel_backend="torch",
                               **recompute)
        return FalconH1Model(config)

    plain = build()
    recomputed = build(recompute_ssd_scan=True)
    recomputed.load_state_dict(plain.state_dict())
    calls = []
    for layer in recomputed.decoder.layers:
        mixer = layer.self_attention
        mixer._conv_and_scan = lambda *a, _f=mixer._conv_and_scan, **k: (calls.append(1), _f(*a, **k))[1]
    tokens = torch.randint(1, 4096, (2, 64), generator=torch.Generator().manual_seed(0))

    kept, loss, grads = _saved_bytes_and_grads(plain, tokens)
    kept_r, loss_r, grads_r = _saved_bytes_and_grads(recomputed, tokens)
    assert len(calls) == 4  # 2 layers: in forward, and again in backward
    config = plain.config
    conv_output_bytes = 2 * 64 * (config.d_ssm + 2 * config.mamba_state_dim) * 4  # float32, per layer
    assert kept - kept_r >= 2 * conv_output_bytes  # at least the conv outputs and all the scan keeps
    assert torch.equal(loss_r, loss)
    for name, grad in grads.items():
        assert (grads_r[name] - grad).abs().max() <= 1e-6, name


def test_full_layer_recompute_keeps_only_layer_inputs_and_changes_nothing(single_rank):
    """recompute_granularity="full" (one layer per checkpoint, what `--recompute full` sets): each
    layer's forward runs again in backward, autograd keeps far less, the step is the same."""
    from falcon_h1.benchmarks.step import recompute_overrides

    def build(**recompute):
        config = preset_config("tiny", num_layers=2, use_cpu_initialization=True, kernel_backend="torch",
                               **recompute)
        return FalconH1Model(config)

    plain = build()
    recomputed = build(**recompute_overrides(["full"]))
    recomputed.load_state_dict(plain.state_dict())
    tokens = torch.randint(1, 4096, (2, 64), generator=torch.Generator().manual_seed(0))
    calls = []
    for layer in recomputed.decoder.layers:
        layer.self_attention.register_forward_pre_hook(lambda *_: calls.append(1))
    kept, loss, grads = _saved_bytes_and_grads(plain, tokens)
    kept_r, loss_r, grads_r = _saved_bytes_and_grads(recomputed, tokens)
    assert len(calls) == 4  # 2 layers: in forward, and again in backward
    assert kept_r < kept / 2
    assert torch.equal(loss_r, loss)
    for name, grad in grads.items():
        assert (grads_r[name] - grad).abs().max() <= 1e-6, name


def test_full_layer_recompute_and_per_layer_cuda_graphs_are_refused_together():
    from falcon_h1.benchmarks.step import recompute_overrides

    with pytest.raises(ValueError, match="does not combine with per-layer CUDA graphs"):
        preset_config("tiny", num_layers=2, cuda_graph_impl="local", **recompute_overrides(["full"]))
    with pytest.raises(ValueError, match="takes no cores beside it"):
        recompute_overrides(["full", "ssd_scan"])


@pytest.mark.parametrize("cuda_graph_impl, survives", [("local", True), ("none", False)])
def test_backward_survives_the_in_place_buffer_restore_of_cuda_graph_capture(single_rank, cuda_graph_impl, survives):
    """Megatron's per-layer CUDA-graph capture copies each layer's buffers back in place between
    capturing its forward and its backward. Under cuda_graph_impl="local" the layer must not hand
    those buffers (the µP row scales) to autograd itself; without graphs it may (and does)."""
    config = preset_config("tiny", num_layers=1, use_cpu_initialization=True, kernel_backend="torch",
                           ssm_multipliers=(0.5, 1.5, 0.7, 1.3, 0.9), mlp_multipliers=(0.8, 1.2))
    model = FalconH1Model(config)
    config.cuda_graph_impl = cuda_graph_impl  # after the build: building the graph manager needs CUDA
    layer = model.decoder.layers[0]
    assert len(list(layer.buffers())) >= 2  # the in-projection's and fc1's row scales
    hidden = torch.randn(16, 2, config.hidden_size, requires_grad=True)
    out, _ = layer(hidden, attention_mask=None, rotary_pos_emb=model.rotary_pos_emb(16, hidden.device))
    for buffer in layer.buffers():
        buffer.copy_(buffer.clone())
    if survives:
        out.sum().backward()
        assert hidden.grad is not None
    else:
        with pytest.raises(RuntimeError, match="modified by an inplace operation"):
            out.sum().backward()
