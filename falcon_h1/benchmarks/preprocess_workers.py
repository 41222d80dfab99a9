"""Time preprocessing (read, tokenize, write) with 1 worker and with 2 on the same input.

    python -m falcon_h1.benchmarks.preprocess_workers --megabytes 40 --workers 1 2

The input is one JSONL file of the Python standard library's sources (repeated up to the size
asked), tokenized with the bundled corpus' tokenizer (falcon_h1/data/default_corpus.py: a 4096-token
byte-level BPE, built on first use). Each run is timed end to end, worker start-up included;
tokens/s is the output's tokens over that time. CPU time over wall time shows how many cores a run
kept busy (one worker tokenizes on one thread: about 1.0). The outputs of all runs must be
byte-identical; the benchmark says so. The machine's load average before each run is printed: other
work on the machine slows whichever run it overlaps (--repeats R keeps each count's fastest of R).
"""

from __future__ import annotations

import argparse
import datetime
import filecmp
import importlib
import json
import os
import platform
import resource
import sys
import tempfile
import time
from pathlib import Path


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def write_input(path: Path, megabytes: float) -> tuple[int, int]:
    """A JSONL file of stdlib sources, about `megabytes` of text: (documents, bytes of text)."""
    from falcon_h1.data.default_corpus import stdlib_sources

    sources = [p.read_text(encoding="utf-8", errors="replace") for p in stdlib_sources()]
    documents = nbytes = 0
    with path.open("w", encoding="utf-8") as f:
        while nbytes < megabytes * 1e6:
            for text in sources:
                f.write(json.dumps({"text": text}) + "\n")
                documents += 1
                nbytes += len(text.encode())
                if nbytes >= megabytes * 1e6:
                    break
    return documents, nbytes


def cpu_seconds() -> tuple[float, float]:
    """CPU seconds of this process and of its finished children (the workers, once shut down)."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime, children.ru_utime + children.ru_stime


def time_run(data: Path, prefix: Path, tokenizer_dir: str, workers: int) -> dict:
    """One preprocessing run, end to end: wall and CPU seconds, tokens, and the load it started under."""
    from falcon_h1.data.preprocess import preprocess

    load = os.getloadavg()[0]  # other work on the machine skews the comparison: shown, not hidden
    (own, children), start = cpu_seconds(), time.perf_counter()
    result = preprocess([str(data)], str(prefix), tokenizer_dir=tokenizer_dir, workers=workers, log_every=0)
    wall = time.perf_counter() - start
    own, children = (after - before for after, before in zip(cpu_seconds(), (own, children)))
    return {"wall": wall, "own": own, "children": children, "tokens": result.tokens, "load": load}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m falcon_h1.benchmarks.preprocess_workers", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--megabytes", type=float, default=40, help="text to tokenize (default: 40)")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="worker counts to time (default: 1 2)")
    parser.add_argument("--repeats", type=int, default=1,
                        help="rounds over the worker counts, interleaved; each count's fastest is kept (default: 1)")
    args = parser.parse_args(argv)

    from falcon_h1.data.default_corpus import default_corpus
    from falcon_h1.data.preprocess import load_tokenizer
    importlib.import_module("megatron.core.datasets.indexed_dataset")  # imported before the clock starts

    tokenizer_dir = default_corpus().tokenizer_dir
    vocab = len(load_tokenizer(tokenizer_dir))
    with tempfile.TemporaryDirectory(prefix="preprocess_workers_") as tmp:
        data = Path(tmp) / "input.jsonl"
        documents, nbytes = write_input(data, args.megabytes)
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
        print(f"preprocess workers benchmark, {datetime.datetime.now().astimezone():%Y-%m-%d %H:%M %Z}")
        print(f"machine: {cpu_model()}, {cores} cores; Python {platform.python_version()}")
        print(f"input: {nbytes / 1e6:.1f} MB of text in {documents} documents (JSONL), tokenizer: byte-level BPE "
              f"of {vocab} tokens ({tokenizer_dir})")
        best: dict[int, dict] = {}
        for _ in range(args.repeats):
            for workers in args.workers:
                run = time_run(data, Path(tmp) / f"out_{workers}", tokenizer_dir, workers)
                if workers not in best or run["wall"] < best[workers]["wall"]:
                    best[workers] = run
        base = best[args.workers[0]]["tokens"] / best[args.workers[0]]["wall"]
        for workers, run in best.items():
            rate = run["tokens"] / run["wall"]
            print(f"workers={workers}: {run['tokens'] / 1e6:.2f}M tokens in {run['wall']:.2f} s = {rate / 1e6:.3f}M "
                  f"tokens/s ({nbytes / run['wall'] / 1e6:.2f} MB/s of text), {rate / base:.2f}x workers="
                  f"{args.workers[0]}; CPU s: main process {run['own']:.1f}, workers {run['children']:.1f} (cpu/wall "
                  f"{(run['own'] + run['children']) / run['wall']:.2f}); load average before {run['load']:.1f}")
        first = Path(tmp) / f"out_{args.workers[0]}"
        same = all(filecmp.cmp(f"{first}{s}", f"{Path(tmp) / f'out_{w}'}{s}", shallow=False)
                   for w in args.workers[1:] for s in (".bin", ".idx"))
        print(f"outputs byte-identical across worker counts: {'yes' if same else 'NO'}")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
