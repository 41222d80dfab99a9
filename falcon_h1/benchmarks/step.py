"""Benchmark the project's training step against its peers: tokens/s, TFLOP/s and MFU per GPU, memory.

    python -m falcon_h1.benchmarks.step --preset 1.5b --seq-lengths 4096 8192
    falcon-h1 bench -y preset=1.5b seq_lengths=[4096,8192]
    torchrun --nproc-per-node 4 -m falcon_h1.benchmarks.step --preset 7b --tp 2 --cp 2 --seq-lengths 32768

For each sequence length it runs the real training loop (FalconH1Module under MegatronStrategy,
bf16 on GPU, Megatron's distributed optimizer, random tokens) for warm-up + measured steps in this
process and reports the median of the measured steps. A step is forward, backward and optimizer
step of one global batch (micro-batch x DP x micro-batches per step), timed with the GPU
synchronised at both ends. Model FLOPs are counted as in docs/flops.md; MFU is against the bf16
GEMM rate measured on this GPU at the start (a large square matmul), not the datasheet peak.
On one GPU each length also gets, in the same process and with the same batch:
- transformers' FalconH1ForCausalLM training step (hf_step.py; bf16 autocast, fused AdamW), on its
  Mamba kernel path and on its torch path; the faster is the peer, the row prints both;
- a pure-attention Megatron Core GPT of the same parameter count (gpt_step.py);
- the component roofline (roofline.py): the best kernel time of each component (GEMMs, attention,
  SSD scan, conv, norms, loss, optimizer) summed, and the step's time over that sum.
Rank 0 prints one table and, with --json, writes the rows.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import warnings

import pytorch_lightning as pl
import torch
import torch.distributed as dist

from falcon_h1.benchmarks.hf_step import MAMBA_PATHS, PATH_FIELD, peer_of_paths
from falcon_h1.benchmarks.timing import cuda_kernel_ms
from falcon_h1.kernels import BACKENDS


# Config overrides that leave the model's function and shape alone, so the peers still compare.
SHAPE_NEUTRAL_OVERRIDES = {"kernel_backend", "recompute_granularity", "recompute_modules", "recompute_ssd_scan",
                           "recompute_method", "recompute_num_layers", "cuda_graph_impl"}


RECOMPUTE_CHOICES = ("core_attn", "ssd_scan", "full")


def recompute_overrides(recompute: list[str]) -> dict:
    """Config fields for what backward recomputes: the attention core ("core_attn") and/or the
    Mamba core ("ssd_scan"), or every layer whole ("full": only each layer's input is kept,
    Megatron's recompute_granularity="full", one layer per checkpoint)."""
    unknown = set(recompute) - set(RECOMPUTE_CHOICES)
    if unknown:
        raise ValueError(f"recompute: unknown choices {sorted(unknown)}; choose from {', '.join(RECOMPUTE_CHOICES)}")
    if "full" in recompute:
        if len(set(recompute)) > 1:
            raise ValueError(f"recompute: 'full' recomputes whole layers, so it takes no cores beside it "
                             f"(got {recompute})")
        return dict(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1)
    overrides = {}
    if "core_attn" in recompute:
        overrides.update(recompute_granularity="selective", recompute_modules=["core_attn"])
    if "ssd_scan" in recompute:
        overrides["recompute_ssd_scan"] = True
    return overrides


def measured_gemm_tflops(size: int = 8192, repeats: int = 20) -> float | None:
    """bf16 TFLOP/s of a size^3 matmul on this GPU (median of repeats after warm-up); None on CPU."""
    if not torch.cuda.is_available():
        return None
    from falcon_h1.benchmarks.timing import cuda_median_ms

    a = torch.randn(size, size, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(size, size, device="cuda", dtype=torch.bfloat16)
    return 2 * size ** 3 / (cuda_median_ms(lambda: a @ b, repeats, warmup=3) / 1e3) / 1e12


class StepRecorder(pl.Callback):
    """Each step's time and peak memory, as ThroughputMonitor measured them (it runs first)."""

    def __init__(self):
        self.step_times: list[float] = []
        self.peak_gib = 0.0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        from falcon_h1.training.callbacks import ThroughputMonitor

        monitor = next(c for c in trainer.callbacks if isinstance(c, ThroughputMonitor))
        metrics = monitor.last_metrics
        self.step_times.append(metrics["throughput/step_time_s"])
        self.peak_gib = max(self.peak_gib, metrics.get("memory/peak_allocated_gib", 0.0))


class StepProfiler(pl.Callback):
    """Profile one training step (CPU and GPU) and print where its time goes: wall time, GPU busy
    time, and the ops and kernels with the most GPU and CPU time."""

    def __init__(self, step: int):
        self.step, self.profiler = step, None
        self.summary: dict | None = None  # wall, GPU kernel and NCCL kernel ms of the profiled step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.step:
            torch.cuda.synchronize()
            self.profiler = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                                               torch.profiler.ProfilerActivity.CUDA],
                                                   record_shapes=True)
            self.profiler.__enter__()
            self.start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if self.profiler is None:
            return
        torch.cuda.synchronize()
        wall_ms = (time.perf_counter() - self.start) * 1e3
        self.profiler.__exit__(None, None, None)
        events = self.profiler.key_averages()
        kernels = [e for e in events if e.device_type == torch.autograd.DeviceType.CUDA]
        busy_ms = cuda_kernel_ms(events)
        # Communication kernels (data-, tensor-, context- and pipeline-parallel collectives and sends):
        # with the layout's message sizes, they give the bandwidth a larger layout would see.
        nccl_ms = cuda_kernel_ms(events, "nccl")
        self.summary = dict(wall_ms=wall_ms, gpu_kernels_ms=busy_ms, nccl_kernels_ms=nccl_ms)
        print(f"profiled step {self.step}: wall {wall_ms:.1f} ms, GPU kernels {busy_ms:.1f} ms "
              f"(communication kernels {nccl_ms:.1f} ms)")
        for title, rows in (
                ("kernels by GPU time", sorted(((e.self_device_time_total / 1e3, e.count, e.key) for e in kernels),
                                               reverse=True)[:25]),
                # By input shapes: which of the model's tensors each elementwise, copy or cat pass touches.
                ("torch ops by GPU time (self), with input shapes",
                 sorted(((e.self_device_time_total / 1e3, e.count, f"{e.key} {e.input_shapes}")
                         for e in self.profiler.key_averages(group_by_input_shape=True)
                         if e.key.startswith("aten::") and e.self_device_time_total), reverse=True)[:30]),
                ("CPU ops by CPU time (total)", sorted(((e.cpu_time_total / 1e3, e.count, e.key) for e in events
                                                        if e.device_type == torch.autograd.DeviceType.CPU),
                                                       reverse=True)[:25])):
            print(f"  {title}:")
            for ms, count, name in rows:
                print(f"    {ms:8.2f} ms {count:6d}x  {name[:160]}")
        self.profiler = None


