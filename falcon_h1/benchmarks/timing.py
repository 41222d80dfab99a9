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


def cuda_median_ms(fn, repeats: int = 20, warmup: int = 5) -> float:
    """Median milliseconds of `repeats` calls of `fn` by CUDA events (GPU time from the first
    launch to the last kernel's end), after `warmup` untimed calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def median_time(fn, repeats: int, warmup: int = 0) -> float:
    """Median seconds of `repeats` calls of `fn` after `warmup` untimed ones."""
    for _ in range(warmup):
        fn()
    return statistics.median(timed(fn) for _ in range(repeats))


def graphed_median_ms(fn, repeats: int = 20, warmup: int = 5) -> float | None:
    """Median milliseconds of `fn`'s kernels replayed from a CUDA graph: GPU time without the CPU's
    launch gaps, the time a graphed training step (cuda_graph_impl="local") can approach. None
    when `fn` cannot be captured (it synchronises with the host, say)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up (autotuning, allocations) off the default stream
        for _ in range(warmup):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    try:
        with torch.cuda.graph(graph):
            fn()
    except RuntimeError:
        torch.cuda.synchronize()
        return None
    return cuda_median_ms(graph.replay, repeats, warmup=2)


def profiled_kernel_ms(fn, repeats: int = 10, warmup: int = 3) -> float:
    """Median over calls of the summed durations of the GPU kernels one `fn()` runs (torch
    profiler): its GPU time without launch gaps, for work that a CUDA graph cannot capture."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    activities = [torch.profiler.ProfilerActivity.CUDA]
    per_call = []
    for _ in range(repeats):
        with torch.profiler.profile(activities=activities) as profile:
            fn()
            torch.cuda.synchronize()
        per_call.append(cuda_kernel_ms(profile.key_averages()))
    return statistics.median(per_call)


def cuda_kernel_ms(events, name_contains: str = "") -> float:
    """Summed GPU time (ms) of a torch profile's kernels (key_averages()), optionally only those
    whose name contains `name_contains` (case-insensitive)."""
    return sum(e.self_device_time_total for e in events if e.device_type == torch.autograd.DeviceType.CUDA
               and name_contains in e.key.lower()) / 1e3
