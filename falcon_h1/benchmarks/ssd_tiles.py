"""Tiles for the project's Triton SSD scan (falcon_h1/kernels/ssd_triton.py), against mamba_ssm's
kernels, at a preset's Mamba shape, on the GPU.

    python -m falcon_h1.benchmarks.ssd_tiles --presets 1.5b 7b --seq-length 8192

Every tile is first checked against the float32 torch scan on the same bf16 inputs (relative
error of y and of every input gradient), then its forward+backward is timed replayed from a CUDA
graph, with each kernel's share (torch profiler). ssd_triton.TILE comes from this sweep
(docs/performance.md keeps its output).
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
from collections import defaultdict

import torch

from falcon_h1.benchmarks.kernels import forward_backward, mamba_shape, ssd_implementations, ssd_inputs
from falcon_h1.benchmarks.timing import graphed_median_ms
from falcon_h1.kernels import ssd_triton
from falcon_h1.parity import relative_error

TILES = [dict(chunk=chunk, block_n=block_n, heads=8, warps=warps, stages=stages)
         for chunk, block_n, warps, stages in itertools.product((64, 128), (64, 128), (4, 8), (2, 3))]


def kernel_times_ms(step) -> dict[str, float]:
    """GPU milliseconds of each kernel one step() runs (median of 5 profiled calls)."""
    step()
    torch.cuda.synchronize()
    per_kernel = defaultdict(list)
    for _ in range(5):
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            step()
            torch.cuda.synchronize()
        for e in prof.key_averages():
            if e.device_type == torch.autograd.DeviceType.CUDA:
                per_kernel[e.key[:60]].append(e.self_device_time_total / 1e3)
    return {k: sorted(v)[len(v) // 2] for k, v in sorted(per_kernel.items(), key=lambda kv: -max(kv[1]))}


def measure(fn, inputs, shape, grad, reference) -> dict:
    y, grads = forward_backward(fn, inputs, shape, grad)
    error = max([relative_error(y, reference[0])] + [relative_error(grads[k], reference[1][k]) for k in inputs])
    leaves = {k: v.detach().clone().requires_grad_(True) for k, v in inputs.items()}

    def step():
        return torch.autograd.grad(fn(**leaves, s=shape), list(leaves.values()), grad, allow_unused=True)

    return dict(error=error, ms=graphed_median_ms(step, 20), kernels=kernel_times_ms(step))


def sweep(preset: str, seq_length: int, batch: int, tiles: list[dict]) -> list[dict]:
    shape = mamba_shape(preset)
    inputs = ssd_inputs(shape, batch, seq_length)
    grad = torch.randn(batch, seq_length, shape["heads"], shape["head_dim"], device="cuda", dtype=torch.bfloat16)
    reference = forward_backward(ssd_implementations()["torch"], {k: v.float() for k, v in inputs.items()}, shape,
                                 grad.float())
    impls = ssd_implementations()
    rows = []
    if "mamba_ssm" in impls:
        rows.append(dict(implementation="mamba_ssm", **measure(impls["mamba_ssm"], inputs, shape, grad, reference)))
        print(f"{preset} {batch}x{seq_length} mamba_ssm: {rows[-1]['ms']:.3f} ms, error {rows[-1]['error']:.1e}",
              flush=True)
    for tile in tiles:
        def ours(x, dt, A, B, C, D, dt_bias, s, tile=tile):
            return ssd_triton.ssd_scan_triton(x, dt, A, B, C, D=D, dt_bias=dt_bias, dt_limit=s["dt_limit"], tile=tile)
        try:
            row = dict(implementation="triton", tile=tile, **measure(ours, inputs, shape, grad, reference))
        except Exception as error:  # a tile the compiler refuses (registers, shared memory)
            print(f"{preset} {tile}: {type(error).__name__}: {str(error)[:200]}", flush=True)
            continue
        rows.append(row)
        print(f"{preset} {batch}x{seq_length} {tile}: {row['ms']:.3f} ms, error {row['error']:.1e}; "
              + ", ".join(f"{k.split('(')[0][:24]} {v:.3f}" for k, v in row["kernels"].items()), flush=True)
    for row in rows:
        row.update(preset=preset, seq_length=seq_length, batch=batch, **shape)
    best = min((r for r in rows if r["implementation"] == "triton"), key=lambda r: r["ms"])
    print(f"{preset}: best {best['tile']} {best['ms']:.3f} ms", flush=True)
    for r in rows[:1] + [best]:
        print(f"  {r['implementation']} kernels: " + ", ".join(f"{k} {v:.3f}" for k, v in r["kernels"].items()))
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m falcon_h1.benchmarks.ssd_tiles", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--presets", nargs="+", default=["1.5b", "7b"])
    parser.add_argument("--seq-length", type=int, default=8192)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--tiles", type=json.loads, help="a JSON list of tiles to take instead of the sweep's")
    parser.add_argument("--json", help="also write the rows here")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("this benchmark needs a CUDA GPU", file=sys.stderr)
        return 2
    print(f"{torch.cuda.get_device_name()}, {time.strftime('%Y-%m-%d')}, bf16, batch {args.batch}")
    rows = [r for preset in args.presets for r in sweep(preset, args.seq_length, args.batch, args.tiles or TILES)]
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
