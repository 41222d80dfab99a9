"""The per-token loss's 1/tokens and the clipping factor, applied by the fused Adam as it reads
each gradient instead of in two passes over every gradient.

Megatron finalizes per-token-loss gradients by multiplying all of them by 1/tokens, then clips by
multiplying them again by max_norm / norm: two read-write passes over the float32 gradients,
5.0 and 4.6 ms of a 1.5B step on an H100, at any sequence length. torch's fused Adam divides each
gradient by the optimizer's `grad_scale` tensor as it loads it (the hook torch.amp.GradScaler
uses), so both factors ride on that load:

- finalizing leaves the gradients summed over tokens and keeps the global token count;
- the norm of those sums divided by the count is the norm of the per-token gradients (a norm
  scales with its argument), and sets the clip factor as Megatron computes it;
- grad_scale = tokens / clip factor, one scalar for every parameter.

torch's fused kernel writes the divided gradient back, so after its step the gradients are what
Megatron's passes would have left, up to rounding (tests/test_training_parts.py checks this on the
CPU's fused kernel). The project's Triton AdamW (optim.TritonAdamW, on CUDA) divides them as it
reads them and leaves them summed over tokens: nothing reads the gradients after the step (the
next step's zero_grad_buffer clears them), and not writing them saves 4 bytes a parameter.

The same gradient norm serves the NaN/Inf check (grad_checks.py): with check_for_nan_in_grad the
strategy leaves the check to it, and `step` raises before any update when it is NaN or Inf.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from falcon_h1.training.grad_checks import params_left_out_of_the_norm


def _inner_optimizers(optimizer) -> list:
    return list(getattr(optimizer, "chained_optimizers", [optimizer]))


class FusedGradScale:
    """Steps a Megatron optimizer whose inner optimizers are torch's fused Adam(W), scaling the
    gradients inside the Adam kernel; `record_tokens` is called when the gradients are finalized."""

    def __init__(self, optimizer):
        self.optimizer = optimizer
        self.num_tokens: torch.Tensor | None = None
        self.grad_check = None  # the NaN/Inf check finalize left pending (grad_checks.DeferredGradCheck)
        self._left_out: list | None = None  # params_left_out_of_the_norm, found at the first checked step
        # (torch optimizer, its grad_scale tensor on its parameters' device); a rank whose shard of
        # the distributed optimizer holds none of an optimizer's parameters has nothing to scale.
        self._grad_scales = []
        for inner in _inner_optimizers(optimizer):
            params = [p for group in inner.optimizer.param_groups for p in group["params"]]
            if params:
                self._grad_scales.append((inner.optimizer, torch.empty((), dtype=torch.float32,
                                                                          device=params[0].device)))

    @staticmethod
    def applies_to(optimizer) -> bool:
        """torch's fused Adam(W) everywhere (what build_optimizer sets up without Apex or TE), and
        gradients in `.grad` (not the precision-aware optimizer's decoupled ones)."""
        if optimizer.config.use_precision_aware_optimizer:
            return False
        for inner in _inner_optimizers(optimizer):
            torch_optimizer = getattr(inner, "optimizer", None)
            if type(torch_optimizer) not in (torch.optim.Adam, torch.optim.AdamW):
                return False
            if not all(group.get("fused") for group in torch_optimizer.param_groups):
                return False
        return True

    def record_tokens(self, num_tokens: torch.Tensor, grad_check=None) -> None:
        """The global count of loss tokens: this rank's count, made the sum over data-parallel and
        context-parallel ranks (the last pipeline stage has it; the others receive it), as
        Megatron's finalize_model_grads does before it would divide the gradients by it.
        `grad_check`'s NaN/Inf verdict is read in `step`, after the gradient norm's host sync, so
        that finalizing makes none: the CPU prepares the step while the GPU ends the backward;
        once the check was left to the gradient norm (check_gradient_norm), the norm is checked."""
        self.grad_check = grad_check
        if dist.is_initialized():
            pp_group = parallel_state.get_pipeline_model_parallel_group()
            last_stage = dist.get_global_rank(pp_group, dist.get_world_size(pp_group) - 1)
            dist.broadcast(num_tokens, src=last_stage, group=pp_group)
            dist.all_reduce(num_tokens, group=parallel_state.get_data_parallel_group(with_context_parallel=True))
        self.num_tokens = num_tokens

    @torch.no_grad()
    def step(self) -> tuple[bool, float | None, int | None]:
        """Megatron's optimizer step (successful, grad norm, zeros in the gradients), with the
        gradients' scaling moved into the Adam kernel."""
        optimizer = self.optimizer
        if self.num_tokens is None:
            raise RuntimeError("FusedGradScale.step: no token count was recorded when the gradients were "
                               "finalized; the gradients would be applied as sums over tokens")
        num_tokens, self.num_tokens = self.num_tokens, None
        grad_check, self.grad_check = self.grad_check, None
        overflow = optimizer.prepare_grads()  # fp16 loss scaling found an Inf or NaN
        left_out_norm = None
        if grad_check is not None and not grad_check.bucket_norms and not overflow:
            left_out_norm = self._left_out_norm()  # queued before the sync, read after it
        raw_norm = None if overflow else optimizer.get_grad_norm()  # the step's host sync
        if grad_check is not None:  # both raise on a NaN or Inf gradient, before any weight changes
            grad_check.verify()  # the bucket norms backward took, unless the check was left to the norm
            if raw_norm is not None:
                grad_check.verify_gradient_norm(float(raw_norm), left_out_norm)
        if overflow:  # skip the step, as Megatron does
            return False, None, None
        tokens = max(float(num_tokens.item()), 1.0)
        grad_norm = raw_norm / tokens
        clip_grad = optimizer.config.clip_grad
        clip = min(1.0, clip_grad / (grad_norm + 1.0e-6)) if clip_grad > 0.0 else 1.0
        for torch_optimizer, grad_scale in self._grad_scales:
            # A kernel argument, not a host-to-device copy: no wait for the GPU.
            torch_optimizer.grad_scale = grad_scale.fill_(tokens / clip)
        num_zeros = optimizer.count_zeros() if optimizer.config.log_num_zeros_in_grad else None
        threshold = optimizer.config.grad_norm_skip_threshold
        if math.isfinite(threshold) and grad_norm > threshold:
            return False, grad_norm, num_zeros
        return optimizer.step_with_ready_grads(), grad_norm, num_zeros

    def _left_out_norm(self) -> torch.Tensor | None:
        """The norm (on the device) of this rank's gradients the gradient norm leaves out, or None
        when it counts them all (TP = 1 without shared parameters: nothing more to read)."""
        if self._left_out is None:
            self._left_out = params_left_out_of_the_norm(self.optimizer)
        grads = [p.grad for p in self._left_out if p.grad is not None]
        if not grads:
            return None
        return torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))
