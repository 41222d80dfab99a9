"""GPU kernels (mamba_ssm's Triton SSD and gated norm, causal-conv1d) against the torch path.

Run on a CUDA machine with the GPU extra installed: `pytest -m gpu tests/gpu`.
Float32 runs use IEEE float32 dots in Triton (conftest.py). Tolerances (relative norm error):
kernels alone, float32 5e-3, bf16 3e-2, gradients twice those; whole model in float32, logits 1e-4
and gradients 1e-3; whole bf16 model against the float32 torch path, logits 5e-2, gradients 1e-1.
"""

import math

import pytest
import torch

from falcon_h1.kernels import causal_conv1d, gated_rms_norm, ssd_scan
from falcon_h1.parity import build_from_hf, make_hf_model, random_tokens, relative_error

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]
TOL = {torch.float32: 5e-3, torch.bfloat16: 3e-2}


def _grads(fn, tensors):
    for t in tensors:
        t.grad = None
    out = fn()
    out.float().square().sum().backward()
    return out.detach().float(), [t.grad.float().clone() for t in tensors]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("head_dim, state, groups, chunk", [(64, 128, 1, 128), (64, 256, 1, 256),
                                                            (128, 256, 2, 128), (128, 128, 2, 256)])
def test_triton_ssd_matches_torch_forward_and_backward(dtype, head_dim, state, groups, chunk):
    torch.manual_seed(0)
    b, l, h = 2, 1000, 8
    dev = "cuda"
    x = torch.randn(b, l, h, head_dim, device=dev, dtype=dtype, requires_grad=True)
    dt = torch.randn(b, l, h, device=dev, dtype=dtype, requires_grad=True)
    A = (-torch.rand(h, device=dev) * 4 - 0.5).requires_grad_()
    B = torch.randn(b, l, groups, state, device=dev, dtype=dtype, requires_grad=True)
    C = torch.randn(b, l, groups, state, device=dev, dtype=dtype, requires_grad=True)
    D = torch.randn(h, device=dev, requires_grad=True)
    dt_bias = torch.randn(h, device=dev, requires_grad=True)
    inputs = [x, dt, A, B, C, D, dt_bias]

    def run(backend):
        return lambda: ssd_scan(x, dt, A, B, C, chunk_size=chunk, D=D, dt_bias=dt_bias,
                                dt_limit=(0.0, math.inf), backend=backend)

    y_gpu, g_gpu = _grads(run("gpu"), inputs)
    y_ref, g_ref = _grads(run("torch"), inputs)
    assert relative_error(y_gpu, y_ref) < TOL[dtype]
    for name, got, want in zip("x dt A B C D dt_bias".split(), g_gpu, g_ref):
        assert relative_error(got, want) < 2 * TOL[dtype], name


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_causal_conv1d_cuda_matches_torch(dtype):
    pytest.importorskip("causal_conv1d")
    x = torch.randn(2, 640, 777, device="cuda", dtype=dtype, requires_grad=True)
    w = torch.randn(640, 1, 4, device="cuda", dtype=dtype, requires_grad=True)
    bias = torch.randn(640, device="cuda", dtype=dtype, requires_grad=True)
    y_gpu, g_gpu = _grads(lambda: causal_conv1d(x, w, bias, backend="gpu"), [x, w, bias])
    y_ref, g_ref = _grads(lambda: causal_conv1d(x, w, bias, backend="torch"), [x, w, bias])
    assert relative_error(y_gpu, y_ref) < TOL[dtype] / 10
    for got, want in zip(g_gpu, g_ref):
        assert relative_error(got, want) < TOL[dtype]


@pytest.mark.parametrize("norm_before_gate", [True, False])
def test_triton_gated_norm_matches_torch(norm_before_gate):
    y = torch.randn(4, 333, 1024, device="cuda", requires_grad=True)
    z = torch.randn(4, 333, 1024, device="cuda", requires_grad=True)
    w = torch.randn(1024, device="cuda", requires_grad=True)

    def run(backend):
        return lambda: gated_rms_norm(y, z, w, eps=1e-5, group_size=512, norm_before_gate=norm_before_gate,
                                      backend=backend)

    out_gpu, g_gpu = _grads(run("gpu"), [y, z, w])
    out_ref, g_ref = _grads(run("torch"), [y, z, w])
    assert relative_error(out_gpu, out_ref) < 1e-5
    for got, want in zip(g_gpu, g_ref):
        assert relative_error(got, want) < 1e-4


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_kernels_inside_the_full_model(single_rank, dtype):
    """The whole model with the GPU kernels vs the same weights on the torch path (float32 on GPU)."""
    hf = make_hf_model(4, mamba_rms_norm=True, mamba_n_groups=2, mamba_chunk_size=64, mamba_d_state=64,
                       num_hidden_layers=3)
    tokens = random_tokens(hf.config, 2, 300, seed=1).cuda()
    reference = build_from_hf(hf, kernel_backend="torch").cuda()
    candidate = build_from_hf(hf, kernel_backend="gpu").cuda().to(dtype)
    logits_ref, grads_ref = _grads(lambda: reference(tokens), list(reference.parameters()))
    logits, grads = _grads(lambda: candidate(tokens), list(candidate.parameters()))
    logits_tol, grad_tol = (1e-4, 1e-3) if dtype == torch.float32 else (5e-2, 1e-1)
    errors = {name: relative_error(got, want)
              for (name, _), got, want in zip(candidate.named_parameters(), grads, grads_ref)}
    print(f"{dtype}: logits {relative_error(logits, logits_ref):.1e}, worst gradient {max(errors.values()):.1e}")
    assert relative_error(logits, logits_ref) < logits_tol
    assert max(errors.values()) < grad_tol, errors
