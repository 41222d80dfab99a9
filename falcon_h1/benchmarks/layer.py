"""Time one Falcon-H1 layer (forward + backward) on a GPU and split the time by component.

    python -m falcon_h1.benchmarks.layer --preset 1.5b --micro-batch 2 --seq-len 4096

Builds one TransformerLayer (HybridMixer + SwiGLU MLP) of the preset's shape in bf16, times
forward+backward with CUDA events (median of repeats after warm-up), then profiles the same step
and sums GPU kernel time by component: GEMMs, attention, SSD scan, conv1d, gated norm, the rest
(elementwise, norms, copies). Kernel time not covered by the step's wall time is launch overhead.
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings

from falcon_h1.kernels import BACKENDS

CATEGORIES = (  # first match wins
    ("attention", ("flash", "fmha", "attention", "cudnn")),
    ("ssd_scan", ("_chunk_scan", "_chunk_state", "_state_passing", "_bmm_chunk", "_chunk_cumsum", "ssd")),
    ("conv1d", ("causal_conv1d", "conv1d", "conv_depthwise")),
    ("gated_norm", ("_layer_norm_fwd", "_layer_norm_bwd", "rmsnorm")),
    ("gemm", ("gemm", "xmma", "nvjet", "cutlass", "sm90_", "sm80_")),
)


def categorize(kernel_name: str) -> str:
    name = kernel_name.lower()
    for category, patterns in CATEGORIES:
        if any(p in name for p in patterns):
            return category
    return "rest"


def gemm_flops(config, tokens: int) -> float:
    """Forward+backward FLOPs of the layer's four GEMMs (backward = 2x forward)."""
    from falcon_h1.model.layout import mixer_layout

    layout = mixer_layout(config, 1, 0)
    h, ffn = config.hidden_size, config.ffn_hidden_size
    macs = h * layout.in_proj_rows + layout.out_proj_cols * h + h * 2 * ffn + ffn * h
    return 3 * 2 * tokens * macs


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m falcon_h1.benchmarks.layer", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="1.5b", help="released shape to take the layer from (default 1.5b)")
    parser.add_argument("--micro-batch", type=int, default=2)
    parser.add_argument("--seq-len", type=int, default=4096)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--kernel-backend", default="auto", choices=BACKENDS)
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore")

    import torch
    import torch.distributed as dist
    from megatron.core import parallel_state
    from megatron.core.transformer.spec_utils import build_module

    from falcon_h1.benchmarks.timing import cuda_median_ms
    from falcon_h1.compat.cpu import model_parallel_manual_seed
    from falcon_h1.model.presets import preset_config
    from falcon_h1.model.rotary import RotaryEmbedding
    from falcon_h1.model.specs import local_layer_spec

    if not torch.cuda.is_available():
        print("this benchmark needs a CUDA GPU", file=sys.stderr)
        return 2
    dist.init_process_group("nccl", init_method="tcp://127.0.0.1:29531", rank=0, world_size=1)
    parallel_state.initialize_model_parallel()
    model_parallel_manual_seed(0)
    config = preset_config(args.preset, num_layers=1, bf16=True, params_dtype=torch.bfloat16,
                           kernel_backend=args.kernel_backend)
    layer = build_module(local_layer_spec(), config=config, layer_number=1).cuda()
    s, b, h = args.seq_len, args.micro_batch, config.hidden_size
    x = torch.randn(s, b, h, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    rope = RotaryEmbedding(config.kv_channels, config.rotary_base)(s, x.device)
    grad = torch.randn_like(x)

    def step():
        out, _ = layer(x, attention_mask=None, rotary_pos_emb=rope)
        out.backward(grad)

    step_ms = cuda_median_ms(step, args.repeats, args.warmup)

    profiled = 5
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(profiled):
            step()
        torch.cuda.synchronize()
    parts = {name: 0.0 for name, _ in CATEGORIES} | {"rest": 0.0}
    rest_kernels = []
    for event in prof.key_averages():
        device_ms = (getattr(event, "device_time_total", None) or getattr(event, "cuda_time_total", 0.0)) / 1e3 / profiled
        if device_ms:
            category = categorize(event.key)
            parts[category] += device_ms
            if category == "rest":
                rest_kernels.append((device_ms, event.key[:90]))
    kernel_ms = sum(parts.values())
    tokens = s * b
    result = {
        "card": torch.cuda.get_device_name(), "preset": args.preset, "micro_batch": b, "seq_len": s,
        "kernel_backend": args.kernel_backend, "step_ms": step_ms, "tokens_per_s": tokens / step_ms * 1e3,
        "parts_ms": parts, "kernel_ms": kernel_ms, "launch_overhead_ms": max(step_ms - kernel_ms, 0.0),
        "gemm_tflops": gemm_flops(config, tokens) / (parts["gemm"] * 1e-3) / 1e12 if parts["gemm"] else None,
        "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30,
        "top_rest_kernels": sorted(rest_kernels, reverse=True)[:8],
    }
    print(f"Falcon-H1 {args.preset} layer, bf16, {b} x {s} tokens, forward+backward on {result['card']}")
    print(f"  step (median of {args.repeats}): {step_ms:.2f} ms  ({result['tokens_per_s'] / 1e3:.1f}k tokens/s)")
    for name, ms in parts.items():
        print(f"  {name:12s} {ms:7.2f} ms  {100 * ms / step_ms:5.1f}%")
    print(f"  launch/idle  {result['launch_overhead_ms']:7.2f} ms")
    for ms, name in result["top_rest_kernels"]:
        print(f"      rest: {ms:6.3f} ms  {name}")
    if result["gemm_tflops"]:
        print(f"  GEMMs at {result['gemm_tflops']:.0f} TFLOP/s; peak memory {result['peak_memory_gib']:.2f} GiB")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
