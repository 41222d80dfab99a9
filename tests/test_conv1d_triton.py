"""The Triton causal conv1d + SiLU (falcon_h1/kernels/conv1d_triton.py) against the torch version,
run by Triton's interpreter on the CPU (float32; the GPU test covers bf16 on the card).

The interpreter has to be on before the kernels are decorated, so the check runs in a fresh
process. Shapes cross the 64 x 64 tiles and leave partial ones; the input is the mixer's strided
channels-last view of an in-projection output; with and without bias.
"""

import json
import os
import subprocess
import sys

import pytest

from tests.conftest import REPO

pytest.importorskip("triton")

CHECK = r"""
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


def test_triton_conv1d_silu_matches_torch_forward_and_backward_in_the_interpreter():
    done = subprocess.run([sys.executable, "-c", CHECK], capture_output=True, text=True, timeout=600, cwd=REPO,
                          env=dict(os.environ, TRITON_INTERPRET="1"))
    assert done.returncode == 0, done.stderr[-4000:]
    results = json.loads(done.stdout.split("RESULTS", 1)[1])
    assert len(results) == 3
    for case in results:
        assert case["channels_last"], case
        assert max(case["errors"]) < 1e-5, case  # y, dx, dweight (, dbias)
