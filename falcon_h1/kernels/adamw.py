"""AdamW over all of an optimizer's tensors in one Triton launch, writing the bf16 model weights too.

torch's fused AdamW (what Megatron runs without Apex or TE) reads each float32 main weight,
gradient and both moments and writes the weight and moments back; given a `grad_scale` it also
writes the divided gradient back (32 bytes a parameter). Megatron then copies each main weight
into its bf16 model weight (6 bytes more, one launch per tensor). This kernel reads the four,
divides the gradient by grad_scale as it loads it and never writes it, and writes the weight, the
moments and the bf16 copy: 30 bytes a parameter, one launch per parameter group.

The arithmetic follows torch's fused CUDA AdamW (aten/src/ATen/native/cuda/fused_adam_utils.cuh,
float32 throughout since torch took its betas and lr as float32 and its moments with fmas, early
2026) operation for operation; tests/test_optimizer_step.py compares the two on the GPU:

    g  = grad / grad_scale                                  (IEEE division)
    w  = fma(-(lr * wd), w, w)                              (decoupled weight decay, before the update)
    m  = fma(b1, m, fma(-b1, g, g))                         (b1 m + (1 - b1) g)
    v  = fma(b2, v, fma(-b2, g*g, g*g))
    c1 = 1 - b1^step,  c2 = sqrt(1 - b2^step)               (each tensor's own step, counted first)
    w  = w - (lr / c1) * m / (sqrt(v) / c2 + eps)           (IEEE division and square root)
    model weight = w rounded to the nearest bf16 (ties to even), as torch's .to(torch.bfloat16)

The powers b^step are taken by torch.pow on the device (powf, as torch's kernel does), so the step
needs no host sync. Tensors are found through per-tensor element offsets from the first tensor of
each list (any layout; a table of block -> tensor); when every tensor is 16-byte aligned the kernel
is told so and loads and stores 16 bytes at a time.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs
    triton = None

BLOCK = 4096  # elements per program: 16 per thread at 8 warps, in 16-byte vectors
NUM_WARPS = 8

if triton is not None:
    @triton.jit
    def _to_bf16(x):
        """Round to nearest, ties to even, as torch's float -> bf16 on the GPU (cvt.rn, NaN to the
        canonical 0x7FFF). Spelled out because Triton's interpreter truncates in .to(tl.bfloat16)."""
        bits = x.to(tl.uint32, bitcast=True)
        rounded = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).to(tl.uint16)
        return tl.where(x != x, 0x7FFF, rounded).to(tl.uint16).to(tl.bfloat16, bitcast=True)

    @triton.jit
    def _adamw_block(w_ptr, g_ptr, m_ptr, v_ptr, model_ptr, idx, mask, scale_ptr, lr, beta1, beta2, weight_decay,
                     eps, step_size, bias_correction2_sqrt, HAS_SCALE: tl.constexpr, HAS_DECAY: tl.constexpr,
                     WRITE_MODEL: tl.constexpr):
        w = tl.load(w_ptr + idx, mask=mask)
        g = tl.load(g_ptr + idx, mask=mask)
        m = tl.load(m_ptr + idx, mask=mask)
        v = tl.load(v_ptr + idx, mask=mask)
        if HAS_SCALE:
            g = tl.div_rn(g, tl.load(scale_ptr))
        if HAS_DECAY:
            w = tl.fma(-(lr * weight_decay), w, w)
        m = tl.fma(beta1, m, tl.fma(-beta1, g, g))
        g2 = g * g
        v = tl.fma(beta2, v, tl.fma(-beta2, g2, g2))
        denom = tl.div_rn(tl.sqrt_rn(v), bias_correction2_sqrt) + eps
        w = w - tl.div_rn(step_size * m, denom)
        tl.store(w_ptr + idx, w, mask=mask)
        tl.store(m_ptr + idx, m, mask=mask)
        tl.store(v_ptr + idx, v, mask=mask)
        if WRITE_MODEL:
            tl.store(model_ptr + idx, _to_bf16(w), mask=mask)

    @triton.jit
    def _adamw_kernel(w_base, g_base, m_base, v_base, model_base, offsets, numels, tensor_of_block, first_block,
                      beta1_powers, beta2_powers, scale_ptr, num_tensors, lr, beta1, beta2, weight_decay, eps,
                      BLOCK: tl.constexpr, ALIGNED: tl.constexpr, HAS_SCALE: tl.constexpr,
                      HAS_DECAY: tl.constexpr, WRITE_MODEL: tl.constexpr):
        block = tl.program_id(0)
        t = tl.load(tensor_of_block + block)
        start = (block - tl.load(first_block + t)).to(tl.int64) * BLOCK
        numel = tl.load(numels + t)
        # Each tensor's place, in elements from the first tensor of its list.
        w_off = tl.load(offsets + t)
        g_off = tl.load(offsets + num_tensors + t)
        m_off = tl.load(offsets + 2 * num_tensors + t)
        v_off = tl.load(offsets + 3 * num_tensors + t)
        model_off = tl.load(offsets + 4 * num_tensors + t)
        if ALIGNED:  # 16-byte vectors: 4 float32, 8 bf16
            w_off = tl.multiple_of(w_off, 4)
            g_off = tl.multiple_of(g_off, 4)
            m_off = tl.multiple_of(m_off, 4)
            v_off = tl.multiple_of(v_off, 4)
            model_off = tl.multiple_of(model_off, 8)
        step_size = tl.div_rn(lr, 1.0 - tl.load(beta1_powers + t))
        bias_correction2_sqrt = tl.sqrt_rn(1.0 - tl.load(beta2_powers + t))
        idx = start + tl.arange(0, BLOCK)
        if start + BLOCK <= numel:  # a whole block: no mask, so the accesses can be vectors
            _adamw_block(w_base + w_off, g_base + g_off, m_base + m_off, v_base + v_off, model_base + model_off,
                         idx, None, scale_ptr, lr, beta1, beta2, weight_decay, eps, step_size,
                         bias_correction2_sqrt, HAS_SCALE, HAS_DECAY, WRITE_MODEL)
        else:
            _adamw_block(w_base + w_off, g_base + g_off, m_base + m_off, v_base + v_off, model_base + model_off,
                         idx, idx < numel, scale_ptr, lr, beta1, beta2, weight_decay, eps, step_size,
                         bias_correction2_sqrt, HAS_SCALE, HAS_DECAY, WRITE_MODEL)


