"""Wall-clock timing of GPU work: synchronise before and after, median of repeats after warm-up."""

import statistics
import time

import torch


def timed(fn) -> float:
    """Seconds `fn()` takes, with the GPU (if any) synchronised at both ends."""
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    sync()
    start = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - start


def median_time(fn, repeats: int, warmup: int = 0) -> float:
    """Median seconds of `repeats` calls of `fn` after `warmup` untimed ones."""
    for _ in range(warmup):
        fn()
    return statistics.median(timed(fn) for _ in range(repeats))
