"""The mixer's non-GEMM kernels behind one dispatch.

backend="auto": on CUDA tensors, the fastest measured GPU kernels that are installed: the SSD scan
is the project's Triton scan (ssd_triton.py), or mamba_ssm's at head dims above 64 (see
PROJECT_SCAN_MAX_HEAD_DIM); mamba_ssm's Triton gated RMSNorm; the causal-conv1d package's CUDA
kernel (or, without it, the project's Triton conv); the project's Triton RoPE. Otherwise the
pure-torch versions.
backend="torch": always the pure-torch versions (the CPU path, and the oracle for the GPU tests).
backend="gpu": as "auto", failing loudly where a GPU kernel is missing.
backend="triton" / "mamba_ssm": as "gpu", with that SSD scan at every shape.
"""

from __future__ import annotations

import functools
import importlib

import torch

from falcon_h1.kernels.conv1d import causal_conv1d_cuda, causal_conv1d_torch
from falcon_h1.kernels.conv1d_triton import causal_conv1d_triton
from falcon_h1.kernels.gated_norm import gated_rms_norm_torch, gated_rms_norm_triton
from falcon_h1.kernels.rope import rope_torch, rope_triton
from falcon_h1.kernels.ssd import discretize_dt, ssd_scan_torch
from falcon_h1.kernels.ssd_triton import ssd_scan_triton

BACKENDS = ("auto", "torch", "gpu", "triton", "mamba_ssm")

# Forward+backward of the SSD scan replayed from a CUDA graph, 1 x 8192 tokens, bf16, on an H200
# (2026-12-02, benchmarks/ssd_tiles.py; docs/performance.md): the project's scan 1.09 ms against
# mamba_ssm's 1.46 at the 1.5B's 48 heads x 64, but 1.22 against 1.18 at the 7B's 24 heads x 128.
PROJECT_SCAN_MAX_HEAD_DIM = 64
MAMBA_SSM = "falcon_h1.compat.mamba_ssm_triton"


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
    if backend in ("gpu", "triton", "mamba_ssm") and not available:
        raise RuntimeError(
            f"kernel_backend='gpu' needs CUDA tensors and the `{module}` module; "
            "install the GPU extra (pip install 'falcon-h1[gpu]') or use kernel_backend='auto'"
        )
    return available


def ssd_scan(x, dt, A, B, C, *, chunk_size, D, dt_bias, dt_limit, initial_state=None,
             return_final_state=False, seq_idx=None, backend="auto"):
    """SSD scan over x [b, l, h, p] with raw dt [b, l, h] (bias, softplus and clamp applied here).
    seq_idx [b, l]: document of each token of packed rows; the state restarts at each document."""
    kernel = _ssd_kernel(x, backend)
    if kernel == "mamba_ssm":
        from falcon_h1.compat.mamba_ssm_triton import mamba_chunk_scan_combined

        return mamba_chunk_scan_combined(
            x, dt, A, B, C, chunk_size, D=D, dt_bias=dt_bias, initial_states=initial_state,
            seq_idx=None if seq_idx is None else seq_idx.int(), dt_softplus=True, dt_limit=tuple(dt_limit),
            return_final_states=return_final_state,
        )
    if kernel == "triton":  # the model's chunk_size is mamba_ssm's; this kernel picks its own
        return ssd_scan_triton(x, dt, A, B, C, D=D, dt_bias=dt_bias, dt_limit=dt_limit, initial_state=initial_state,
                               return_final_state=return_final_state, seq_idx=seq_idx)
    if seq_idx is not None:  # each document alone: exact, and this path is for CPU and tests
        if initial_state is not None or return_final_state:
            raise ValueError("ssd_scan over packed documents takes no initial state and returns no final state")
        rows = []
        for row in range(x.shape[0]):
            pieces = [ssd_scan(x[row:row + 1, a:e], dt[row:row + 1, a:e], A, B[row:row + 1, a:e], C[row:row + 1, a:e],
                               chunk_size=chunk_size, D=D, dt_bias=dt_bias, dt_limit=dt_limit, backend="torch")
                      for a, e in document_segments(seq_idx[row])]
            rows.append(torch.cat(pieces, dim=1))
        return torch.cat(rows)
    dt = discretize_dt(dt, dt_bias, dt_limit)
    return ssd_scan_torch(x, dt, A, B, C, chunk_size, D=D, initial_state=initial_state,
                          return_final_state=return_final_state)


def _ssd_kernel(x: torch.Tensor, backend: str) -> str:
    """"triton", "mamba_ssm" or "torch": the SSD scan `backend` takes for x [b, l, h, p]."""
    if backend == "mamba_ssm":
        return "mamba_ssm" if _gpu_kernel(x, backend, MAMBA_SSM) else "torch"
    if not _gpu_kernel(x, backend, "triton"):
        return "torch"
    if backend != "triton" and x.shape[-1] > PROJECT_SCAN_MAX_HEAD_DIM and _importable(MAMBA_SSM):
        return "mamba_ssm"
    return "triton"


def causal_conv1d(x, weight, bias, *, seq_idx=None, backend="auto"):
    """Causal depthwise conv1d + SiLU over x [b, d, l] with weight [d, 1, k]. seq_idx [b, l]:
    document of each token of packed rows; no output sees inputs of an earlier document.
    On the GPU: the causal-conv1d package's CUDA kernel (2.9x faster than the project's Triton
    kernel on an H100, 1.5B shape, 8192 tokens), else the Triton kernel (4x faster than torch's)."""
    if _gpu_kernel(x, backend, "triton"):
        if _importable("causal_conv1d"):
            return causal_conv1d_cuda(x, weight, bias, seq_idx=seq_idx)
        return causal_conv1d_triton(x, weight, bias, seq_idx)
    if seq_idx is None:
        return causal_conv1d_torch(x, weight, bias)
    rows = []
    for row in range(x.shape[0]):
        rows.append(torch.cat([causal_conv1d_torch(x[row:row + 1, :, a:e], weight, bias)
                               for a, e in document_segments(seq_idx[row])], dim=-1))
    return torch.cat(rows)


def document_segments(seq_idx: torch.Tensor) -> list[tuple[int, int]]:
    """(start, end) of each run of equal ids in a row of seq_idx."""
    starts = [0] + (torch.nonzero(seq_idx[1:] != seq_idx[:-1]).flatten() + 1).tolist()
    return list(zip(starts, starts[1:] + [seq_idx.numel()]))


def gated_rms_norm(y, z, weight, *, eps, group_size, norm_before_gate,
                   sum_squares_across_ranks=None, backend="auto"):
    """Grouped RMSNorm of y gated by silu(z); see gated_norm.py."""
    if sum_squares_across_ranks is None and _gpu_kernel(y, backend, MAMBA_SSM):
        return gated_rms_norm_triton(y, z, weight, eps, group_size, norm_before_gate)
    return gated_rms_norm_torch(y, z, weight, eps, group_size, norm_before_gate,
                                sum_squares_across_ranks)


def rotary(t, freqs, *, backend="auto"):
    """RoPE on t [s, b, heads, head_dim] with angles freqs [s, 1 or b, 1, head_dim]; see rope.py."""
    if _gpu_kernel(t, backend, "triton"):
        return rope_triton(t, freqs)
    return rope_torch(t, freqs)


__all__ = ["BACKENDS", "causal_conv1d", "gated_rms_norm", "rotary", "ssd_scan"]
