"""Model FLOPs of a Falcon-H1 training step, from the config alone (derivation: docs/flops.md).

Counted (forward, per sequence of L tokens; a multiply-add is 2 FLOPs):

- every GEMM: the fused in-projection [q k v | z x B C dt], the fused out-projection
  [attention | SSM] -> hidden, the SwiGLU MLP (gate, up, down) and the logits GEMM over the
  padded vocabulary. The embedding lookup is a gather: 0 FLOPs.
- the attention core, QK^T and AV, causal half (L^2 / 2 score entries per head), as
  Megatron-LM's `num_floating_point_operations` and current NeMo formulas count it.
- the Mamba-2 chunked SSD scan (intra-chunk C B^T and its product with x, chunk states B^T x,
  inter-chunk state passing, state-to-output C h) over the sequence padded to whole chunks.
- the depthwise causal conv1d over [x B C].

Ignored: norms, RoPE, softmax, SiLU/softplus/exp, the µP multipliers, gating, D skip, biases,
the loss: elementwise work, O(L * width) against the GEMMs' O(L * width * hidden).

Training = 3 x forward (the backward pass computes gradients with respect to both inputs and
weights, two GEMMs per forward GEMM). Activation recomputation is not counted: these are model
FLOPs, the numerator of MFU.
"""

from __future__ import annotations

import argparse
import math
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from falcon_h1.model.config import FalconH1Config

TRAINING_TO_FORWARD = 3  # forward 1x, backward 2x (input gradients + weight gradients)


def linear_flops(tokens: int, in_features: int, out_features: int) -> float:
    """One dense projection over `tokens` rows."""
    return 2.0 * tokens * in_features * out_features


def attention_core_flops(seq_length: int, heads: int, head_dim: int, causal_half: bool = True) -> float:
    """QK^T and AV of one sequence: two [L, d] x [d, L]-shaped products per head.

    With causal_half, only the L^2 / 2 score entries at or below the diagonal count, the entries
    a causal kernel (flash / cuDNN / TE) actually computes, up to its block granularity.
    """
    score_entries = seq_length * seq_length / (2 if causal_half else 1)
    return 2 * (2.0 * score_entries * head_dim * heads)


def ssd_scan_flops(seq_length: int, heads: int, head_dim: int, state_dim: int, groups: int,
                   chunk_size: int) -> dict[str, float]:
    """The matrix products of the chunked SSD scan over one sequence, by term.

    Per chunk of Q tokens (P = head_dim, N = state_dim), the sequence padded to c = ceil(L / Q)
    whole chunks as the kernels process it:
      intra-chunk scores  C B^T           [Q, N] x [N, Q]  per group: 2 Q^2 N
      intra-chunk output  (C B^T o L) x   [Q, Q] x [Q, P]  per head:  2 Q^2 P
      chunk states        B^T (decay x)   [N, Q] x [Q, P]  per head:  2 Q N P
      state passing       h <- a h + s    [P, N] mul + add per head:  2 N P
      state output        C h             [Q, N] x [N, P]  per head:  2 Q N P
    The scores are shared by the heads of a group (mamba_ssm computes them once per group); the
    masked Q x Q products are counted whole, as the chunked algorithm forms them.
    """
    chunks = math.ceil(seq_length / chunk_size)
    padded = chunks * chunk_size
    return {
        "ssd_intra_chunk_scores": 2.0 * padded * chunk_size * state_dim * groups,
        "ssd_intra_chunk_output": 2.0 * padded * chunk_size * head_dim * heads,
        "ssd_chunk_states": 2.0 * padded * state_dim * head_dim * heads,
        "ssd_state_passing": 2.0 * chunks * state_dim * head_dim * heads,
        "ssd_state_output": 2.0 * padded * state_dim * head_dim * heads,
    }


def layer_forward_flops(config: FalconH1Config, seq_length: int, causal_half: bool = True) -> dict[str, float]:
    """Forward FLOPs of one layer over one sequence, by component."""
    L, hidden = seq_length, config.hidden_size
    attention_width = config.num_attention_heads * config.kv_channels
    kv_width = 2 * config.num_query_groups * config.kv_channels if config.num_attention_heads else 0
    mamba_heads = config.mamba_num_heads
    bc_width = 2 * config.mamba_num_groups * config.mamba_state_dim if mamba_heads else 0
    ssm_in_width = 2 * config.d_ssm + bc_width + mamba_heads  # z, x, B, C, dt

    flops = {
        "in_proj_attention": linear_flops(L, hidden, attention_width + kv_width),
        "in_proj_ssm": linear_flops(L, hidden, ssm_in_width),
        "out_proj_attention": linear_flops(L, attention_width, hidden),
        "out_proj_ssm": linear_flops(L, config.d_ssm, hidden),
        "mlp": 3 * linear_flops(L, hidden, config.ffn_hidden_size),  # gate, up, down
        "attention_core": attention_core_flops(L, config.num_attention_heads, config.kv_channels, causal_half),
        "conv1d": 2.0 * L * (config.d_ssm + bc_width) * config.mamba_conv_kernel if mamba_heads else 0.0,
    }
    if mamba_heads:
        flops.update(ssd_scan_flops(L, mamba_heads, config.mamba_head_dim, config.mamba_state_dim,
                                    config.mamba_num_groups, config.mamba_chunk_size))
    else:
        flops.update(dict.fromkeys(ssd_scan_flops(1, 1, 1, 1, 1, 1), 0.0))
    return flops


