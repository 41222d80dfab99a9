"""One optimizer step, from the last micro-batch's backward to the updated weights: `OptimizerStep`.

FalconH1Module makes one with its optimizer; MegatronStrategy installs its `finalize_gradients`
as the `finalize_model_grads_func` that Megatron's schedule calls after backward; the module's
`training_step` calls `step` and logs `grad_norm`. What happens, in order:

1. finalize_gradients: Megatron's finalization (data-parallel reduction, sequence-parallel norm
   gradients, tied embeddings), then the sum over tensor-parallel replicas of the mixer's
   replicated rows (model/tensor_parallel.py), then the global count of loss tokens.
2. step: the gradient norm (the step's one host sync), which is also the NaN/Inf check, then
   the clip factor, then AdamW with each gradient divided by tokens / clip as it is read.

Why the scaling rides on AdamW's load: Megatron finalizes per-token-loss gradients by multiplying
all of them by 1/tokens, then clips by multiplying them by max_norm / norm: two read-write passes
over the float32 gradients (5.0 and 4.6 ms of a 1.5B step on an H100). torch's fused Adam divides
each gradient by its optimizer's `grad_scale` tensor as it loads it (the hook torch.amp.GradScaler
uses), so both factors go there: the norm of the gradients summed over tokens, divided by the
count, is the norm of the per-token gradients, and grad_scale = tokens / clip factor. torch's
kernel writes the divided gradient back; the project's Triton AdamW (optim.TritonAdamW, on CUDA)
does not (nothing reads the gradients after the step, and not writing them saves 4 bytes a
parameter). Where this does not apply (an optimizer other than torch's fused Adam, or the
precision-aware optimizer), Megatron's own passes and step run.

Why the NaN/Inf check waits for the norm: Megatron's DDP (`check_for_nan_in_grad`) takes each
bucket's norm as soon as it is ready during backward and makes it a Python bool at once: two host
syncs per bucket (52 in a 1.5B step), so the CPU cannot queue the next layers ahead of the GPU.
Here the check is the clipping norm's: a NaN or Inf in any rank's gradient survives the
data-parallel reduction (a sum) into the norm every rank sees, so every rank stops before the
update. The gradients the norm leaves out (copies another rank also holds: parameters replicated
over tensor-parallel ranks, counted on TP rank 0 only) are checked apart on each rank. Without
the fused scaling, the bucket norms stay on the device and are checked together at finalize.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.distributed import finalize_model_grads
from megatron.core.optimizer import ChainedOptimizer
from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer
from megatron.core.utils import unwrap_model

from falcon_h1.model.tensor_parallel import REPLICATED_ROWS_ATTR, sync_replicated_grads


def _inner_optimizers(optimizer) -> list:
    return list(getattr(optimizer, "chained_optimizers", [optimizer]))


def fused_scaling_applies(optimizer) -> bool:
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


class OptimizerStep:
    """Finalizes the gradients and steps a Megatron optimizer (see the module docstring).

    Args:
        optimizer: Megatron's optimizer (falcon_h1.training.optim.build_optimizer).
        nan_check: the DDP chunks' NaN/Inf check (`DeferredGradCheck`), None without one.
        check_on_gradient_norm: with the fused scaling, leave the check to the step's gradient
            norm (backward then takes no bucket norms); False keeps the bucket norms.
    """

    def __init__(self, optimizer, nan_check: DeferredGradCheck | None = None, check_on_gradient_norm: bool = True):
        self.optimizer = optimizer
        self.nan_check = nan_check
        self.fused_scaling = fused_scaling_applies(optimizer)
        if nan_check is not None and self.fused_scaling and check_on_gradient_norm:
            nan_check.check_gradient_norm()
        count_replicated_rows_once(optimizer)
        self.num_tokens: torch.Tensor | None = None  # the global token count, set when finalized
        self.grad_norm: float | None = None  # of the last step, per token: what the module logs
        self._left_out: list | None = None  # params_left_out_of_the_norm, found at the first checked step
        # (torch optimizer, its grad_scale tensor on its parameters' device); a rank whose shard of
        # the distributed optimizer holds none of an optimizer's parameters has nothing to scale.
        self._grad_scales = []
        for inner in _inner_optimizers(optimizer):
            params = [p for group in inner.optimizer.param_groups for p in group["params"]]
            if params and self.fused_scaling:
                self._grad_scales.append((inner.optimizer, torch.empty((), dtype=torch.float32,
                                                                          device=params[0].device)))

    def finalize_gradients(self, model_chunks, num_tokens: torch.Tensor | None = None, **kwargs) -> None:
        """Megatron's `finalize_model_grads_func`: called by its schedule after the last backward."""
        fused = self.fused_scaling and num_tokens is not None
        finalize_model_grads(model_chunks, None if fused else num_tokens, **kwargs)
        group = parallel_state.get_tensor_model_parallel_group()
        for chunk in unwrap_model(list(model_chunks)):
            sync_replicated_grads(chunk, group)
        if fused:
            self.record_tokens(num_tokens)
        elif self.nan_check is not None:
            self.nan_check.verify()

    def record_tokens(self, num_tokens: torch.Tensor) -> None:
        """The global count of loss tokens: this rank's count, made the sum over data-parallel and
        context-parallel ranks (the last pipeline stage has it; the others receive it), as
        Megatron's finalize_model_grads does before it would divide the gradients by it."""
        if dist.is_initialized():
            pp_group = parallel_state.get_pipeline_model_parallel_group()
            last_stage = dist.get_global_rank(pp_group, dist.get_world_size(pp_group) - 1)
            dist.broadcast(num_tokens, src=last_stage, group=pp_group)
            dist.all_reduce(num_tokens, group=parallel_state.get_data_parallel_group(with_context_parallel=True))
        self.num_tokens = num_tokens

    @torch.no_grad()
    def step(self) -> tuple[bool, float | None, int | None]:
        """The optimizer step: (successful, gradient norm per token, zeros in the gradients)."""
        if not self.fused_scaling:
            successful, self.grad_norm, num_zeros = self.optimizer.step()
            return successful, self.grad_norm, num_zeros
        optimizer = self.optimizer
        if self.num_tokens is None:
            raise RuntimeError("OptimizerStep.step: no token count was recorded when the gradients were "
                               "finalized; the gradients would be applied as sums over tokens")
        num_tokens, self.num_tokens = self.num_tokens, None
        check = self.nan_check
        overflow = optimizer.prepare_grads()  # fp16 loss scaling found an Inf or NaN
        left_out_norm = None
        if check is not None and not check.bucket_norms and not overflow:
            left_out_norm = self._left_out_norm()  # queued before the sync, read after it
        raw_norm = None if overflow else optimizer.get_grad_norm()  # the step's host sync
        if check is not None:  # both raise on a NaN or Inf gradient, before any weight changes
            check.verify()  # the bucket norms backward took, unless the check was left to the norm
            if raw_norm is not None:
                check.verify_gradient_norm(float(raw_norm), left_out_norm)
        self.grad_norm = None
        if overflow:  # skip the step, as Megatron does
            return False, None, None
        tokens = max(float(num_tokens.item()), 1.0)
        self.grad_norm = raw_norm / tokens
        clip_grad = optimizer.config.clip_grad
        clip = min(1.0, clip_grad / (self.grad_norm + 1.0e-6)) if clip_grad > 0.0 else 1.0
        for torch_optimizer, grad_scale in self._grad_scales:
            # A kernel argument, not a host-to-device copy: no wait for the GPU.
            torch_optimizer.grad_scale = grad_scale.fill_(tokens / clip)
        num_zeros = optimizer.count_zeros() if optimizer.config.log_num_zeros_in_grad else None
        threshold = optimizer.config.grad_norm_skip_threshold
        if math.isfinite(threshold) and self.grad_norm > threshold:
            return False, self.grad_norm, num_zeros
        return optimizer.step_with_ready_grads(), self.grad_norm, num_zeros

    def _left_out_norm(self) -> torch.Tensor | None:
        """The norm (on the device) of this rank's gradients the gradient norm leaves out, or None
        when it counts them all (TP = 1 without shared parameters: nothing more to read)."""
        if self._left_out is None:
            self._left_out = params_left_out_of_the_norm(self.optimizer)
        grads = [p.grad for p in self._left_out if p.grad is not None]
        if not grads:
            return None
        return torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))


