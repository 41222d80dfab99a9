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
from falcon_h1.kernels import causal_conv1d
from falcon_h1.kernels.conv1d_triton import causal_conv1d_triton

torch.manual_seed(0)
results = []
for batch, channels, length, width, with_bias, packed in [(2, 70, 130, 4, True, False), (1, 64, 64, 4, False, False),
                                                          (3, 5, 7, 3, True, False), (2, 70, 130, 4, True, True)]:
    proj = torch.randn(length, batch, channels + 9)
    x = proj[..., 2:2 + channels].permute(1, 2, 0)  # [b, channels, s], channels contiguous
    weight = torch.randn(channels, 1, width) * 0.5
    bias = torch.randn(channels) * 0.1 if with_bias else None
    grad = torch.randn(batch, length, channels).transpose(1, 2)
    # Packed rows: documents of 1, 2, 61 and 66 tokens, then of 40 and 90 (starts inside and across tiles).
    seq_idx = torch.tensor([[0] + [1] * 2 + [2] * 61 + [3] * 66, [5] * 40 + [6] * 90]) if packed else None
    outputs = []
    for fn in (lambda *a: causal_conv1d(*a, seq_idx=seq_idx, backend="torch"),
               lambda *a: causal_conv1d_triton(*a, seq_idx=seq_idx)):
        leaves = [t.detach().clone().requires_grad_(True) if t is not None else None for t in (x, weight, bias)]
        y = fn(*leaves)
        y.backward(grad)
        outputs.append([y] + [t.grad for t in leaves if t is not None])
    errors = [((b - a).norm() / a.norm()).item() for a, b in zip(*outputs)]
    results.append(dict(shape=[batch, channels, length, width], bias=with_bias, packed=packed, errors=errors,
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


RMS_NORM = r"""
import json, torch
from falcon_h1.kernels.rms_norm import _RMSNorm, rms_norm_torch

torch.manual_seed(0)
results = []
for shape in [(37, 2, 96), (5, 100)]:  # more rows than the backward's programs; a width under its block
    x = torch.randn(*shape) * 3
    weight = torch.randn(shape[-1])
    grad = torch.randn(*shape)
    outputs = []
    for fn in (rms_norm_torch, _RMSNorm.apply):
        leaves = [x.clone().requires_grad_(True), weight.clone().requires_grad_(True)]
        y = fn(*leaves, 1e-5)
        y.backward(grad)
        outputs.append([y, leaves[0].grad, leaves[1].grad])
    results.append(dict(shape=list(shape), errors=[((b - a).norm() / a.norm()).item() for a, b in zip(*outputs)]))
print("RESULTS", json.dumps(results))
"""


ROPE = r"""
import json, torch
from falcon_h1.kernels.rope import rope_torch, rope_triton
from falcon_h1.model.rotary import RotaryEmbedding

torch.manual_seed(0)
results = []
# (s, b, heads, head_dim, per-row angles): 6 heads (not a power of 2), 2 (GQA keys), head dim 64
# and 128 (Falcon-H1's), 96 (a half under its block), angles per row as packed documents give them.
for s, b, heads, head_dim, per_row in [(7, 2, 6, 64, False), (5, 3, 2, 128, True), (4, 1, 3, 96, False)]:
    proj = torch.randn(s, b, heads * head_dim + 5)
    t = proj[..., 3:3 + heads * head_dim].reshape(s, b, heads, head_dim)  # a strided view, as q of the in-projection
    table = RotaryEmbedding(head_dim, 1e11)(64, torch.device("cpu"))
    positions = torch.randint(0, 64, (s, b))
    freqs = table[positions].squeeze(2) if per_row else table[:s]  # [s, b, 1, d] or [s, 1, 1, d]
    grad = torch.randn(s, b, heads, head_dim)
    outputs = []
    for fn in (rope_torch, rope_triton):
        leaf = t.detach().clone().requires_grad_(True)
        y = fn(leaf, freqs)
        y.backward(grad)
        outputs.append([y, leaf.grad])
    results.append(dict(shape=[s, b, heads, head_dim], per_row=per_row, contiguous=outputs[1][0].is_contiguous(),
                        errors=[((y - x).norm() / x.norm()).item() for x, y in zip(*outputs)]))
print("RESULTS", json.dumps(results))
"""


CROSS_ENTROPY = r"""
import json, os, tempfile, torch, torch.distributed as dist, torch.multiprocessing as mp
import torch.nn.functional as F
from falcon_h1.kernels.cross_entropy import vocab_parallel_cross_entropy

S, B, VOCAB, PADDED, MULT = 5, 3, 9000, 9010, 0.7  # 10 padding columns; rows over 2 blocks of 4096

def inputs():
    torch.manual_seed(0)
    logits = torch.randn(S, B, PADDED) * 4
    labels = torch.randint(0, VOCAB, (S, B))
    labels[0, 0] = 8999  # the last real token: in the second rank's slice under TP=2
    return logits, labels, torch.rand(S, B)

def reference():
    logits, labels, grad = inputs()
    leaf = logits.requires_grad_(True)
    loss = F.cross_entropy((leaf[..., :VOCAB] * MULT).reshape(-1, VOCAB), labels.reshape(-1), reduction="none")
    loss.view(S, B).backward(grad)
    return loss.view(S, B), leaf.grad

def fused(rank=0, world=1):
    logits, labels, grad = inputs()
    local = PADDED // world
    leaf = logits[..., rank * local:(rank + 1) * local].contiguous().requires_grad_(True)
    x = leaf * 1.0  # a non-leaf, as the output layer's logits are; the backward overwrites it
    valid = min(max(VOCAB - rank * local, 0), local)
    loss = vocab_parallel_cross_entropy(x, labels, MULT, valid, rank * local, dist.group.WORLD if world > 1 else None)
    loss.backward(grad)
    return loss.detach(), leaf.grad

def rank_main(rank, world, path):
    dist.init_process_group("gloo", init_method=f"file://{path}.rendezvous", rank=rank, world_size=world)
    loss, grad = fused(rank, world)
    torch.save((loss, grad), f"{path}.{rank}")
    dist.destroy_process_group()

def errors(got_loss, got_grad):
    want_loss, want_grad = reference()
    return [((got_loss - want_loss).norm() / want_loss.norm()).item(),
            ((got_grad - want_grad).norm() / want_grad.norm()).item()]

if __name__ == "__main__":
    # Forked (a -c script cannot spawn) before this process runs any torch op, whose threads a
    # fork would not carry.
    path = os.path.join(tempfile.mkdtemp(), "ce")
    mp.start_processes(rank_main, args=(2, path), nprocs=2, start_method="fork")
    parts = [torch.load(f"{path}.{rank}") for rank in range(2)]
    assert torch.equal(parts[0][0], parts[1][0]), "TP ranks disagree on the loss"
    results = [dict(tp=1, errors=errors(*fused())),
               dict(tp=2, errors=errors(parts[0][0], torch.cat([parts[0][1], parts[1][1]], dim=-1)))]
    print("RESULTS", json.dumps(results))
"""


SSD = r"""
import json, math, torch
from falcon_h1.kernels import ssd_scan
from falcon_h1.kernels.ssd_triton import ssd_scan_triton

torch.manual_seed(0)
results = []
# (batch, length, heads, head_dim, state, groups, dt_limit, initial state, final state, packed, D):
# chunks of 16 tokens, so every case crosses chunks and most end in a partial one.
for b, l, h, p, n, g, limit, init, final, packed, with_D in [
        (1, 40, 2, 16, 16, 1, (0.0, math.inf), False, False, False, True),
        (2, 50, 4, 32, 32, 2, (0.001, 0.2), True, True, False, True),
        (2, 70, 4, 16, 32, 1, (0.0, math.inf), False, False, True, True),
        (1, 33, 2, 16, 16, 1, (0.0, math.inf), False, True, False, False)]:
    # x, B, C as the mixer passes them: strided views of one [b, l, channels] conv output.
    conv = torch.randn(b, l, h * p + 2 * g * n + 3)
    x = conv[..., :h * p].unflatten(-1, (h, p))
    B = conv[..., h * p:h * p + g * n].unflatten(-1, (g, n)) * n ** -0.5
    C = conv[..., h * p + g * n:h * p + 2 * g * n].unflatten(-1, (g, n)) * n ** -0.5
    dt = torch.randn(l, b, h).transpose(0, 1) * 0.5
    A, D, bias = -torch.rand(h) * 4 - 0.5, torch.randn(h) if with_D else None, torch.randn(h) * 0.5
    h0 = torch.randn(b, h, p, n) if init else None
    seq_idx = None
    if packed:  # three documents per row, cut at random places
        seq_idx = torch.zeros(b, l, dtype=torch.long)
        for row in range(b):
            for cut in torch.randint(1, l, (2,)).tolist():
                seq_idx[row, cut:] += 1
    leaves = [t for t in (x, dt, A, B, C, D, bias, h0) if t is not None]
    dy, dfinal = torch.randn(b, l, h, p), torch.randn(b, h, p, n)
    outputs = []
    for scan in ("torch", "triton"):
        ls = [t.detach().clone().requires_grad_(True) for t in leaves]
        args = dict(zip([k for k, t in zip("x dt A B C D bias h0".split(), (x, dt, A, B, C, D, bias, h0)) if t is not None], ls))
        kw = dict(D=args.get("D"), dt_bias=args["bias"], dt_limit=limit, initial_state=args.get("h0"),
                  return_final_state=final, seq_idx=seq_idx)
        if scan == "torch":
            out = ssd_scan(args["x"], args["dt"], args["A"], args["B"], args["C"], chunk_size=32, backend="torch", **kw)
        else:
            out = ssd_scan_triton(args["x"], args["dt"], args["A"], args["B"], args["C"], tile=dict(chunk=16), **kw)
        y, f = out if final else (out, None)
        ((y * dy).sum() + ((f * dfinal).sum() if final else 0)).backward()
        outputs.append([y] + ([f] if final else []) + [t.grad for t in ls])
    results.append(dict(shape=[b, l, h, p, n, g], init=init, final=final, packed=packed,
                        errors=[((t - r).norm() / r.norm()).item() for r, t in zip(*outputs)]))
print("RESULTS", json.dumps(results))
"""


# Triton 3.6's interpreter turns a scalar argument into a one-element array and then calls int()
# on it, which numpy 2.5 refuses; kernels looping over a runtime count (range(chunks)) need .item().
NUMPY_2_5_INDEX = """
import triton.runtime.interpreter as interpreter
_patch_lang_tensor = interpreter._patch_lang_tensor
def _with_item_index(tensor, scope):
    _patch_lang_tensor(tensor, scope)
    scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.item()))
interpreter._patch_lang_tensor = _with_item_index
"""


def interpreted(script: str) -> list[dict]:
    done = subprocess.run([sys.executable, "-c", NUMPY_2_5_INDEX + script], capture_output=True, text=True, timeout=600, cwd=REPO,
                          env=dict(os.environ, TRITON_INTERPRET="1"))
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads(done.stdout.split("RESULTS", 1)[1])


def test_swiglu_kernels_match_torch_in_the_interpreter():
    results = interpreted(SWIGLU)
    assert len(results) == 2
    for case in results:
        assert max(case["errors"]) < 1e-6, case  # y, dx


def test_rms_norm_kernels_match_torch_in_the_interpreter():
    results = interpreted(RMS_NORM)
    assert len(results) == 2
    for case in results:
        assert max(case["errors"]) < 1e-5, case  # y, dx, dweight


def test_rope_kernel_matches_torch_in_the_interpreter():
    """RoPE on a strided view of the in-projection, odd head counts, head dims 64/96/128, one angle
    per position or per (position, row) as packed documents give: output and input gradient."""
    results = interpreted(ROPE)
    assert len(results) == 3
    for case in results:
        assert case["contiguous"], case
        assert max(case["errors"]) < 1e-6, case  # y, dt


def test_fused_cross_entropy_matches_torch_in_the_interpreter():
    """Multiplier and vocabulary padding folded in; the loss and logit gradients equal torch's, on
    one rank and split over two tensor-parallel ranks (gloo), padding columns getting zero gradient."""
    results = interpreted(CROSS_ENTROPY)
    assert [case["tp"] for case in results] == [1, 2]
    for case in results:
        assert max(case["errors"]) < 1e-5, case  # loss, dlogits


def test_conv1d_silu_kernels_match_torch_in_the_interpreter():
    """Shapes cross the tiles and leave partial ones; the input is the mixer's strided
    channels-last view of an in-projection output; with and without bias; widths 4 and 3; packed
    documents (seq_idx) against the torch path that convolves each document alone."""
    results = interpreted(CONV)
    assert len(results) == 4
    for case in results:
        assert case["channels_last"], case
        assert max(case["errors"]) < 1e-5, case  # y, dx, dweight (, dbias)


def test_ssd_scan_kernels_match_torch_in_the_interpreter():
    """The project's Triton SSD scan, forward and backward, against the chunked torch scan: several
    chunks and a partial last one, 1 and 2 groups, the dt limit, an initial state in and the final
    state out (both with gradients), packed documents (seq_idx), no D; strided inputs."""
    results = interpreted(SSD)
    assert len(results) == 4
    for case in results:
        assert max(case["errors"]) < 1e-4, case  # y (, final), dx, ddt, dA, dB, dC (, dD), ddt_bias (, dh0)
