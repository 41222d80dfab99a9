"""The bench's reference row: transformers' FalconH1ForCausalLM training step, same shape, same GPU.

As users train it: float32 parameters under bf16 autocast (on GPU), fused AdamW, loss from the
model's `labels`; forward, backward, optimizer step, gradients zeroed, timed with the GPU
synchronised, median after warm-up. transformers binds its Mamba conv and scan to causal-conv1d's
and mamba_ssm's kernels when those import (its kernel path), else to its torch reference (its torch
path). Neither is always the faster (an H200 at 4096 tokens: torch 16.0k tokens/s, kernels 14.4k),
so the bench measures both (`mamba_path`; torch_mamba_path is the one switch) and the peer row is
the faster (peer_of_paths). (The parity tests import it on the torch path on purpose: parity.py.)
A length that does not fit the card gives a row with "error": "out of memory".
"""

from __future__ import annotations

import importlib
import inspect
from contextlib import contextmanager, nullcontext

import torch

from falcon_h1.benchmarks.timing import median_time


MODELING = "transformers.models.falcon_h1.modeling_falcon_h1"

# The module's functions that transformers binds to a kernel when its package imports. Training runs
# the fused split-conv1d-scan; where that is on torch it returns None and the mixer runs the conv
# and the chunked scan instead. The two *_update functions serve generation (decode.py).
MAMBA_FUNCTIONS = ("mamba2_split_conv1d_scan_combined", "causal_conv1d_fn", "mamba2_chunk_scan",
                   "causal_conv1d_update", "mamba2_selective_state_update")

MAMBA_PATHS = ("kernels", "torch")

# The peer row's per-path fields: transformers_kernel_tokens_per_s, transformers_torch_tokens_per_s.
PATH_FIELD = {"kernels": "transformers_kernel", "torch": "transformers_torch"}


def transformers_modeling():
    """(transformers' Falcon-H1 modeling module, "kernels", "torch" or "mixed": the Mamba path its
    import bound). mamba_ssm installed without its CUDA extensions cannot import its package root,
    which is what transformers tries; importing our loader first registers a package object for it.
    A module imported earlier on its torch path (the parity reference, convert/hf_modeling.py,
    hides the kernel packages on purpose) is imported again, so that it binds the kernels."""
    if torch.cuda.is_available():
        try:
            import falcon_h1.compat.mamba_ssm_triton  # noqa: F401
        except ImportError:
            pass  # no mamba_ssm: transformers takes its torch path
    module = importlib.import_module(MODELING)
    if torch.cuda.is_available() and bound_path(module) != "kernels":
        module = importlib.reload(module)
    return module, bound_path(module)


def bound_path(module) -> str:
    """"kernels", "torch" or "mixed": what the module's Mamba functions call now. transformers' wrapper
    of a kernel-bound function holds is_new_implementation=True; its torch reference holds none."""
    bound = [bool(inspect.getclosurevars(getattr(module, name)).nonlocals.get("is_new_implementation"))
             for name in MAMBA_FUNCTIONS]
    return "kernels" if all(bound) else "torch" if not any(bound) else "mixed"


@contextmanager
def torch_mamba_path(module):
    """transformers' torch path for the duration, whatever its import bound: each Mamba function of
    the module becomes the torch reference its wrapper wraps (the wrapper's fallback when no kernel
    package imports), restored after. The mixer looks these names up in the module at each call, so
    models built before or inside the block both follow it."""
    bound = {name: getattr(module, name) for name in MAMBA_FUNCTIONS}
    try:
        for name, function in bound.items():
            setattr(module, name, inspect.unwrap(function))
        yield
    finally:
        for name, function in bound.items():
            setattr(module, name, function)


def bench_transformers_step(preset: str, seq_length: int, micro_batch_size: int, steps: int, warmup: int,
                            gemm_tflops: float | None, mamba_path: str = "kernels") -> dict:
    """One row on one Mamba path: "kernels" (as transformers' import bound them; an "unavailable"
    error row where nothing bound to a kernel) or "torch" (forced by torch_mamba_path)."""
    from falcon_h1.model.config import config_to_hf
    from falcon_h1.model.presets import preset_config
    from falcon_h1.training.flops import training_flops_per_step

    if mamba_path not in MAMBA_PATHS:
        raise ValueError(f"mamba_path: {mamba_path!r}; choose from {', '.join(MAMBA_PATHS)}")
    on_gpu = torch.cuda.is_available()
    device = torch.device("cuda" if on_gpu else "cpu")
    ours = preset_config(preset)
    module, imported = transformers_modeling()
    row = dict(stack="transformers", seq_length=seq_length, global_batch_size=micro_batch_size)
    if mamba_path == "kernels" and imported == "torch":
        return dict(row, mamba_path="kernels", error="unavailable (no mamba_ssm / causal-conv1d)")
    with torch_mamba_path(module) if mamba_path == "torch" else nullcontext():
        row["mamba_path"] = bound_path(module)  # what the step below runs
        try:
            with device:
                model = module.FalconH1ForCausalLM(module.FalconH1Config(**config_to_hf(ours)))
            model.train()
            optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, betas=(0.9, 0.95), fused=on_gpu)
            tokens = torch.randint(0, ours.vocab_size, (micro_batch_size, seq_length), device=device)
            if on_gpu:
                torch.cuda.reset_peak_memory_stats()

            def step():
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=on_gpu):
                    loss = model(input_ids=tokens, labels=tokens).loss
                loss.backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)

            step_time = median_time(step, steps, warmup)
        except torch.OutOfMemoryError:
            return dict(row, error="out of memory")
    tflops = training_flops_per_step(ours, micro_batch_size, seq_length) / step_time / 1e12
    return dict(row, step_time_s=step_time, tokens_per_sec_per_gpu=micro_batch_size * seq_length / step_time,
                model_tflops_per_gpu=tflops, mfu=tflops / gemm_tflops if gemm_tflops else None,
                peak_memory_gib=torch.cuda.max_memory_allocated() / 2 ** 30 if on_gpu else None)


def peer_of_paths(rows: dict[str, dict]) -> dict:
    """The transformers peer row from its row on each Mamba path ({"kernels": row, "torch": row}):
    the faster path's row, with each path's tokens/s (None where it gave none) and, for such a path,
    why (transformers_kernel_error: "unavailable ...", "out of memory"). Where neither gave a
    number, the torch path's row: its error is the one that says something about the length."""
    measured = [r for r in rows.values() if "error" not in r]
    peer = max(measured, key=lambda r: r["tokens_per_sec_per_gpu"]) if measured else rows["torch"]
    peer = dict(peer)
    for path, row in rows.items():
        peer[f"{PATH_FIELD[path]}_tokens_per_s"] = row.get("tokens_per_sec_per_gpu")
        if "error" in row:
            peer[f"{PATH_FIELD[path]}_error"] = row["error"]
    return peer