def bench_training_step(preset: str = "1.5b", seq_length: int = 4096, micro_batch_size: int = 1,
                        micro_batches: int = 1, tensor_parallel: int = 1, pipeline_parallel: int = 1,
                        context_parallel: int = 1, sequence_parallel: bool = False, steps: int = 10,
                        warmup: int = 3, gemm_tflops: float | None = None, profile: bool = False,
                        **config_overrides) -> dict:
    """One row: the median step of `steps` after `warmup`, for the preset at that layout."""
    from falcon_h1.data.pretraining import MockDataModule
    from falcon_h1.model.presets import preset_config
    from falcon_h1.training.checkpoint import AutoResume
    from falcon_h1.training.flops import training_flops_per_step
    from falcon_h1.training.module import FalconH1Module
    from falcon_h1.training.optim import LRSchedule, falcon_h1_optimizer_config
    from falcon_h1.training.pretrain import build_trainer, pretrain
    from falcon_h1.training.strategy import MegatronStrategy

    config = preset_config(preset, **config_overrides)
    strategy = MegatronStrategy(tensor_model_parallel_size=tensor_parallel,
                                pipeline_model_parallel_size=pipeline_parallel,
                                context_parallel_size=context_parallel, sequence_parallel=sequence_parallel)
    recorder = StepRecorder()
    profiler = StepProfiler(warmup + 1) if profile and torch.cuda.is_available() else None
    callbacks = [recorder] + ([profiler] if profiler else [])
    with tempfile.TemporaryDirectory(prefix="falcon_h1_bench_") as log_dir:
        trainer = build_trainer(log_dir, max_steps=warmup + steps, strategy=strategy, val_check_interval=10 ** 9,
                                limit_val_batches=0, log_every_n_steps=max(1, warmup + steps),
                                checkpoint_every_n_steps=None, keep_last_k=None, save_last=False,
                                extra_callbacks=callbacks)
        world = trainer.world_size
        data_parallel = world // (tensor_parallel * pipeline_parallel * context_parallel)
        global_batch = micro_batch_size * data_parallel * micro_batches
        data = MockDataModule(config.vocab_size, seq_length, micro_batch_size, global_batch)
        module = FalconH1Module(config, falcon_h1_optimizer_config(lr=1e-5),
                                LRSchedule(warmup_fraction=0.0, decay_style="constant"))
        pretrain(module, data, trainer, AutoResume(resume_if_exists=False))
    # The profiled step, and the next one (which the profiler's report delays), are left out.
    profiled = (warmup + 1, warmup + 2) if profiler else ()
    measured = [t for i, t in enumerate(recorder.step_times) if i >= warmup and i not in profiled]
    step_time = statistics.median(measured)
    tokens = global_batch * seq_length
    tflops = training_flops_per_step(module.config, global_batch, seq_length) / step_time / world / 1e12
    on_gpu = torch.cuda.is_available()
    return dict(
        stack="falcon_h1", preset=preset, seq_length=seq_length, micro_batch_size=micro_batch_size, global_batch_size=global_batch,
        layout=dict(tp=tensor_parallel, pp=pipeline_parallel, cp=context_parallel, dp=data_parallel,
                    sp=sequence_parallel),
        gpus=world, device=torch.cuda.get_device_name() if on_gpu else "cpu", steps=len(measured),
        step_time_s=step_time, step_time_spread_s=(min(measured), max(measured)),
        tokens_per_sec_per_gpu=tokens / step_time / world, model_tflops_per_gpu=tflops,
        gemm_tflops=gemm_tflops, mfu=tflops / gemm_tflops if gemm_tflops else None,
        peak_memory_gib=recorder.peak_gib if on_gpu else None,
        profiled_step=profiler.summary if profiler else None,
        date=time.strftime("%Y-%m-%d"))


