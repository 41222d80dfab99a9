"""The language-model loss over (tensor-parallel) vocabulary logits, with Falcon-H1's lm_head
multiplier and the vocabulary padding folded in, in one Triton pass forward and one backward.

    z = round(logits * multiplier)          (as transformers scales its bf16 logits)
    loss = logsumexp(z over the real vocabulary) - z[label]

Megatron's vocab-parallel cross-entropy, after the model's multiplier pass and padding mask, makes
about a dozen passes over float32 copies of the [tokens, vocab] logits and keeps a float32 softmax
for backward (2 GiB at 8192 tokens and a 65k vocabulary). Here the forward reads the logits once
(online max and sum of exponentials per row); under tensor parallelism the per-rank maxima, sums
and label logits are all-reduced as Megatron does. The backward writes
    dlogits = dloss * multiplier * (softmax(z) - onehot(label))
over the logits themselves (nothing else reads them after the loss), so only the logits and two
floats per token are kept.

Labels outside this rank's slice of the vocabulary contribute no label logit here (another rank
holds it); out-of-range labels such as padding get a loss that the loss mask removes.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs
    triton = None

BLOCK = 4096

if triton is not None:
    @triton.jit
    def _scaled(x, multiplier):
        """z = round(x * multiplier) to x's dtype, as float32."""
        return (x.to(tl.float32) * multiplier).to(x.dtype).to(tl.float32)

    @triton.jit
    def _scaled_logits(logits_ptr, row_offset, cols, valid, multiplier):
        """z for one block of a row's columns; -inf on padding columns."""
        ok = cols < valid
        z = _scaled(tl.load(logits_ptr + row_offset + cols, mask=ok, other=0.0), multiplier)
        return tl.where(ok, z, float("-inf"))

    @triton.jit
    def _ce_fwd(logits_ptr, labels_ptr, max_ptr, sum_ptr, label_logit_ptr, width, valid, vocab_start,
                multiplier, BLOCKS: tl.constexpr, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        offset = row * width
        running_max = tl.full([BLOCK], float("-inf"), tl.float32)
        running_sum = tl.zeros([BLOCK], tl.float32)
        for block in range(BLOCKS):
            z = _scaled_logits(logits_ptr, offset, block * BLOCK + tl.arange(0, BLOCK), valid, multiplier)
            new_max = tl.maximum(running_max, z)
            # exp(-inf - -inf) would be NaN: lanes still at -inf hold a zero sum.
            rescale = tl.where(running_max == float("-inf"), 0.0, tl.exp(running_max - new_max))
            running_sum = running_sum * rescale + tl.where(z == float("-inf"), 0.0, tl.exp(z - new_max))
            running_max = new_max
        row_max = tl.max(running_max, axis=0)
        lane_scale = tl.where(running_max == float("-inf"), 0.0, tl.exp(running_max - row_max))
        tl.store(max_ptr + row, row_max)
        tl.store(sum_ptr + row, tl.sum(running_sum * lane_scale, axis=0))
        local = tl.load(labels_ptr + row) - vocab_start
        here = (local >= 0) & (local < valid)
        z = _scaled(tl.load(logits_ptr + offset + tl.where(here, local, 0)), multiplier)
        tl.store(label_logit_ptr + row, tl.where(here, z, 0.0))

    @triton.jit
    def _ce_bwd(logits_ptr, labels_ptr, max_ptr, sum_ptr, dloss_ptr, width, valid, vocab_start, multiplier,
                BLOCKS: tl.constexpr, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        offset = row * width
        row_max = tl.load(max_ptr + row)
        inv_sum = 1.0 / tl.load(sum_ptr + row)
        scale = tl.load(dloss_ptr + row) * multiplier
        local = tl.load(labels_ptr + row) - vocab_start
        for block in range(BLOCKS):
            cols = block * BLOCK + tl.arange(0, BLOCK)
            z = _scaled_logits(logits_ptr, offset, cols, valid, multiplier)
            grad = tl.exp(z - row_max) * inv_sum - tl.where(cols == local, 1.0, 0.0)
            tl.store(logits_ptr + offset + cols, (grad * scale).to(logits_ptr.dtype.element_ty), mask=cols < width)


class _VocabParallelCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, labels, multiplier, valid, vocab_start, tp_group):
        width = logits.shape[-1]
        rows = logits.numel() // width
        flat = logits.view(rows, width)
        labels = labels.reshape(rows).contiguous()
        row_max, sum_exp, label_logit = (torch.empty(rows, device=logits.device, dtype=torch.float32)
                                         for _ in range(3))
        _ce_fwd[(rows,)](flat, labels, row_max, sum_exp, label_logit, width, valid, vocab_start, multiplier,
                         BLOCKS=triton.cdiv(width, BLOCK), BLOCK=BLOCK, num_warps=8)
        if tp_group is not None and dist.get_world_size(tp_group) > 1:
            global_max = row_max.clone()
            dist.all_reduce(global_max, op=dist.ReduceOp.MAX, group=tp_group)
            sums = torch.stack([sum_exp * torch.exp(row_max - global_max), label_logit])
            dist.all_reduce(sums, group=tp_group)
            row_max, (sum_exp, label_logit) = global_max, sums
        ctx.save_for_backward(flat, labels, row_max, sum_exp)
        ctx.constants = (multiplier, valid, vocab_start)
        ctx.logits_shape = logits.shape
        return (torch.log(sum_exp) + row_max - label_logit).view(logits.shape[:-1])

    @staticmethod
    def backward(ctx, dloss):
        flat, labels, row_max, sum_exp = ctx.saved_tensors
        multiplier, valid, vocab_start = ctx.constants
        rows, width = flat.shape
        _ce_bwd[(rows,)](flat, labels, row_max, sum_exp, dloss.reshape(rows).float().contiguous(), width, valid,
                         vocab_start, multiplier, BLOCKS=triton.cdiv(width, BLOCK), BLOCK=BLOCK, num_warps=8)
        return flat.view(ctx.logits_shape), None, None, None, None, None


def vocab_parallel_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, multiplier: float, valid: int,
                                 vocab_start: int = 0, tp_group=None) -> torch.Tensor:
    """Per-token loss [...] of logits [..., local vocab] (this rank's columns vocab_start ..
    vocab_start + local - 1, of which the first `valid` are real) against labels [...], the logits
    scaled by `multiplier` first. The backward overwrites `logits` with their gradient."""
    if triton is None:
        raise RuntimeError("vocab_parallel_cross_entropy needs Triton")
    if not logits.is_contiguous():
        raise ValueError("vocab_parallel_cross_entropy takes contiguous logits")
    return _VocabParallelCrossEntropy.apply(logits, labels, float(multiplier), int(valid), int(vocab_start), tp_group)
