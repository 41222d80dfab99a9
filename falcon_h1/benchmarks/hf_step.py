"""The bench's reference row: transformers' FalconH1ForCausalLM training step, same shape, same GPU.

As users train it: float32 parameters under bf16 autocast (on GPU), fused AdamW, loss from the
model's `labels`; forward, backward, optimizer step, gradients zeroed, timed with the GPU
synchronised, median after warm-up. transformers binds its Mamba conv and scan to causal-conv1d's
and mamba_ssm's kernels when those import (its fastest path), else to its torch reference; the
row says which it ran. (The parity tests import it on the torch path on purpose: parity.py.) A
length that does not fit the card gives a row with "error": "out of memory".
"""

from __future__ import annotations

import importlib
import inspect
import sys

import torch

from falcon_h1.benchmarks.timing import median_time


MODELING = "transformers.models.falcon_h1.modeling_falcon_h1"


def transformers_modeling():
    """(transformers' Falcon-H1 modeling module, "kernels" or "torch": the Mamba path it took).
    mamba_ssm installed without its CUDA extensions cannot import its package root, which is what
    transformers tries; importing our loader first registers a package object for it."""
    if MODELING not in sys.modules and torch.cuda.is_available():
        try:
            import falcon_h1.kernels.mamba_ssm_triton  # noqa: F401
        except ImportError:
            pass  # no mamba_ssm: transformers takes its torch path
    module = importlib.import_module(MODELING)
    bound = [inspect.getclosurevars(f).nonlocals.get("is_new_implementation")
             for f in (module.causal_conv1d_fn, module.mamba2_chunk_scan)]
    return module, "kernels" if all(bound) else "torch" if not any(bound) else "mixed"


def bench_transformers_step(preset: str, seq_length: int, micro_batch_size: int, steps: int, warmup: int,
                            gemm_tflops: float | None) -> dict:
    from falcon_h1.model.config import config_to_hf
    from falcon_h1.model.presets import preset_config
    from falcon_h1.training.flops import training_flops_per_step

    on_gpu = torch.cuda.is_available()
    device = torch.device("cuda" if on_gpu else "cpu")
    ours = preset_config(preset)
    module, path = transformers_modeling()
    row = dict(stack="transformers", seq_length=seq_length, global_batch_size=micro_batch_size, mamba_path=path)
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