def run_bench(preset: str = "1.5b", seq_lengths: list[int] | None = None, micro_batch_size: int = 1,
              micro_batches: int = 1, tensor_parallel: int = 1, pipeline_parallel: int = 1,
              context_parallel: int = 1, sequence_parallel: bool = False, steps: int = 10, warmup: int = 3,
              json_path: str | None = None, compare: bool = True, profile: bool = False,
              **config_overrides) -> list[dict]:
    """Rows for each sequence length (default 4096 and 8192); printed by rank 0, and written to
    `json_path` if given. With `compare` on one GPU (one process), each length also gets the
    transformers row and the pure-attention Megatron GPT row of the same shape and batch."""
    gemm = measured_gemm_tflops()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    # Finished fits and the peers' models left memory behind in their process: 8192 tokens after 4096
    # ran out of memory (2026-11-28, H100). The strategy now releases its training hooks at teardown
    # (checked on the CPU, not yet after a graphed GPU fit), and the peers are not checked, so on one
    # GPU every row still trains in a child process of its own, on the same GPU, one at a time.
    in_children = torch.cuda.is_available() and "WORLD_SIZE" not in os.environ
    rows = []
    for seq_length in seq_lengths or [4096, 8192]:
        step_args = dict(preset=preset, seq_length=seq_length, micro_batch_size=micro_batch_size,
                         micro_batches=micro_batches, tensor_parallel=tensor_parallel,
                         pipeline_parallel=pipeline_parallel, context_parallel=context_parallel,
                         sequence_parallel=sequence_parallel, steps=steps, warmup=warmup, gemm_tflops=gemm,
                         profile=profile, **config_overrides)
        ours = _row_in_child("falcon_h1", step_args) if in_children else bench_training_step(**step_args)
        rows.append(ours)
        _announce(ours)
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        if compare and torch.cuda.is_available() and ours["gpus"] == 1:
            from falcon_h1.benchmarks.roofline import component_roofline
            from falcon_h1.model.presets import preset_config

            roofline = component_roofline(preset_config(preset, **config_overrides), micro_batch_size, seq_length,
                                          micro_batches)
            ours.update(roofline_ms=roofline["total_ms"], roofline_parts_ms=roofline["parts_ms"],
                        roofline_implementations=roofline["implementations"],
                        step_over_roofline=ours["step_time_s"] * 1e3 / roofline["total_ms"])
            _announce(ours, roofline=True)
        if not compare or ours["gpus"] > 1 or set(config_overrides) - SHAPE_NEUTRAL_OVERRIDES:
            continue
        peer_args = dict(preset=preset, seq_length=seq_length, batch=ours["global_batch_size"], steps=steps,
                         warmup=warmup, gemm=gemm)

        def measure(stack, **stack_args):
            args = dict(peer_args, **stack_args)
            return _row_in_child(stack, args) if in_children else peer_row(stack, **args)

        for stack in ("transformers", "megatron_gpt"):
            if stack == "transformers":  # each Mamba path in a process of its own on GPU; the faster is the peer
                row = peer_of_paths({path: measure(stack, mamba_path=path) for path in MAMBA_PATHS})
            else:
                row = measure(stack)
            rows.append(dict(row, preset=preset, device=ours["device"], steps=steps, date=ours["date"],
                             gemm_tflops=gemm, layout=dict(tp=1, pp=1, cp=1, dp=1, sp=False), gpus=1))
            _announce(rows[-1])
    if not dist.is_initialized() or dist.get_rank() == 0:
        print(format_table(rows))
        if json_path:
            with open(json_path, "w") as f:
                json.dump(rows, f, indent=2)
    return rows


