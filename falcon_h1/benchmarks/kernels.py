"""Check, then time, the Mamba kernels at Falcon-H1 shapes: the SSD scan and the causal conv1d + SiLU.

    python -m falcon_h1.benchmarks.kernels --presets 0.5b 1.5b 7b 34b --seq-lengths 4096 8192

For each preset's Mamba shape (heads, head dim, state, groups, chunk) and length, every available
implementation first runs forward and backward on fresh random inputs and is compared with the
float32 torch reference on the same inputs (relative norm error of the output and of every input
gradient); then its forward+backward is timed (CUDA events, median of repeats after warm-up).
SSD: the project's Triton scan (falcon_h1/kernels/ssd_triton.py), mamba_ssm's Triton kernels and
the chunked torch scan. (flash-linear-attention's chunked
simple-GLA kernels compute the same scan, but fla-core 0.6 refuses their backward on Hopper with
Triton < 3.7.1, which gives wrong gradients there; the GPU image has Triton 3.6.)
Conv: the causal-conv1d package's CUDA kernel, the project's Triton kernel
(falcon_h1/kernels/conv1d_triton.py) and torch's conv1d + SiLU, on the channels-last view of the
in-projection output the mixer passes, with a channels-last output gradient as the SSD scan returns it.
Forward+backward hands the input gradients on (torch.autograd.grad), as the mixer does, rather
than adding them into leaf tensors' .grad. It is timed launched from Python, replayed from a CUDA
graph, and as the summed durations of its kernels (torch profiler; GPU time without launch gaps,
also for kernels a graph cannot capture).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from functools import partial

import torch

from falcon_h1.benchmarks.timing import cuda_median_ms, graphed_median_ms, profiled_kernel_ms
from falcon_h1.kernels import _importable, causal_conv1d, ssd_scan
from falcon_h1.kernels.conv1d_triton import causal_conv1d_triton
from falcon_h1.kernels.ssd import discretize_dt, ssd_scan_torch
from falcon_h1.parity import relative_error


def mamba_shape(preset: str) -> dict:
    from falcon_h1.model.presets import preset_config

    return mamba_shape_of(preset_config(preset, num_layers=1))


def mamba_shape_of(c) -> dict:
    """The Mamba kernel shape of a FalconH1Config (no tensor parallelism)."""
    return dict(heads=c.mamba_num_heads, head_dim=c.mamba_head_dim, state=c.mamba_state_dim,
                groups=c.mamba_num_groups, chunk=c.mamba_chunk_size, d_ssm=c.d_ssm, conv_width=c.mamba_conv_kernel,
                dt_limit=tuple(c.mamba_time_step_limit))


def ssd_implementations() -> dict:
    """name -> fn(x, dt_raw, A, B, C, D, dt_bias, shape) -> y, each from the raw dt the mixer has."""
    impls = {"triton": lambda x, dt, A, B, C, D, dt_bias, s: ssd_scan(
        x, dt, A, B, C, chunk_size=s["chunk"], D=D, dt_bias=dt_bias, dt_limit=s["dt_limit"], backend="triton")}
    if _importable("falcon_h1.kernels.mamba_ssm_triton"):
        impls["mamba_ssm"] = lambda x, dt, A, B, C, D, dt_bias, s: ssd_scan(
            x, dt, A, B, C, chunk_size=s["chunk"], D=D, dt_bias=dt_bias, dt_limit=s["dt_limit"], backend="mamba_ssm")
    impls["torch"] = lambda x, dt, A, B, C, D, dt_bias, s: ssd_scan_torch(
        x, discretize_dt(dt, dt_bias, s["dt_limit"]), A, B, C, s["chunk"], D=D)
    return impls


def ssd_inputs(shape: dict, batch: int, seq: int, dtype=torch.bfloat16, device="cuda") -> dict:
    """Random inputs at the scale the mixer feeds the scan (conv outputs after SiLU are O(1))."""
    h, p, n, g = shape["heads"], shape["head_dim"], shape["state"], shape["groups"]
    gen = torch.Generator(device="cpu").manual_seed(0)

    def rand(*size, scale=1.0):
        return (torch.randn(*size, generator=gen) * scale).to(device=device, dtype=dtype)

    dt_true = torch.exp(torch.rand(h, generator=gen) * (torch.log(torch.tensor(0.1)) - torch.log(torch.tensor(1e-3)))
                        + torch.log(torch.tensor(1e-3)))
    return dict(x=rand(batch, seq, h, p), dt=rand(batch, seq, h, scale=0.5),
                A=-torch.empty(h).uniform_(1.0, 16.0, generator=gen).to(device),
                B=rand(batch, seq, g, n, scale=n ** -0.5), C=rand(batch, seq, g, n, scale=n ** -0.5),
                D=torch.ones(h, device=device), dt_bias=(dt_true + torch.log(-torch.expm1(-dt_true))).to(device))


def forward_backward(fn, inputs: dict, shape: dict, grad: torch.Tensor):
    leaves = {k: v.detach().clone().requires_grad_(True) for k, v in inputs.items()}
    y = fn(**leaves, s=shape)
    y.backward(grad)
    return y.detach(), {k: v.grad for k, v in leaves.items()}


def bench_ssd(shape: dict, batch: int, seq: int, check: bool = True, repeats: int = 20) -> list[dict]:
    inputs = ssd_inputs(shape, batch, seq)
    grad = torch.randn(batch, seq, shape["heads"], shape["head_dim"], device="cuda", dtype=torch.bfloat16)
    reference = None
    if check:  # float32 reference on the same (bf16-valued) inputs
        y_ref, g_ref = forward_backward(ssd_implementations()["torch"],
                                        {k: v.float() for k, v in inputs.items()}, shape, grad.float())
        reference = (y_ref, g_ref)
    rows = []
    for name, fn in ssd_implementations().items():
        row = dict(kernel="ssd_scan", implementation=name, batch=batch, seq_length=seq, **shape)
        if check:
            y, grads = forward_backward(fn, inputs, shape, grad)
            row["error"] = {"y": relative_error(y, reference[0]),
                            **{f"d{k}": relative_error(grads[k], reference[1][k]) for k in inputs}}
            del y, grads
        leaves = {k: v.detach().clone().requires_grad_(True) for k, v in inputs.items()}

        def step():  # the gradients flow on, as in the mixer, instead of adding into leaves' .grad
            return torch.autograd.grad(fn(**leaves, s=shape), list(leaves.values()), grad, allow_unused=True)

        row["forward_ms"] = cuda_median_ms(lambda: fn(**leaves, s=shape), repeats)
        _time_forward_backward(row, step, repeats)
        rows.append(row)
        torch.cuda.empty_cache()
    return rows


def _time_forward_backward(row: dict, step, repeats: int) -> None:
    """Launched (CUDA events, CPU launch gaps included), replayed from a CUDA graph, and the
    summed kernel durations (for what a graph cannot capture)."""
    row["forward_backward_ms"] = cuda_median_ms(step, repeats)
    row["forward_backward_graphed_ms"] = graphed_median_ms(step, repeats)
    row["forward_backward_kernels_ms"] = profiled_kernel_ms(step)


def bench_conv(shape: dict, batch: int, seq: int, check: bool = True, repeats: int = 20) -> list[dict]:
    channels = shape["d_ssm"] + 2 * shape["groups"] * shape["state"]
    gen = torch.Generator(device="cpu").manual_seed(1)
    # The mixer's input: a [s, b, channels] slice of the in-projection output seen as [b, channels, s].
    proj = torch.randn(seq, batch, channels + 8, generator=gen).to("cuda", torch.bfloat16)
    x = proj[..., :channels].permute(1, 2, 0)
    weight = (torch.randn(channels, 1, shape["conv_width"], generator=gen) * 0.5).to("cuda", torch.bfloat16)
    bias = (torch.randn(channels, generator=gen) * 0.1).to("cuda", torch.bfloat16)
    # The gradient arrives channels-last too: the SSD scan reads the output as [b, s, channels].
    grad = torch.randn(batch, seq, channels, device="cuda", dtype=torch.bfloat16).transpose(1, 2)
    impls = {"triton": causal_conv1d_triton, "torch": partial(causal_conv1d, backend="torch")}
    if _importable("causal_conv1d"):
        impls = {"causal_conv1d": partial(causal_conv1d, backend="gpu"), **impls}

    reference = None
    if check:
        leaves = [t.detach().float().requires_grad_(True) for t in (x, weight, bias)]
        out = impls["torch"](*leaves)
        out.backward(grad.float())
        reference = (out.detach(), [t.grad for t in leaves])
    rows = []
    for name, run in impls.items():
        row = dict(kernel="conv1d_silu", implementation=name, batch=batch, seq_length=seq, channels=channels,
                   width=shape["conv_width"])
        leaves = [t.detach().requires_grad_(True) for t in (x, weight, bias)]
        if check:
            out = run(*leaves)
            out.backward(grad)
            row["error"] = {"y": relative_error(out, reference[0]),
                            **{n: relative_error(t.grad, r) for n, t, r in zip(("dx", "dweight", "dbias"), leaves,
                                                                                  reference[1])}}
        row["forward_ms"] = cuda_median_ms(lambda: run(*leaves), repeats)
        _time_forward_backward(row, lambda: torch.autograd.grad(run(*leaves), leaves, grad), repeats)
        rows.append(row)
    return rows


def format_rows(rows: list[dict]) -> str:
    lines = ["| kernel | shape | tokens | implementation | fwd ms | fwd+bwd ms | fwd+bwd ms, graphed "
             "| fwd+bwd kernels ms | vs slowest | max rel. error (y, grads) |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["kernel"], r.get("preset"), r["batch"], r["seq_length"]), []).append(r)
    for (kernel, preset, batch, seq), group in groups.items():
        slowest = max(r["forward_backward_ms"] for r in group)
        for r in group:
            shape = (f"{preset}: {r['heads']}x{r['head_dim']}, state {r['state']}, {r['groups']} group(s)"
                     if kernel == "ssd_scan" else f"{preset}: {r['channels']} ch, width {r['width']}")
            error = f"{max(r['error'].values()):.1e}" if "error" in r else "-"
            graphed = r.get("forward_backward_graphed_ms")
            lines.append(f"| {kernel} | {shape} | {batch}x{seq} | {r['implementation']} | {r['forward_ms']:.3f} | "
                         f"{r['forward_backward_ms']:.3f} | {f'{graphed:.3f}' if graphed else '-'} | "
                         f"{r['forward_backward_kernels_ms']:.3f} | "
                         f"{slowest / r['forward_backward_ms']:.2f}x | {error} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m falcon_h1.benchmarks.kernels", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--presets", nargs="+", default=["1.5b", "7b"], help="Mamba shapes to take (default 1.5b 7b)")
    parser.add_argument("--seq-lengths", type=int, nargs="+", default=[4096, 8192])
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--kernels", nargs="+", choices=["ssd", "conv"], default=["ssd", "conv"],
                        help="which kernels to take (default both)")
    parser.add_argument("--no-check", action="store_true", help="skip the comparison with the float32 reference")
    parser.add_argument("--json", help="also write the rows here")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("this benchmark needs a CUDA GPU", file=sys.stderr)
        return 2
    rows = []
    for preset in args.presets:
        shape = mamba_shape(preset)
        for seq in args.seq_lengths:
            for bench in [{"ssd": bench_ssd, "conv": bench_conv}[name] for name in args.kernels]:
                for row in bench(shape, args.batch, seq, check=not args.no_check, repeats=args.repeats):
                    rows.append(dict(row, preset=preset))
                    print(json.dumps(rows[-1]), flush=True)
    print(f"\n{torch.cuda.get_device_name()}, {time.strftime('%Y-%m-%d')}, bf16 inputs; errors against float32 torch")
    print(format_rows(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
