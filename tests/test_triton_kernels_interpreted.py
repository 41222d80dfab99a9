"""The project's Triton kernels against their torch versions, run by Triton's interpreter on the
CPU (float32; tests/gpu/test_gpu_kernels.py covers bf16 on the card).

The interpreter has to be on before the kernels are decorated, so each check runs in a fresh
process and prints its relative errors (output and every input gradient) as JSON.
"""

import json
import os
import subprocess
import sys

import pytest

from tests.conftest import REPO

pytest.importorskip("triton")

CONV = r"""
import json, torch
from falcon_h1.kernels.conv1d import causal_conv1d_torch
from falcon_h1.kernels.conv1d_triton import causal_conv1d_triton

torch.manual_seed(0)
results = []
for batch, channels, length, width, with_bias in [(2, 70, 130, 4, True), (1, 64, 64, 4, False), (3, 5, 7, 3, True)]:
    proj = torch.randn(length, batch, channels + 9)
    x = proj[..., 2:2 + channels].permute(1, 2, 0)  # [b, channels, s], channels contiguous
    weight = torch.randn(channels, 1, width) * 0.5
    bias = torch.randn(channels) * 0.1 if with_bias else None
    grad = torch.randn(batch, length, channels).transpose(1, 2)
    outputs = []
    for fn in (causal_conv1d_torch, causal_conv1d_triton):
        leaves = [t.detach().clone().requires_grad_(True) if t is not None else None for t in (x, weight, bias)]
        y = fn(*leaves)
        y.backward(grad)
        outputs.append([y] + [t.grad for t in leaves if t is not None])
    errors = [((b - a).norm() / a.norm()).item() for a, b in zip(*outputs)]
    results.append(dict(shape=[batch, channels, length, width], bias=with_bias, errors=errors,
                        channels_last=outputs[1][0].stride(1) == 1))
print("RESULTS", json.dumps(results))
"""


SWIGLU = r"""
import json, torch
from falcon_h1.kernels.swiglu import _SwiGLU, swiglu_torch

torch.manual_seed(0)
results = []
for shape in [(3, 5, 2 * 1500), (1, 2 * 7)]:  # rows x (a width over and under one 1024 block)
    x = torch.randn(*shape)
    grad = torch.randn(*shape[:-1], shape[-1] // 2)
    outputs = []
    for fn in (swiglu_torch, _SwiGLU.apply):
        leaf = x.clone().requires_grad_(True)
        y = fn(leaf)
        y.backward(grad)
        outputs.append([y, leaf.grad])
    results.append(dict(shape=list(shape), errors=[((b - a).norm() / a.norm()).item() for a, b in zip(*outputs)]))
print("RESULTS", json.dumps(results))
"""


def interpreted(script: str) -> list[dict]:
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600, cwd=REPO,
                          env=dict(os.environ, TRITON_INTERPRET="1"))
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads(done.stdout.split("RESULTS", 1)[1])


def test_swiglu_kernels_match_torch_in_the_interpreter():
    results = interpreted(SWIGLU)
    assert len(results) == 2
    for case in results:
        assert max(case["errors"]) < 1e-6, case  # y, dx


def test_conv1d_silu_kernels_match_torch_in_the_interpreter():
    """Shapes cross the 64 x 64 tiles and leave partial ones; the input is the mixer's strided
    channels-last view of an in-projection output; with and without bias; widths 4 and 3."""
    results = interpreted(CONV)
    assert len(results) == 3
    for case in results:
        assert case["channels_last"], case
        assert max(case["errors"]) < 1e-5, case  # y, dx, dweight (, dbias)