def peer_row(stack: str, preset: str, seq_length: int, batch: int, steps: int, warmup: int,
             gemm: float | None, **stack_args) -> dict:
    """The row of a peer stack ("transformers" or "megatron_gpt") at the same shape and batch;
    `stack_args` are the stack's own (transformers: mamba_path)."""
    from falcon_h1.benchmarks.gpt_step import bench_gpt_step
    from falcon_h1.benchmarks.hf_step import bench_transformers_step
    from falcon_h1.single_process import single_process_megatron

    bench = {"transformers": bench_transformers_step, "megatron_gpt": bench_gpt_step}[stack]
    if torch.cuda.is_available() and not dist.is_initialized():
        # The one-rank Megatron state needs a process group: NCCL, as the project's step has
        # (Megatron's DDP and optimizer on CUDA tensors do not run over gloo).
        dist.init_process_group("nccl", store=dist.HashStore(), rank=0, world_size=1,
                                device_id=torch.device("cuda", torch.cuda.current_device()))
    with single_process_megatron():
        row = bench(preset, seq_length, batch, steps, warmup, gemm, **stack_args)
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return row


def _row_in_child(stack: str, kwargs: dict) -> dict:
    """One row (this project's step, or a peer's) measured in a fresh Python process."""
    with tempfile.TemporaryDirectory(prefix="falcon_h1_bench_") as directory:
        row_path = os.path.join(directory, "row.json")
        subprocess.run([sys.executable, "-m", "falcon_h1.benchmarks.step", "--child-row", stack, json.dumps(kwargs),
                        row_path], check=True)
        with open(row_path) as f:
            return json.load(f)


def _announce(row: dict, roofline: bool = False) -> None:
    """Each row (or its roofline) as soon as it is measured (the table comes at the end), so a later
    crash keeps it."""
    if not dist.is_initialized() or dist.get_rank() == 0:
        lines = format_table([row]).splitlines()
        print("bench row:", next(line for line in lines if line.startswith("roofline")) if roofline else lines[2],
              flush=True)


def format_table(rows: list[dict]) -> str:
    lines = ["| stack | preset | seq | batch | layout | step s | tokens/s/GPU | model TFLOP/s/GPU | MFU | peak GiB "
             "| x roofline |", "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        layout = " ".join(f"{k}{v}" for k, v in r["layout"].items() if k != "sp") + (" sp" if r["layout"]["sp"] else "")
        stack = _stack_label(r)
        if "error" in r:
            lines.append(f"| {stack} | {r['preset']} | {r['seq_length']} | {r['global_batch_size']} | {layout} | "
                         f"{r['error']} | | | | | |")
            continue
        mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] else "-"
        peak = f"{r['peak_memory_gib']:.1f}" if r["peak_memory_gib"] is not None else "-"
        over = f"{r['step_over_roofline']:.2f}" if "step_over_roofline" in r else "-"
        lines.append(f"| {stack} | {r['preset']} | {r['seq_length']} | {r['global_batch_size']} | {layout} | "
                     f"{r['step_time_s']:.3f} | {r['tokens_per_sec_per_gpu']:.0f} | {r['model_tflops_per_gpu']:.3g} | "
                     f"{mfu} | {peak} | {over} |")
    for r in rows:
        if "roofline_ms" in r:
            parts = ", ".join(f"{name} {ms:.1f}" for name, ms in r["roofline_parts_ms"].items())
            lines.append(f"\nroofline {r['preset']} {r['global_batch_size']}x{r['seq_length']}: {r['roofline_ms']:.1f} ms "
                         f"= {parts} (ms; {r['roofline_implementations']})")
    for r in rows:
        peer = _transformers_peer_of(r, rows)
        if peer:
            lines.append(f"\nfalcon_h1 / transformers, {r['preset']} {r['global_batch_size']}x{r['seq_length']}: "
                         f"{r['tokens_per_sec_per_gpu'] / peer['tokens_per_sec_per_gpu']:.2f}x "
                         f"(transformers' faster measured Mamba path: {peer['mamba_path']})")
    device = rows[0]["device"] if rows else "?"
    gemm = rows[0]["gemm_tflops"] if rows else None
    lines.append(f"\n{device}; MFU against the measured bf16 GEMM rate" + (f" {gemm:.0f} TFLOP/s" if gemm else " (none on CPU)"))
    return "\n".join(lines)


