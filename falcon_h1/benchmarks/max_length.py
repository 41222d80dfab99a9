"""The longest sequence a preset trains at on this machine, found by doubling until it runs out of memory.

    python -m falcon_h1.benchmarks.max_length --preset 1.5b --start 8192 --max 131072
    python -m falcon_h1.benchmarks.max_length --preset 7b --recompute core_attn ssd_scan --start 16384
    python -m falcon_h1.benchmarks.max_length --preset 1.5b --recompute full --start 32768
    python -m falcon_h1.benchmarks.max_length --preset 1.5b --nproc 4 --cp 4 --start 65536 --max 131072

Each length runs the training-step benchmark (falcon_h1/benchmarks/step.py: the real training
loop, micro-batch 1, warm-up + measured steps) in a fresh process, under torchrun when --nproc > 1,
so that running out of memory at one length cannot leave the next run a fragmented allocator or a
half-initialised process group. The search stops at the first length that runs out of memory, or
at --max. It prints each length's outcome (peak memory, tokens/s per GPU) and the largest that
trained; --json writes the rows.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

from falcon_h1.benchmarks.step import RECOMPUTE_CHOICES

OUT_OF_MEMORY_MARKERS = ("OutOfMemoryError", "CUDA out of memory", "CUBLAS_STATUS_ALLOC_FAILED")


def try_length(seq_length: int, args) -> dict:
    """Train `args.steps` steps at `seq_length`; the step benchmark's row, or an outcome."""
    with tempfile.TemporaryDirectory(prefix="falcon_h1_maxlen_") as tmp:
        out = os.path.join(tmp, "row.json")
        flags = ["--preset", args.preset, "--seq-lengths", str(seq_length), "--steps", str(args.steps),
                 "--warmup", str(args.warmup), "--no-compare", "--json", out, "--tp", str(args.tp), "--cp", str(args.cp)]
        if args.tp > 1:
            flags.append("--sp")
        if args.recompute:
            flags += ["--recompute", *args.recompute]
        if args.num_layers:
            flags += ["--num-layers", str(args.num_layers)]
        if args.cuda_graphs:
            flags.append("--cuda-graphs")
        launcher = [sys.executable]
        if args.nproc > 1:
            launcher += ["-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={args.nproc}"]
        cmd = launcher + ["-m", "falcon_h1.benchmarks.step", *flags]
        started = time.perf_counter()
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
        except subprocess.TimeoutExpired:
            return dict(seq_length=seq_length, outcome="timeout", seconds=args.timeout)
        seconds = time.perf_counter() - started
        if proc.returncode == 0 and os.path.exists(out):
            with open(out) as f:
                row = json.load(f)[0]
            return dict(seq_length=seq_length, outcome="trained", seconds=seconds,
                        peak_memory_gib=row["peak_memory_gib"], tokens_per_sec_per_gpu=row["tokens_per_sec_per_gpu"],
                        step_time_s=row["step_time_s"], device=row["device"], layout=row["layout"])
        output = proc.stdout + proc.stderr
        outcome = "out of memory" if any(m in output for m in OUT_OF_MEMORY_MARKERS) else "failed"
        return dict(seq_length=seq_length, outcome=outcome, seconds=seconds, output_tail=output[-3000:])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m falcon_h1.benchmarks.max_length", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="1.5b", help="model shape (falcon_h1.model.presets), default 1.5b")
    parser.add_argument("--start", type=int, default=8192, help="first sequence length (default 8192)")
    parser.add_argument("--max", type=int, default=131072, help="stop after this length (default 131072)")
    parser.add_argument("--recompute", nargs="+", choices=RECOMPUTE_CHOICES, default=[],
                        help="recompute in backward: the attention and/or Mamba cores, or whole layers (full)")
    parser.add_argument("--cuda-graphs", action="store_true",
                        help="replay each layer from CUDA graphs (cuda_graph_impl=local; its pool changes the peak)")
    parser.add_argument("--nproc", type=int, default=1, help="processes (GPUs); > 1 runs under torchrun")
    parser.add_argument("--tp", type=int, default=1, help="tensor parallel size (with sequence parallelism)")
    parser.add_argument("--cp", type=int, default=1, help="context parallel size")
    parser.add_argument("--num-layers", type=int, help="override the preset's layer count")
    parser.add_argument("--steps", type=int, default=3, help="measured steps per length")
    parser.add_argument("--warmup", type=int, default=2, help="steps before them")
    parser.add_argument("--timeout", type=int, default=1800, help="seconds allowed per length")
    parser.add_argument("--json", help="write the rows here")
    args = parser.parse_args(argv)
    if args.start < 1 or args.max < args.start:
        parser.error(f"need 1 <= --start ({args.start}) <= --max ({args.max})")

    rows, length = [], args.start
    while length <= args.max:
        row = try_length(length, args)
        rows.append(row)
        if row["outcome"] == "trained":
            peak = "-" if row["peak_memory_gib"] is None else f"{row['peak_memory_gib']:.1f}"  # None on CPU
            detail = f"peak {peak} GiB, {row['tokens_per_sec_per_gpu']:.0f} tokens/s/GPU"
        else:
            detail = row.get("output_tail", "")[-600:]
        print(f"{args.preset} at {length} tokens: {row['outcome']} ({row['seconds']:.0f} s) {detail}", flush=True)
        if row["outcome"] != "trained":
            break
        length *= 2
    trained = [r["seq_length"] for r in rows if r["outcome"] == "trained"]
    print(f"largest trained sequence: {max(trained) if trained else 'none'} tokens "
          f"({args.preset}, TP={args.tp}, CP={args.cp}, {args.nproc} process(es), recompute {args.recompute or 'none'}"
          f"{', CUDA graphs' if args.cuda_graphs else ''})")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)
    return 0 if trained else 1


if __name__ == "__main__":
    sys.exit(main())
