"""Self-check: build small Falcon-H1 models, run them, and compare them with transformers.

    python -m falcon_h1.selfcheck [--seq-len 64] [--batch 2]

For a few random configurations (different head dims, SSM groups, gated norm, tied embeddings,
biases, attention:Mamba ratios), copies random weights from transformers' FalconH1ForCausalLM into
this project's Megatron Core model, runs both forward and backward in float32 and prints the
relative error of the logits and of the worst parameter gradient. On a CUDA machine with the GPU
kernels installed it also compares the Triton SSD path with the pure-torch path. Exits non-zero
if any check is outside its tolerance.
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings

LOGITS_TOLERANCE = 1e-5
GRAD_TOLERANCE = 1e-4

CASES = {
    "head_dim != hidden/heads": dict(),
    "2 SSM groups + gated norm, tied, biases": dict(
        mamba_n_groups=2, mamba_rms_norm=True, mamba_norm_before_gate=False, tie_word_embeddings=True,
        attention_bias=True, mamba_proj_bias=True, projectors_bias=True, mlp_bias=True),
    "6:2 GQA, norm before gate, dt limit": dict(
        num_attention_heads=6, num_key_value_heads=2, mamba_n_groups=2, mamba_rms_norm=True,
        mamba_norm_before_gate=True, mamba_conv_bias=False, time_step_limit=(0.0, 0.5), mamba_chunk_size=8),
    "Mamba-heavy 2:6, padded vocab": dict(
        num_attention_heads=2, num_key_value_heads=1, head_dim=32, mamba_n_heads=6, mamba_d_head=16,
        mamba_d_state=32, vocab_size=301),
}


def _gpu_kernel_check(seq_len: int) -> tuple[str, bool] | None:
    """The GPU kernels (the project's Triton SSD, mamba_ssm's gated norm, causal-conv1d) vs the
    torch path, in a float32 model on the GPU; the SSD's float32 dots are TF32x3."""
    import torch

    from falcon_h1.kernels import _importable
    from falcon_h1.parity import build_from_hf, make_hf_model, random_tokens, relative_error

    if not torch.cuda.is_available() or not _importable("falcon_h1.kernels.mamba_ssm_triton"):
        return None
    hf = make_hf_model(3, mamba_rms_norm=True, mamba_n_groups=2)
    tokens = random_tokens(hf.config, 2, seq_len, seed=0).cuda()
    logits = {}
    for backend in ("torch", "gpu"):
        model = build_from_hf(hf, kernel_backend=backend).cuda()
        with torch.no_grad():
            logits[backend] = model(tokens).float()
    error = relative_error(logits["gpu"], logits["torch"])
    return f"GPU kernels vs torch path (float32 model, logits): {error:.2e}", error < 1e-2


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m falcon_h1.selfcheck", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seq-len", type=int, default=64, help="tokens per sequence (default 64)")
    parser.add_argument("--batch", type=int, default=2, help="sequences per batch (default 2)")
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore")

    from falcon_h1.single_process import single_process_megatron

    single_process_megatron(seed=1234)
    from falcon_h1.model.param_count import parameter_count
    from falcon_h1.model.presets import PRESETS, preset_config
    from falcon_h1.parity import build_from_hf, compare_with_hf, make_hf_model, random_tokens

    print("Falcon-H1 self-check: this project's Megatron Core model vs transformers' FalconH1ForCausalLM")
    print(f"float32, batch {args.batch} x {args.seq_len} tokens, random weights; tolerances: "
          f"logits {LOGITS_TOLERANCE:g}, gradients {GRAD_TOLERANCE:g} (relative)\n")
    print(f"{'configuration':42s} {'params':>8s} {'logits err':>11s} {'worst grad err':>15s}  result")
    ok = True
    for seed, (name, overrides) in enumerate(CASES.items()):
        start = time.perf_counter()
        hf = make_hf_model(seed, **overrides)
        model = build_from_hf(hf)
        report = compare_with_hf(hf, model, random_tokens(hf.config, args.batch, args.seq_len, seed), seed)
        passed = report.logits_error <= LOGITS_TOLERANCE and report.max_grad_error <= GRAD_TOLERANCE
        ok &= passed
        params = sum(p.numel() for p in hf.parameters())
        print(f"{name:42s} {params:8d} {report.logits_error:11.2e} {report.max_grad_error:15.2e}  "
              f"{'ok' if passed else 'FAIL (' + report.worst_grad + ')'}  [{time.perf_counter() - start:.1f}s]")

    gpu = _gpu_kernel_check(args.seq_len)
    if gpu is not None:
        print(f"\n{gpu[0]}  {'ok' if gpu[1] else 'FAIL'}")
        ok &= gpu[1]

    print("\nReleased shapes (parameters counted from the config, nothing allocated):")
    for name in PRESETS:
        print(f"  {name:10s} {parameter_count(preset_config(name))['total'] / 1e9:7.3f} B")
    print("\nself-check " + ("passed" if ok else "FAILED"))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