def _stack_label(row: dict) -> str:
    """The stack, and for transformers the Mamba path it ran and each path's tokens/s (or why none)."""
    if "mamba_path" not in row:
        return row["stack"]
    paths = []
    for path, field in PATH_FIELD.items():
        if f"{field}_error" in row:
            paths.append(f"{path}: {row[f'{field}_error']}")
        elif row.get(f"{field}_tokens_per_s"):
            paths.append(f"{path} {row[f'{field}_tokens_per_s']:,.0f} tokens/s")
    return f"{row['stack']} ({row['mamba_path']} Mamba path" + (f"; {', '.join(paths)}" if paths else "") + ")"


def _transformers_peer_of(row: dict, rows: list[dict]) -> dict | None:
    """The measured transformers row of the same shape and batch as this project's `row`, if any."""
    if row["stack"] != "falcon_h1" or "error" in row:
        return None
    return next((r for r in rows if r["stack"] == "transformers" and "error" not in r
                 and (r["preset"], r["seq_length"], r["global_batch_size"])
                 == (row["preset"], row["seq_length"], row["global_batch_size"])), None)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m falcon_h1.benchmarks.step", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="1.5b", help="model shape (falcon_h1.model.presets), default 1.5b")
    parser.add_argument("--seq-lengths", type=int, nargs="+", default=[4096, 8192])
    parser.add_argument("--micro-batch-size", type=int, default=1)
    parser.add_argument("--micro-batches", type=int, default=1, help="micro-batches per step and DP rank")
    parser.add_argument("--tp", type=int, default=1, help="tensor parallel size")
    parser.add_argument("--pp", type=int, default=1, help="pipeline parallel size")
    parser.add_argument("--cp", type=int, default=1, help="context parallel size")
    parser.add_argument("--sp", action="store_true", help="sequence parallelism (with TP > 1)")
    parser.add_argument("--steps", type=int, default=10, help="measured steps (median reported)")
    parser.add_argument("--warmup", type=int, default=3, help="steps left out (compilation, autotuning)")
    parser.add_argument("--num-layers", type=int, help="override the preset's layer count (no comparison rows)")
    parser.add_argument("--no-compare", action="store_true",
                        help="only this project's step (default on 1 GPU: also transformers, a Megatron GPT and "
                             "the component roofline)")
    parser.add_argument("--recompute", nargs="+", choices=RECOMPUTE_CHOICES, default=[],
                        help="recompute in backward (less activation memory, more compute): the attention "
                             "and/or Mamba cores, or whole layers (full)")
    parser.add_argument("--cuda-graphs", action="store_true",
                        help="capture each layer's forward and backward in CUDA graphs after the first step "
                             "(cuda_graph_impl=local)")
    parser.add_argument("--kernel-backend", default="auto", choices=BACKENDS,
                        help="the model's kernels (falcon_h1.kernels); mamba_ssm: its SSD scan in place of the "
                             "project's")
    parser.add_argument("--profile", action="store_true",
                        help="profile one step after warm-up and print its top kernels and ops (left out of the median)")
    parser.add_argument("--json", help="write the rows here")
    parser.add_argument("--child-row", nargs=3, metavar=("STACK", "ARGS_JSON", "ROW_JSON"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore")
    if args.child_row:  # run_bench's child process: one row
        stack, kwargs, row_path = args.child_row[0], json.loads(args.child_row[1]), args.child_row[2]
        row = bench_training_step(**kwargs) if stack == "falcon_h1" else peer_row(stack, **kwargs)
        with open(row_path, "w") as f:
            json.dump(row, f)
        return 0
    overrides = {"num_layers": args.num_layers} if args.num_layers else {}
    overrides.update(recompute_overrides(args.recompute))
    if args.kernel_backend != "auto":
        overrides["kernel_backend"] = args.kernel_backend
    if args.cuda_graphs:
        overrides["cuda_graph_impl"] = "local"
    run_bench(args.preset, args.seq_lengths, args.micro_batch_size, args.micro_batches, args.tp, args.pp, args.cp,
              args.sp, args.steps, args.warmup, args.json, not args.no_compare, args.profile, **overrides)
    return 0


if __name__ == "__main__":
    sys.exit(main())
