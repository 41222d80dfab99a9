"""Tile shapes for the Triton causal conv1d + SiLU (falcon_h1/kernels/conv1d_triton.py): each of its
three kernels timed over tile shapes and warp counts at a preset's conv width, on the GPU.

    python -m falcon_h1.benchmarks.conv_tiles --presets 1.5b 7b --seq-length 8192

The kernels are memory-bound, so each time is also given as the bandwidth it reaches (bytes the
kernel must move / time). conv1d_triton's FORWARD_TILE, GRAD_TILE and DX_TILE come from this sweep
(docs/performance.md keeps its output). Times: triton.testing.do_bench (L2 flushed, median).
"""

from __future__ import annotations

import argparse
import itertools
import sys
import time

import torch

from falcon_h1.benchmarks.kernels import mamba_shape
from falcon_h1.kernels import conv1d_triton

TILES = [dict(BLOCK_L=block_l, BLOCK_C=block_c, num_warps=warps)
         for block_l, block_c, warps in itertools.product((16, 32, 64, 128), (64, 128, 256), (4, 8))]


def sweep(preset: str, seq_length: int, batch: int = 1) -> list[dict]:
    """One row per (kernel, tile): ms and GB/s, at the preset's conv channels, bf16."""
    from triton.testing import do_bench

    shape = mamba_shape(preset)
    channels, width = shape["d_ssm"] + 2 * shape["groups"] * shape["state"], shape["conv_width"]
    # The mixer's input: a [s, b, channels] slice of a wider in-projection output seen as [b, channels, s].
    proj = torch.randn(seq_length, batch, channels + 8, device="cuda", dtype=torch.bfloat16)
    x = proj[..., :channels].permute(1, 2, 0)
    w = torch.randn(channels, width, device="cuda", dtype=torch.bfloat16) * 0.5
    bias = torch.randn(channels, device="cuda", dtype=torch.bfloat16) * 0.1
    dy = torch.randn(batch, seq_length, channels, device="cuda", dtype=torch.bfloat16).transpose(1, 2)
    g, _ = conv1d_triton.conv_silu_grad_g(x, w, bias, None, dy)
    elements = batch * seq_length * channels * x.element_size()
    kernels = {  # name -> (launch for a tile, bytes it must move: inputs read once, outputs written once)
        "forward": (lambda tile: conv1d_triton.conv_silu_forward(x, w, bias, None, tile), 2 * elements),
        "grad_g": (lambda tile: conv1d_triton.conv_silu_grad_g(x, w, bias, None, dy, tile), 3 * elements),
        "grad_x": (lambda tile: conv1d_triton.conv_grad_x(g, w, None, tile), 2 * elements),
    }
    rows = []
    for name, (launch, moved) in kernels.items():
        for tile in TILES:
            try:
                ms = do_bench(lambda: launch(tile), warmup=10, rep=50)
            except Exception as error:  # a tile the compiler refuses (registers, shared memory)
                print(f"{preset} {name} {tile}: {type(error).__name__}", flush=True)
                continue
            rows.append(dict(preset=preset, seq_length=seq_length, channels=channels, kernel=name, tile=tile, ms=ms,
                             gb_per_s=moved / ms / 1e6))
        best = min((r for r in rows if r["kernel"] == name and r["preset"] == preset), key=lambda r: r["ms"])
        current = next(r for r in rows if r["kernel"] == name and r["preset"] == preset
                       and r["tile"] == _current_tile(name))
        print(f"{preset} {seq_length} {channels} ch {name}: best {best['tile']} {best['ms'] * 1e3:.1f} us "
              f"({best['gb_per_s']:.0f} GB/s); current {current['tile']} {current['ms'] * 1e3:.1f} us", flush=True)
    return rows


def _current_tile(kernel: str) -> dict:
    return {"forward": conv1d_triton.FORWARD_TILE, "grad_g": conv1d_triton.GRAD_TILE,
            "grad_x": conv1d_triton.DX_TILE}[kernel]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m falcon_h1.benchmarks.conv_tiles", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--presets", nargs="+", default=["1.5b", "7b"])
    parser.add_argument("--seq-length", type=int, default=8192)
    parser.add_argument("--batch", type=int, default=1)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("this benchmark needs a CUDA GPU", file=sys.stderr)
        return 2
    print(f"{torch.cuda.get_device_name()}, {time.strftime('%Y-%m-%d')}, bf16, batch {args.batch}")
    for preset in args.presets:
        sweep(preset, args.seq_length, args.batch)
    return 0


if __name__ == "__main__":
    sys.exit(main())
