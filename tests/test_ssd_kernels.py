"""The pure-torch kernels: the CPU path, and the oracle the GPU kernels are tested against."""

import math

import pytest
import torch
import torch.nn.functional as F

from falcon_h1.kernels import causal_conv1d, gated_rms_norm, ssd_scan
from falcon_h1.kernels.ssd import discretize_dt, ssd_scan_sequential, ssd_scan_torch


def _scan_inputs(b=2, l=45, h=6, p=8, g=2, n=16, dtype=torch.float64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(b, l, h, p, generator=gen, dtype=dtype)
    dt = discretize_dt(torch.randn(b, l, h, generator=gen), torch.randn(h, generator=gen), (0.0, math.inf)).to(dtype)
    A = -torch.rand(h, generator=gen, dtype=dtype) * 4 - 0.1
    B = torch.randn(b, l, g, n, generator=gen, dtype=dtype)
    C = torch.randn(b, l, g, n, generator=gen, dtype=dtype)
    D = torch.randn(h, generator=gen, dtype=dtype)
    return x, dt, A, B, C, D


@pytest.mark.parametrize("chunk_size", [1, 8, 16, 64])
def test_chunked_scan_matches_sequential_recurrence_in_float64(chunk_size):
    x, dt, A, B, C, D = _scan_inputs()
    initial = torch.randn(2, 6, 8, 16, dtype=torch.float64)
    y, final = ssd_scan_torch(x, dt, A, B, C, chunk_size, D=D, initial_state=initial, return_final_state=True)
    y_ref, final_ref = ssd_scan_sequential(x, dt, A, B, C, D=D, initial_state=initial)
    assert (y - y_ref).abs().max() / y_ref.abs().max() < 1e-12
    assert (final - final_ref).abs().max() / final_ref.abs().max() < 1e-12


def test_float32_scan_is_within_float32_rounding_of_the_recurrence():
    x, dt, A, B, C, D = _scan_inputs()
    y = ssd_scan_torch(x.float(), dt.float(), A.float(), B.float(), C.float(), 16, D=D.float())
    y_ref, _ = ssd_scan_sequential(x, dt, A, B, C, D=D)
    assert y.dtype == torch.float32
    assert (y.double() - y_ref).abs().max() / y_ref.abs().max() < 1e-5


def test_scan_gradients_match_the_recurrence():
    inputs = [t.clone().requires_grad_() for t in _scan_inputs(l=19)]
    x, dt, A, B, C, D = inputs
    ssd_scan_torch(x, dt, A, B, C, 8, D=D).square().sum().backward()
    chunked = [t.grad.clone() for t in inputs]
    for t in inputs:
        t.grad = None
    ssd_scan_sequential(x, dt, A, B, C, D=D)[0].square().sum().backward()
    for got, t in zip(chunked, inputs):
        assert (got - t.grad).abs().max() / t.grad.abs().max() < 1e-10


def test_dispatch_applies_bias_softplus_and_time_step_limit():
    x, _, A, B, C, D = [t.float() for t in _scan_inputs()]
    raw_dt, dt_bias = torch.randn(2, 45, 6), torch.randn(6)
    limit = (0.05, 0.5)
    y = ssd_scan(x, raw_dt, A, B, C, chunk_size=16, D=D, dt_bias=dt_bias, dt_limit=limit, backend="torch")
    dt = F.softplus(raw_dt + dt_bias).clamp(*limit)
    y_ref, _ = ssd_scan_sequential(x.double(), dt.double(), A.double(), B.double(), C.double(), D=D.double())
    assert (y.double() - y_ref).abs().max() / y_ref.abs().max() < 1e-5


def test_causal_conv1d_sees_no_future_and_matches_a_direct_sum():
    x = torch.randn(2, 5, 12)
    weight, bias = torch.randn(5, 1, 4), torch.randn(5)
    out = causal_conv1d(x, weight, bias, backend="torch")
    padded = F.pad(x, (3, 0))
    direct = sum(padded[..., k: k + 12] * weight[:, 0, k, None] for k in range(4)) + bias[:, None]
    torch.testing.assert_close(out, F.silu(direct))
    changed = x.clone()
    changed[..., 7:] += 1.0
    torch.testing.assert_close(causal_conv1d(changed, weight, bias, backend="torch")[..., :7], out[..., :7])


@pytest.mark.parametrize("norm_before_gate", [True, False])
def test_gated_rms_norm_per_group(norm_before_gate):
    y, z, w = torch.randn(3, 7, 32), torch.randn(3, 7, 32), torch.randn(32)
    out = gated_rms_norm(y, z, w, eps=1e-5, group_size=8, norm_before_gate=norm_before_gate, backend="torch")
    gate = F.silu(z)
    v = y if norm_before_gate else y * gate
    groups = v.view(3, 7, 4, 8)
    normed = (groups / torch.sqrt(groups.pow(2).mean(-1, keepdim=True) + 1e-5)).view(3, 7, 32) * w
    torch.testing.assert_close(out, normed * gate if norm_before_gate else normed)


def test_gated_rms_norm_with_group_split_across_ranks_uses_the_group_total():
    """Two 'ranks' holding halves of one group, summed by hand, equal the unsplit norm."""
    y, z, w = torch.randn(4, 16), torch.randn(4, 16), torch.randn(16)
    whole = gated_rms_norm(y, z, w, eps=1e-5, group_size=16, norm_before_gate=False, backend="torch")
    halves = [slice(0, 8), slice(8, 16)]
    total = sum((y[:, s] * F.silu(z[:, s])).pow(2).sum(-1, keepdim=True) for s in halves)
    parts = [gated_rms_norm(y[:, s], z[:, s], w[s], eps=1e-5, group_size=16, norm_before_gate=False,
                            sum_squares_across_ranks=lambda _: total, backend="torch") for s in halves]
    torch.testing.assert_close(torch.cat(parts, -1), whole)


def test_unknown_backend_is_rejected_with_the_choices():
    x, dt, A, B, C, D = [t.float() for t in _scan_inputs()]
    with pytest.raises(ValueError, match="auto"):
        ssd_scan(x, dt, A, B, C, chunk_size=16, D=D, dt_bias=torch.zeros(6), dt_limit=(0.0, math.inf),
                 backend="cuda")
