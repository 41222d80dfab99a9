"""Peak host memory of checkpoint conversion, on a randomly filled checkpoint of a released shape.

    python -m falcon_h1.benchmarks.convert_memory --preset 0.5b --workdir /tmp/convert_bench

Writes a Hugging Face directory of the preset's shape with random bf16 weights (streamed, shards of
--shard-size), then runs `import` and `export` each in a fresh process that first loads the libraries, and
reports the resident memory before converting and its peak while converting (Linux VmHWM, reset
just before), next to the sizes of the largest tensor, a shard and the whole model. Prints a
table and writes JSON (--json).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

CHILD = r'''
import sys, time, warnings
warnings.filterwarnings("ignore")
import torch
from falcon_h1.convert.hf_export import export_hf_checkpoint
from falcon_h1.convert.hf_import import import_hf_checkpoint
from falcon_h1.convert.hf_modeling import hf_falcon_h1
hf_falcon_h1()  # transformers' Falcon-H1, which import also loads

def status(field):
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024

mode, source, target = sys.argv[1:4]
before = status("VmRSS")
open("/proc/self/clear_refs", "w").write("5")  # resets the peak (VmHWM) to the current RSS
start = time.perf_counter()
if mode == "import":
    import_hf_checkpoint(source, target, progress=False)
elif mode == "export":
    export_hf_checkpoint(source, target, max_shard_size=sys.argv[4], progress=False)
print("RESULT", before, status("VmHWM"), time.perf_counter() - start)
'''


def write_random_hf(directory: Path, preset: str, shard_size: str) -> dict:
    import torch

    from falcon_h1.convert.hf_import import expected_hf_shapes
    from falcon_h1.convert.safetensors_io import PlannedTensor, parse_size, write_hf_weights
    from falcon_h1.model.config import config_to_hf
    from falcon_h1.model.presets import preset_config

    directory.mkdir(parents=True)
    hf_config = dict(config_to_hf(preset_config(preset)), dtype="bfloat16")
    (directory / "config.json").write_text(json.dumps(hf_config, indent=2))
    shapes = expected_hf_shapes(directory)
    generator = torch.Generator().manual_seed(0)

    def random(shape):
        return lambda: (torch.randn(shape, generator=generator) * 0.02).to(torch.bfloat16)

    planned = [PlannedTensor(name, shape, torch.bfloat16, random(shape)) for name, shape in shapes.items()]
    write_hf_weights(directory, planned, parse_size(shard_size))
    return {"tensors": len(planned), "model_bytes": sum(t.nbytes for t in planned),
            "largest_tensor_bytes": max(t.nbytes for t in planned),
            "largest_tensor": max(planned, key=lambda t: t.nbytes).name}


def measure(mode: str, *args: str) -> tuple[int, int, float]:
    """(resident bytes before converting, peak resident bytes while converting, seconds), in a
    fresh process with the libraries already imported."""
    done = subprocess.run([sys.executable, "-c", CHILD, mode, *args], capture_output=True, text=True)
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    if done.returncode != 0 or not lines:
        raise RuntimeError(f"{mode} failed:\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}")
    _, before, peak, seconds = lines[-1].split()
    return int(before), int(peak), float(seconds)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m falcon_h1.benchmarks.convert_memory", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="0.5b", help="model shape (docs/models.md; default 0.5b)")
    parser.add_argument("--workdir", required=True, help="scratch directory (needs ~3x the model size on disk)")
    parser.add_argument("--shard-size", default="500MB", help="safetensors shard size of the input and export")
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args(argv)
    from falcon_h1.convert.safetensors_io import parse_size

    work = Path(args.workdir)
    shutil.rmtree(work, ignore_errors=True)
    started = time.perf_counter()
    info = write_random_hf(work / "hf", args.preset, args.shard_size)
    print(f"random {args.preset} checkpoint: {info['tensors']} tensors, {info['model_bytes'] / 1e9:.2f} GB, "
          f"largest {info['largest_tensor']} {info['largest_tensor_bytes'] / 1e6:.0f} MB "
          f"({time.perf_counter() - started:.0f} s)", flush=True)
    runs = {"import": measure("import", str(work / "hf"), str(work / "checkpoint")),
            "export": measure("export", str(work / "checkpoint"), str(work / "export"), args.shard_size)}
    result = dict(info, preset=args.preset, shard_bytes=parse_size(args.shard_size), runs={
        name: dict(rss_before_bytes=b, peak_rss_bytes=p, growth_bytes=p - b, seconds=t)
        for name, (b, p, t) in runs.items()})
    mb = 1e6
    print(f"{'':<8} {'RSS before MB':>14} {'peak RSS MB':>12} {'growth MB':>10} {'seconds':>8}")
    for name, (before, peak, seconds) in runs.items():
        print(f"{name:<8} {before / mb:>14.0f} {peak / mb:>12.0f} {(peak - before) / mb:>10.0f} {seconds:>8.1f}")
    print(f"model {info['model_bytes'] / mb:.0f} MB in shards of {parse_size(args.shard_size) / mb:.0f} MB, "
          f"largest tensor {info['largest_tensor_bytes'] / mb:.0f} MB")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
