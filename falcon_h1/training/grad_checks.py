"""The NaN/Inf check of each rank's gradients before their data-parallel reduction, with one host
sync per step instead of two per gradient bucket.

Megatron's DDP (`check_for_nan_in_grad`) takes a bucket's gradient norm as soon as the bucket is
ready during backward, and turns it into a Python bool at once: two host syncs per bucket (52 in a
1.5B step), each stalling the CPU until the GPU has caught up, so the CPU cannot queue the next
layers' work ahead of the GPU. Here each bucket's norm stays on the device and all of them are
checked together when the gradients are finalized, before the optimizer step: a NaN or Inf still
stops the step before any weight changes, and the error names the bucket as Megatron's does.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


class DeferredGradCheck:
    """Installed on DDP-wrapped model chunks; `verify()` after the gradients are finalized."""

    def __init__(self, ddp_chunks):
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
        self.groups, self.pending = [], []

    def _deferred(self, group, names, megatron_check):
        def check_grads(check_for_nan_or_inf, check_for_large):
            if check_for_large:  # compares with earlier steps on the host: Megatron's own check
                return megatron_check(check_for_nan_or_inf, check_for_large)
            if check_for_nan_or_inf:
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
