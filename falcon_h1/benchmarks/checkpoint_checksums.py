"""What checkpoint checksums cost, on a checkpoint of a released shape.

    python -m falcon_h1.benchmarks.checkpoint_checksums --preset 1.5b --workdir /tmp/checksum_bench

Writes the preset's weights (uninitialized float32 memory: the content does not change the cost)
through Megatron's torch_dist writer, as a training save does, first as Megatron ships it and then
with checksums (each shard hashed as it is written, then the manifest), and reads every file back
against its digest as a resume does, from the page cache and from the disk. Prints a table (seconds, GB/s) and, with --json, writes it.
A training checkpoint also holds the optimizer state (about 4x the float32 weights with Adam's two
moments and the main weights); each cost scales with the bytes.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def drop_from_page_cache(directory: Path) -> None:
    """Have the next read of the (written and synced) files come from the disk, as on a fresh node."""
    import os

    for path in directory.rglob("*"):
        if path.is_file():
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m falcon_h1.benchmarks.checkpoint_checksums",
                                     description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="1.5b")
    parser.add_argument("--workdir", required=True, help="where the checkpoints are written (deleted at the end)")
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args(argv)

    import torch
    import xxhash
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    from falcon_h1.single_process import single_process_megatron
    from falcon_h1.model.config import config_to_hf
    from falcon_h1.model.model import FalconH1Model
    from falcon_h1.model.presets import preset_config
    from falcon_h1.training import checkpoint_io, checksums

    workdir = Path(args.workdir)
    shutil.rmtree(workdir, ignore_errors=True)
    workdir.mkdir(parents=True)
    config = preset_config(args.preset, use_cpu_initialization=True, perform_initialization=False,
                           kernel_backend="torch")
    results = {"preset": args.preset}
    try:
        with single_process_megatron():
            model = FalconH1Model(config)
            state = {"state_dict": checkpoint_io.model_sharded_state_dict([model])}
            for attempt in ("warm-up", "measured"):  # the first save also sets up Megatron's writer
                plain = workdir / attempt / checkpoint_io.WEIGHTS_DIR
                plain.mkdir(parents=True)
                results["save_without_s"] = timed(lambda: dist_checkpointing.save(state, str(plain)))
                results["bytes"] = sum(f.stat().st_size for f in plain.rglob("*") if f.is_file())
                shutil.rmtree(plain.parent)

            checkpoint = workdir / "step=0000001"
            checkpoint_io.begin_save(checkpoint)
            checkpoint_io.write_context(checkpoint, config_to_hf(config), {"weights_only": True}, None)
            checksums.hash_shards_as_written()
            results["save_with_s"] = timed(lambda: dist_checkpointing.save(state, str(checkpoint / "weights")))
            results["manifest_s"] = timed(lambda: checkpoint_io.finish_save(checkpoint))
            del filesystem_async.open  # Megatron's writer as shipped again
            results["verify_cached_s"] = timed(lambda: checkpoint_io.verify_checksums(checkpoint))
            drop_from_page_cache(checkpoint)
            results["verify_from_disk_s"] = timed(lambda: checkpoint_io.verify_checksums(checkpoint))
        buffer = torch.ones(1 << 30, dtype=torch.uint8).numpy()
        results["hash_in_memory_gb_s"] = 1.0 / timed(lambda: xxhash.xxh3_128(buffer).hexdigest())
    finally:
        shutil.rmtree(workdir, ignore_errors=True)

    gigabytes = results["bytes"] / 1e9
    print(f"Falcon-H1 {args.preset}: float32 weights, {gigabytes:.2f} GB in torch_dist shards")
    for label, key in (("save, Megatron's writer", "save_without_s"), ("save, shards hashed as written", "save_with_s"),
                       ("manifest (checksums.json)", "manifest_s"), ("verify, files in page cache", "verify_cached_s"),
                       ("verify, files read from disk", "verify_from_disk_s")):
        print(f"  {label:32s} {results[key]:7.2f} s  {gigabytes / results[key]:6.2f} GB/s")
    print(f"  xxh3-128 of 1 GiB in memory      {results['hash_in_memory_gb_s']:6.2f} GiB/s")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