def forward_flops_breakdown(config: FalconH1Config, seq_length: int, causal_half: bool = True) -> dict[str, float]:
    """Forward FLOPs of the whole model over one sequence, by component (layers summed)."""
    per_layer = layer_forward_flops(config, seq_length, causal_half)
    flops = {name: value * config.num_layers for name, value in per_layer.items()}
    flops["lm_head"] = linear_flops(seq_length, config.hidden_size, config.padded_vocab_size)
    return flops


def training_flops_breakdown(config: FalconH1Config, global_batch_size: int, seq_length: int,
                             causal_half: bool = True) -> dict[str, float]:
    """Model FLOPs of one training step (forward + backward over global_batch_size sequences of
    seq_length tokens), by component, plus "total"."""
    forward = forward_flops_breakdown(config, seq_length, causal_half)
    flops = {name: TRAINING_TO_FORWARD * global_batch_size * value for name, value in forward.items()}
    flops["total"] = sum(flops.values())
    return flops


def training_flops_per_step(config: FalconH1Config, global_batch_size: int, seq_length: int) -> float:
    """Model FLOPs of one training step over the global batch (all data-parallel ranks together)."""
    return training_flops_breakdown(config, global_batch_size, seq_length)["total"]


def model_flops_per_token(config: FalconH1Config, seq_length: int) -> float:
    """Training model FLOPs per token at this sequence length."""
    return training_flops_per_step(config, 1, seq_length) / seq_length


# Groups of breakdown keys, for the CLI's summary columns.
COMPONENT_GROUPS = {
    "GEMMs": ("in_proj_attention", "in_proj_ssm", "out_proj_attention", "out_proj_ssm", "mlp", "lm_head"),
    "attention core": ("attention_core",),
    "SSD scan": ("ssd_intra_chunk_scores", "ssd_intra_chunk_output", "ssd_chunk_states",
                 "ssd_state_passing", "ssd_state_output"),
    "conv1d": ("conv1d",),
}


def _gflops(value: float) -> str:
    return f"{value / 1e9:,.3f}"


def _print_breakdown(name: str, config: FalconH1Config, seq_length: int, global_batch_size: int) -> None:
    from falcon_h1.model.param_count import parameter_count

    step = training_flops_breakdown(config, global_batch_size, seq_length)
    tokens = global_batch_size * seq_length
    total = step["total"]
    params = parameter_count(config)["total"]
    print(f"{name}: {params / 1e6:,.1f}M parameters, seq length {seq_length}, "
          f"global batch {global_batch_size} ({tokens:,} tokens/step)")
    print(f"{'component':<24} {'GFLOP/token':>12} {'share':>7}")
    for key, value in step.items():
        if key != "total":
            print(f"{key:<24} {_gflops(value / tokens):>12} {100 * value / total:>6.2f}%")
    print(f"{'total':<24} {_gflops(total / tokens):>12}")
    print(f"training FLOPs per step: {total:.4e}  (6 x parameters x tokens: {6.0 * params * tokens:.4e})")


def _print_table(names: list[str], seq_length: int) -> None:
    from falcon_h1.model.param_count import parameter_count
    from falcon_h1.model.presets import preset_config

    columns = list(COMPONENT_GROUPS)
    print(f"Training (forward + backward) model GFLOP per token at sequence length {seq_length}:\n")
    print("| preset | params | " + " | ".join(columns) + " | total | 6N | total / 6N |")
    print("|---" * (len(columns) + 5) + "|")
    for name in names:
        config = preset_config(name)
        step = training_flops_breakdown(config, 1, seq_length)
        per_token = {group: sum(step[k] for k in keys) / seq_length for group, keys in COMPONENT_GROUPS.items()}
        total = step["total"] / seq_length
        six_n = 6.0 * parameter_count(config)["total"]
        cells = [_gflops(per_token[group]) for group in columns]
        print(f"| {name} | {parameter_count(config)['total'] / 1e6:,.1f}M | " + " | ".join(cells)
              + f" | **{_gflops(total)}** | {_gflops(six_n)} | {total / six_n:.3f} |")


def main(argv: list[str] | None = None) -> None:
    import warnings

    with warnings.catch_warnings():  # Megatron's import-time notices about optional packages
        warnings.simplefilter("ignore")
        from falcon_h1.model.presets import PRESETS, preset_config

    parser = argparse.ArgumentParser(
        prog="python -m falcon_h1.training.flops",
        description="Model FLOPs of a Falcon-H1 training step (forward + backward = 3 x forward; "
                    "causal attention counted as half the score matrix). See docs/flops.md.")
    parser.add_argument("--preset", choices=[*PRESETS, "all"], default="all",
                        help="a released shape (breakdown by component), or 'all' for a table of "
                             "every preset (default)")
    parser.add_argument("--seq-length", type=int, default=4096, help="tokens per sequence (default 4096)")
    parser.add_argument("--global-batch-size", type=int, default=1,
                        help="sequences per step, for the per-step total (default 1)")
    args = parser.parse_args(argv)
    if args.preset == "all":
        _print_table(list(PRESETS), args.seq_length)
    else:
        _print_breakdown(args.preset, preset_config(args.preset), args.seq_length, args.global_batch_size)


if __name__ == "__main__":
    main()
