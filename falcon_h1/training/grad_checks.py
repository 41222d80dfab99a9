"""The NaN/Inf check of the gradients, with one host sync per step instead of two per gradient
bucket, and, with the fused gradient scaling, without a pass of its own over the gradients.

Megatron's DDP (`check_for_nan_in_grad`) takes a bucket's gradient norm as soon as the bucket is
ready during backward, and turns it into a Python bool at once: two host syncs per bucket (52 in a
1.5B step), each stalling the CPU until the GPU has caught up, so the CPU cannot queue the next
layers' work ahead of the GPU. Here each bucket's norm stays on the device and all of them are
checked together when the gradients are finalized, before the optimizer step: a NaN or Inf still
stops the step before any weight changes, and the error names the bucket as Megatron's does.

Those bucket norms read every gradient (4 bytes a parameter) just before the optimizer step reads
them all again for the clipping norm. Where the step takes that norm itself (grad_scale.py), the
check can use it instead (`check_gradient_norm`): a NaN or Inf in any rank's gradient survives the
data-parallel reduction (a sum) into the reduced gradient that one rank owns, that rank's share
of the norm, and the norm summed over all ranks, so every rank sees it and stops before the
update. The gradients the norm leaves out (copies another rank also holds: parameters replicated
over tensor-parallel ranks, counted on TP rank 0 only) are checked apart on each rank, so a NaN in
one copy alone still stops that rank, as the bucket check did.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist


class DeferredGradCheck:
    """Installed on DDP-wrapped model chunks; `verify()` after the gradients are finalized. After
    `check_gradient_norm()`, backward takes no bucket norms and the optimizer step calls
    `verify_gradient_norm()` with the norm it took."""

    def __init__(self, ddp_chunks):
        self.chunks = list(ddp_chunks)
        self.bucket_norms = True  # False once the optimizer step's gradient norm does the check
        self.pending: list[tuple[list[str], torch.Tensor]] = []  # (bucket names, their norms)
        self.groups = []
        for chunk_index, chunk in enumerate(ddp_chunks):
            groups = list(chunk.bucket_groups) + list(chunk.expert_parallel_bucket_groups)
            self.groups += groups
            for group_index, group in enumerate(groups):
                names = [f"model chunk {chunk_index}, bucket group {group_index}, bucket {i}"
                         for i in range(len(group.buckets))]
                group.check_grads = self._deferred(group, names, group.check_grads)

    def remove(self) -> None:
        """Give the bucket groups back Megatron's own check."""
        for group in self.groups:
            group.__dict__.pop("check_grads", None)
        self.groups, self.pending, self.chunks = [], [], []

    def check_gradient_norm(self) -> None:
        """Leave the check to the optimizer step, which takes the norm of all gradients anyway (to
        clip them) and calls verify_gradient_norm: backward no longer reads every gradient for
        the bucket norms."""
        self.bucket_norms = False
        self.pending.clear()

    def _deferred(self, group, names, megatron_check):
        def check_grads(check_for_nan_or_inf, check_for_large):
            if check_for_large:  # compares with earlier steps on the host: Megatron's own check
                return megatron_check(check_for_nan_or_inf, check_for_large)
            if check_for_nan_or_inf and self.bucket_norms:
                self.pending.append((names, torch.stack([bucket.grad_data.norm(p=2) for bucket in group.buckets])))
        return check_grads

    def verify(self) -> None:
        """Raise if any bucket checked since the last call had a NaN or Inf gradient."""
        if not self.pending:
            return
        names = [name for bucket_names, _ in self.pending for name in bucket_names]
        norms = torch.cat([norms for _, norms in self.pending])
        self.pending.clear()
        bad = ~torch.isfinite(norms)
        if bad.any():  # the step's one host sync for this check
            rank = dist.get_rank() if dist.is_initialized() else 0
            found = "; ".join(f"{name}: norm {norm}" for name, norm, b in zip(names, norms.tolist(), bad.tolist()) if b)
            raise RuntimeError(
                f"rank {rank}: NaN or Inf in this rank's gradients before the data-parallel reduction ({found}). "
                "The optimizer step was not taken. Resume from the last checkpoint; if it recurs at the "
                "same step, lower the learning rate or check the data, and if only one rank reports it, "
                "check that GPU.")

    def verify_gradient_norm(self, norm: float, left_out_norm: torch.Tensor | None = None) -> None:
        """Raise if the optimizer step's gradient norm (over the reduced gradients, summed over all
        ranks: the same on every rank) is NaN or Inf, or if `left_out_norm`, the norm of this
        rank's gradients that it leaves out (params_left_out_of_the_norm), is."""
        left_out_bad = left_out_norm is not None and not bool(torch.isfinite(left_out_norm))
        if math.isfinite(norm) and not left_out_bad:
            return
        rank = dist.get_rank() if dist.is_initialized() else 0
        where = self._non_finite_gradients()
        found = f"gradient norm {norm}" if not left_out_bad else \
            f"the norm of the gradients of parameters the gradient norm counts on another rank: {float(left_out_norm)}"
        raise RuntimeError(
            f"rank {rank}: NaN or Inf in the gradients ({found}). This rank's gradient buffers hold NaN or Inf in: "
            f"{', '.join(where) if where else 'none (it came from another rank, or the norm overflowed)'}. The "
            "optimizer step was not taken. Resume from the last checkpoint; if it recurs at the same step, lower the "
            "learning rate or check the data, and if only one rank's buffers name parameters, check that GPU.")

    def _non_finite_gradients(self, limit: int = 8) -> list[str]:
        """Names of this rank's parameters whose gradient buffer holds a NaN or Inf (its own
        gradient, and the data-parallel sum in the shard it owns); the error path only."""
        names = []
        for chunk in self.chunks:
            for name, param in chunk.named_parameters():
                grad = getattr(param, "main_grad", None)
                if grad is not None and not bool(torch.isfinite(grad).all()):
                    names.append(name)
        return names[:limit] + ([f"... ({len(names) - limit} more)"] if len(names) > limit else [])


def params_left_out_of_the_norm(optimizer) -> list[torch.nn.Parameter]:
    """The parameters (of `optimizer`'s torch optimizers, with gradients) whose gradients
    Megatron's gradient norm leaves out on this rank: parameters replicated over tensor-parallel
    ranks (counted on TP rank 0), shared ones (a tied embedding's copy on the last pipeline
    stage). Call after prepare_grads: Megatron's filter looks at the gradients."""
    left_out = []
    for inner in getattr(optimizer, "chained_optimizers", [optimizer]):
        # The class's method: count_replicated_rows_once wraps the instance's, and hands out scaled copies.
        counted = {id(grad) for grad in type(inner).get_grads_for_grad_norm(inner)}
        left_out += [p for p in inner.get_parameters() if p.grad is not None and id(p.grad) not in counted]
    return left_out