class DeferredGradCheck:
    """The NaN/Inf check of Megatron DDP's gradient buckets, installed on the DDP-wrapped chunks in
    place of Megatron's per-bucket check. Each bucket's norm stays on the device and `verify()`
    checks them all at once (one host sync) before the optimizer step; after
    `check_gradient_norm()`, backward takes no bucket norms and the step checks its gradient norm
    with `verify_gradient_norm()`."""

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
        clip them): backward no longer reads every gradient for the bucket norms."""
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
            found = "; ".join(f"{name}: norm {norm}" for name, norm, b in zip(names, norms.tolist(), bad.tolist()) if b)
            raise RuntimeError(
                f"rank {_rank()}: NaN or Inf in this rank's gradients before the data-parallel reduction ({found}). "
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
        where = self._non_finite_gradients()
        found = f"gradient norm {norm}" if not left_out_bad else \
            f"the norm of the gradients of parameters the gradient norm counts on another rank: {float(left_out_norm)}"
        raise RuntimeError(
            f"rank {_rank()}: NaN or Inf in the gradients ({found}). This rank's gradient buffers hold NaN or Inf in: "
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


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def params_left_out_of_the_norm(optimizer) -> list[torch.nn.Parameter]:
    """The parameters (of `optimizer`'s torch optimizers, with gradients) whose gradients
    Megatron's gradient norm leaves out on this rank: parameters replicated over tensor-parallel
    ranks (counted on TP rank 0), shared ones (a tied embedding's copy on the last pipeline
    stage). Call after prepare_grads: Megatron's filter looks at the gradients."""
    left_out = []
    for inner in _inner_optimizers(optimizer):
        # The class's method: count_replicated_rows_once wraps the instance's, and hands out scaled copies.
        counted = {id(grad) for grad in type(inner).get_grads_for_grad_norm(inner)}
        left_out += [p for p in inner.get_parameters() if p.grad is not None and id(p.grad) not in counted]
    return left_out


# ---------------------------------------------------------------- replicated rows count once in the norm

def _row_scale(param: torch.Tensor) -> torch.Tensor | None:
    """Per-element factor (flattened like the parameter): 1/sqrt(replicas) on replicated rows."""
    replicated = getattr(param, REPLICATED_ROWS_ATTR, None)
    if not replicated:
        return None
    rows = torch.ones(param.shape[0], dtype=torch.float32, device=param.device)
    for start, segment in replicated:
        rows[start:start + segment.rows] = segment.replicas ** -0.5
    return rows.view(-1, *([1] * (param.dim() - 1))).expand(param.shape).reshape(-1)


def _main_params_with_scale(optimizer):
    """(main parameter, its per-element scale) for parameters with replicated rows."""
    if isinstance(optimizer, DistributedOptimizer):
        pairs = []
        for models, shards in ((optimizer.model_float16_groups, optimizer.shard_fp32_from_float16_groups),
                               (optimizer.model_fp32_groups, optimizer.shard_fp32_groups)):
            for model_group, shard_group in zip(models, shards):
                for model_param, shard in zip(model_group, shard_group):
                    scale = _row_scale(model_param)
                    if scale is not None:
                        owned = optimizer._get_model_param_range_map(model_param)["param"]
                        pairs.append((shard, scale[owned.start:owned.end].view(shard.shape)))
        return pairs
    if hasattr(optimizer, "float16_groups"):  # mixed precision, fp32 main copies
        pairs = [(main, _row_scale(model)) for models, mains in zip(optimizer.float16_groups,
                                                                      optimizer.fp32_from_float16_groups)
                 for model, main in zip(models, mains)]
        pairs += [(p, _row_scale(p)) for group in optimizer.fp32_from_fp32_groups for p in group]
    else:  # float32: the optimizer steps the model parameters themselves
        pairs = [(p, _row_scale(p)) for group in optimizer.param_groups for p in group["params"]]
    return [(main, scale.view(main.shape)) for main, scale in pairs if scale is not None]


def count_replicated_rows_once(optimizer) -> None:
    """Make `optimizer`'s gradient norm (and so its clipping) count the mixer's TP-replicated rows
    once. Megatron sums the squares of every tensor-parallel parameter's gradient over the TP
    ranks; the mixer replicates some rows (KV heads, SSM groups, attention heads when TP exceeds
    them; model/layout.py) on r ranks, each holding the same summed gradient, so those rows would
    count r times and clipping at TP > 1 would differ from TP = 1. Scaling those rows' gradients
    by 1/sqrt(r) in the tensors handed to the norm makes the total exactly the TP = 1 norm; the
    gradients the optimizer applies are untouched."""
    inner = optimizer.chained_optimizers if isinstance(optimizer, ChainedOptimizer) else [optimizer]
    for opt in inner:
        scaled = _main_params_with_scale(opt)
        if not scaled:
            continue
        original = opt.get_grads_for_grad_norm

        def grads_for_norm(*args, _original=original, _scaled=scaled, **kwargs):
            scale_of = {id(main.grad): scale for main, scale in _scaled if main.grad is not None}
            return [g * scale_of[id(g)] if id(g) in scale_of else g for g in _original(*args, **kwargs)]

        opt.get_grads_for_grad_norm = grads_for_norm