@dataclass
class _Tables:
    """Where the kernel finds each tensor of one call's lists, on the device."""

    key: tuple
    bases: list  # the first tensor of each list; offsets count elements from it
    offsets: torch.Tensor  # int64 [5, tensors]: weight, gradient, m, v, model weight
    numels: torch.Tensor  # int64 [tensors]
    tensor_of_block: torch.Tensor  # int32 [blocks]
    first_block: torch.Tensor  # int32 [tensors]
    aligned: bool


def _tables(lists: list[list[torch.Tensor]], key: tuple) -> _Tables:
    device = lists[0][0].device
    bases = [tensors[0] for tensors in lists]
    offsets = []
    for tensors, base in zip(lists, bases):
        size = base.element_size()
        offsets.append([(t.data_ptr() - base.data_ptr()) // size for t in tensors])
    numels = [t.numel() for t in lists[0]]
    blocks = [triton.cdiv(n, BLOCK) for n in numels]
    first = list(itertools.accumulate(blocks, initial=0))[:-1]
    tensor_of_block = torch.repeat_interleave(torch.arange(len(numels), dtype=torch.int32),
                                              torch.tensor(blocks, dtype=torch.int64))
    aligned = all(t.data_ptr() % 16 == 0 for tensors in lists for t in tensors)

    def on_device(values, dtype):  # pinned and asynchronous: no wait for the GPU's queued work
        host = values if isinstance(values, torch.Tensor) else torch.tensor(values, dtype=dtype)
        if device.type == "cuda":
            return host.pin_memory().to(device, non_blocking=True)
        return host

    return _Tables(key, bases, on_device(offsets, torch.int64), on_device(numels, torch.int64),
                   on_device(tensor_of_block, torch.int32), on_device(first, torch.int32), aligned)


def _check(params, grads, exp_avgs, exp_avg_sqs, models) -> None:
    for i, (w, g, m, v) in enumerate(zip(params, grads, exp_avgs, exp_avg_sqs)):
        for name, t in (("weight", w), ("gradient", g), ("exp_avg", m), ("exp_avg_sq", v)):
            if t.dtype != torch.float32 or not t.is_contiguous() or t.numel() != w.numel() or t.device != w.device:
                raise ValueError(f"adamw kernel: tensor {i}'s {name} must be a contiguous float32 tensor of the "
                                 f"weight's size and device, got {t.dtype} {tuple(t.shape)} on {t.device}")
        if models is not None and (models[i].dtype != torch.bfloat16 or not models[i].is_contiguous()
                                   or models[i].numel() != w.numel()):
            raise ValueError(f"adamw kernel: tensor {i}'s model weight must be a contiguous bf16 tensor of the "
                             f"weight's size, got {models[i].dtype} {tuple(models[i].shape)}")


class MultiTensorAdamW:
    """AdamW steps of lists of tensors, one kernel launch each. Keeps the tables that locate the
    tensors between calls and builds them again when any tensor moves (a loaded checkpoint's new
    moments, say)."""

    def __init__(self):
        self._tables: _Tables | None = None

    @torch.no_grad()
    def step(self, params: list[torch.Tensor], grads: list[torch.Tensor], exp_avgs: list[torch.Tensor],
             exp_avg_sqs: list[torch.Tensor], steps: list[torch.Tensor], models: list[torch.Tensor] | None, *,
             lr: float, beta1: float, beta2: float, weight_decay: float, eps: float,
             grad_scale: torch.Tensor | None = None) -> None:
        """One AdamW step of every tensor, as torch.optim.AdamW(fused=True) takes it: each `steps`
        tensor (a float32 scalar per parameter, on its device) is counted up first. The gradients
        are divided by `grad_scale` (a float32 scalar tensor) as they are read and left unchanged;
        `models` (bf16 tensors, or None) receive the updated weights rounded to bf16."""
        torch._foreach_add_(steps, 1)
        if not all(p.numel() for p in params):  # an empty shard has nothing to step, nor an address
            keep = [i for i, p in enumerate(params) if p.numel()]
            params, grads, exp_avgs, exp_avg_sqs, steps = (
                [tensors[i] for i in keep] for tensors in (params, grads, exp_avgs, exp_avg_sqs, steps))
            models = [models[i] for i in keep] if models is not None else None
        if not params:
            return
        lists = [params, grads, exp_avgs, exp_avg_sqs, models if models is not None else params]
        key = tuple(tuple(map(torch.Tensor.data_ptr, tensors)) for tensors in lists) + (
            tuple(map(torch.Tensor.numel, params)), models is not None)
        if self._tables is None or self._tables.key != key:
            _check(params, grads, exp_avgs, exp_avg_sqs, models)
            self._tables = _tables(lists, key)
        tables = self._tables
        counts = torch.stack(steps)
        beta1_powers, beta2_powers = torch.pow(beta1, counts), torch.pow(beta2, counts)
        w_base, g_base, m_base, v_base, model_base = tables.bases
        blocks = tables.tensor_of_block.numel()
        _adamw_kernel[(blocks,)](
            w_base, g_base, m_base, v_base, model_base, tables.offsets, tables.numels, tables.tensor_of_block,
            tables.first_block, beta1_powers, beta2_powers, grad_scale if grad_scale is not None else w_base,
            len(params), float(lr), float(beta1), float(beta2), float(weight_decay), float(eps), BLOCK=BLOCK,
            ALIGNED=tables.aligned, HAS_SCALE=grad_scale is not None, HAS_DECAY=weight_decay != 0,
            WRITE_MODEL=models is not None, num_warps=NUM_WARPS)
