"""The mixer's non-GEMM kernels behind one dispatch.

backend="auto": on CUDA tensors, mamba_ssm's Triton kernels (SSD scan, gated RMSNorm) and the
causal-conv1d package's CUDA kernel when they are installed; otherwise the pure-torch versions.
backend="torch": always the pure-torch versions (the CPU path, and the oracle for the GPU tests).
backend="gpu": the GPU kernels, failing loudly if they are missing.
"""

from __future__ import annotations

import functools
import importlib

import torch

from falcon_h1.kernels.conv1d import causal_conv1d_cuda, causal_conv1d_torch
from falcon_h1.kernels.gated_norm import gated_rms_norm_torch, gated_rms_norm_triton
from falcon_h1.kernels.ssd import discretize_dt, ssd_scan_torch

BACKENDS = ("auto", "torch", "gpu")


@functools.cache
def _importable(module: str) -> bool:
    try:
        importlib.import_module(module)
        return True
    except Exception:  # an install without its compiled parts raises more than ImportError
        return False


def _gpu_kernel(tensor: torch.Tensor, backend: str, module: str) -> bool:
    if backend not in BACKENDS:
        raise ValueError(f"kernel backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "torch":
        return False
    available = tensor.is_cuda and _importable(module)
    if backend == "gpu" and not available:
        raise RuntimeError(
            f"kernel_backend='gpu' needs CUDA tensors and the `{module}` module; "
            "install the GPU extra (pip install 'falcon-h1[gpu]') or use kernel_backend='auto'"
        )
    return available


def ssd_scan(x, dt, A, B, C, *, chunk_size, D, dt_bias, dt_limit, initial_state=None,
             return_final_state=False, backend="auto"):
    """SSD scan over x [b, l, h, p] with raw dt [b, l, h] (bias, softplus and clamp applied here)."""
    if _gpu_kernel(x, backend, "falcon_h1.kernels.mamba_ssm_triton"):
        from falcon_h1.kernels.mamba_ssm_triton import mamba_chunk_scan_combined

        return mamba_chunk_scan_combined(
            x, dt, A, B, C, chunk_size, D=D, dt_bias=dt_bias, initial_states=initial_state,
            dt_softplus=True, dt_limit=tuple(dt_limit), return_final_states=return_final_state,
        )
    dt = discretize_dt(dt, dt_bias, dt_limit)
    return ssd_scan_torch(x, dt, A, B, C, chunk_size, D=D, initial_state=initial_state,
                          return_final_state=return_final_state)


def causal_conv1d(x, weight, bias, *, backend="auto"):
    """Causal depthwise conv1d + SiLU over x [b, d, l] with weight [d, 1, k]."""
    if _gpu_kernel(x, backend, "causal_conv1d"):
        return causal_conv1d_cuda(x, weight, bias)
    return causal_conv1d_torch(x, weight, bias)


def gated_rms_norm(y, z, weight, *, eps, group_size, norm_before_gate,
                   sum_squares_across_ranks=None, backend="auto"):
    """Grouped RMSNorm of y gated by silu(z); see gated_norm.py."""
    if sum_squares_across_ranks is None and _gpu_kernel(y, backend, "falcon_h1.kernels.mamba_ssm_triton"):
        return gated_rms_norm_triton(y, z, weight, eps, group_size, norm_before_gate)
    return gated_rms_norm_torch(y, z, weight, eps, group_size, norm_before_gate,
                                sum_squares_across_ranks)


__all__ = ["BACKENDS", "causal_conv1d", "gated_rms_norm", "ssd_scan"]
