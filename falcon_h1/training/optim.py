"""Optimizer and learning-rate schedule: Megatron's optimizer (distributed or not) and its
OptimizerParamScheduler, configured from two dataclasses that recipes can hold as data."""

import dataclasses
import math
from dataclasses import dataclass

import torch
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer
from megatron.core.optimizer.optimizer import Float16OptimizerWithFloat16Params
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

from falcon_h1.arguments import check_integer, check_learning_rates
from falcon_h1.compat.megatron import (
    keep_adam_step_on_state_load,
    save_optimizer_state_at_unpadded_offsets,
    use_foreach_grad_norm,
)
from falcon_h1.kernels.adamw import MultiTensorAdamW

DECAY_STYLES = ("WSD", "cosine", "linear", "constant")
WSD_DECAY_STYLES = ("exponential", "linear", "cosine", "minus_sqrt")


@dataclass(frozen=True)
class ScheduleSteps:
    """An LRSchedule's step counts for one run: warm-up, decay horizon, WSD's decay phase."""

    warmup: int
    decay: int
    wsd_decay: int | None


@dataclass
class LRSchedule:
    """Learning rate over optimizer steps: linear warm-up from `init_lr` to the optimizer's `lr`,
    then `decay_style` down to the optimizer's `min_lr` at `decay_steps` (default: the run's
    trainer.max_steps).

    The warm-up is `warmup_fraction` of the decay horizon (Megatron's lr_warmup_fraction), so a
    schedule fits a run of any length; `warmup_steps` sets it in steps instead and must then be
    shorter than the horizon. WSD (warmup-stable-decay, Falcon-H1's schedule) holds `lr` after the
    warm-up and decays only over the last `wsd_decay_steps` (or `wsd_decay_fraction` of the
    horizon), exponentially by default as in the Falcon-H1 report (there: to lr / 8).
    """

    warmup_fraction: float = 0.01
    warmup_steps: int | None = None
    decay_style: str = "WSD"
    decay_steps: int | None = None
    init_lr: float = 0.0
    wsd_decay_steps: int | None = None
    wsd_decay_fraction: float = 0.1
    wsd_decay_style: str = "exponential"

    def __post_init__(self):
        if self.decay_style not in DECAY_STYLES:
            raise ValueError(f"LRSchedule.decay_style={self.decay_style!r}: choose one of {DECAY_STYLES}")
        if self.wsd_decay_style not in WSD_DECAY_STYLES:
            raise ValueError(f"LRSchedule.wsd_decay_style={self.wsd_decay_style!r}: choose one of {WSD_DECAY_STYLES}")
        if not 0.0 <= self.warmup_fraction < 1.0:
            raise ValueError(f"LRSchedule.warmup_fraction={self.warmup_fraction} must be in [0, 1)")
        if not 0.0 < self.wsd_decay_fraction <= 1.0:
            raise ValueError(f"LRSchedule.wsd_decay_fraction={self.wsd_decay_fraction} must be in (0, 1]")
        check_integer("model.lr_schedule.warmup_steps", self.warmup_steps, 0,
                      "the steps of the linear warm-up; None: warmup_fraction of the run", optional=True)
        check_integer("model.lr_schedule.decay_steps", self.decay_steps, 1,
                      "the steps to decay over; None: trainer.max_steps", optional=True)
        check_integer("model.lr_schedule.wsd_decay_steps", self.wsd_decay_steps, 1,
                      "the steps of WSD's final decay; None: wsd_decay_fraction of the run", optional=True)
        if not math.isfinite(self.init_lr) or self.init_lr < 0:
            raise ValueError(f"model.lr_schedule.init_lr={self.init_lr}: must be a finite number >= 0 "
                             "(the learning rate the warm-up starts from)")

    def steps(self, max_steps: int) -> ScheduleSteps:
        """The schedule's step counts for a run of `max_steps` (trainer.max_steps)."""
        decay = self.decay_steps or max_steps
        if decay is None or decay <= 0:
            raise ValueError(f"the LR schedule needs the run's length: trainer.max_steps={max_steps} "
                             "(set trainer.max_steps=N, or model.lr_schedule.decay_steps=N)")
        if self.warmup_steps is None:
            warmup = min(round(self.warmup_fraction * decay), decay - 1)
        elif self.warmup_steps >= decay:
            horizon = "model.lr_schedule.decay_steps" if self.decay_steps else "trainer.max_steps"
            raise ValueError(f"LRSchedule.warmup_steps={self.warmup_steps} must be below the decay horizon {decay} "
                             f"({horizon}): lower model.lr_schedule.warmup_steps, or unset it "
                             f"(model.lr_schedule.warmup_steps=None) to warm up over "
                             f"warmup_fraction={self.warmup_fraction} of the run")
        else:
            warmup = self.warmup_steps
        wsd = None
        if self.decay_style == "WSD":
            wsd = self.wsd_decay_steps or max(1, round(self.wsd_decay_fraction * decay))
            wsd = min(wsd, decay - warmup)
        return ScheduleSteps(warmup, decay, wsd)


# Falcon-H1's AdamW for pretraining (falcon_h1_reference.md), the one place recipes and code take
# it from (fine-tuning sets weight_decay=0.0). The schedule ends at lr / MIN_LR_DIVISOR unless the
# optimizer's min_lr is set.
ADAMW = dict(optimizer="adam", adam_beta1=0.9, adam_beta2=0.95, adam_eps=1e-8, weight_decay=0.1, clip_grad=1.0,
             use_distributed_optimizer=True)
MIN_LR_DIVISOR = 8


def falcon_h1_optimizer_config(lr: float = 3e-4, **overrides) -> OptimizerConfig:
    """Megatron's OptimizerConfig with Falcon-H1's AdamW settings (betas 0.9/0.95, clip 1.0, weight
    decay 0.1, the schedule ending at lr / 8 while min_lr is None). Precision fields (bf16,
    params_dtype) are filled in from the model config when the optimizer is built."""
    settings = dict(ADAMW, lr=lr)
    settings.update(overrides)
    return OptimizerConfig(**settings)


def resolved_min_lr(optimizer_config: OptimizerConfig) -> float:
    """The LR the schedule ends at: the config's min_lr if set, else its lr / 8 (so it follows lr)."""
    check_learning_rates(optimizer_config.lr, optimizer_config.min_lr)
    if optimizer_config.min_lr is None:
        return optimizer_config.lr / MIN_LR_DIVISOR
    return optimizer_config.min_lr


def build_optimizer(optimizer_config: OptimizerConfig, model_chunks, model_config, triton_adamw: bool = True):
    """Megatron's optimizer over DDP-wrapped model chunks, its precision taken from the model.

    On CUDA with bf16 weights and `triton_adamw`, AdamW steps in one Triton kernel that also writes
    the bf16 model weights (TritonAdamW); otherwise torch's fused AdamW steps, and one launch
    copies the main weights into the model's."""
    optimizer_config = dataclasses.replace(
        optimizer_config, bf16=model_config.bf16, fp16=model_config.fp16, params_dtype=model_config.params_dtype,
        min_lr=resolved_min_lr(optimizer_config))  # copied into every param group: the schedule reads it there
    use_foreach_grad_norm()
    optimizer = get_megatron_optimizer(optimizer_config, model_chunks)
    for inner in getattr(optimizer, "chained_optimizers", [optimizer]):
        _use_fused_adam(inner.optimizer)
        if isinstance(inner, DistributedOptimizer):
            # checkpoints written by torch's foreach Adam restore it: make it fused again
            keep_adam_step_on_state_load(inner, after_load=_use_fused_adam)
            save_optimizer_state_at_unpadded_offsets(inner)
        copies = main_to_model_copies(inner)
        if copies is None:
            continue
        adamw = None
        if triton_adamw and TritonAdamW.applies_to(inner) and all(main.is_cuda for main in copies):
            adamw = TritonAdamW(inner, copies)
        copy_main_params_in_one_launch(inner, copies, adamw)
    return optimizer


def _use_fused_adam(torch_optimizer) -> None:
    """Megatron builds torch's Adam(W) without its `fused` flag when Apex and Transformer Engine
    are absent; the foreach version it then runs makes a dozen passes over the float32 weights and
    moments per step (47 ms of a 396 ms 1.5B step on an H100), the fused one a single pass."""
    if type(torch_optimizer) not in (torch.optim.Adam, torch.optim.AdamW):
        return  # already fused (Apex, Transformer Engine), or not Adam
    for group in torch_optimizer.param_groups:
        group["fused"], group["foreach"] = True, False
    for state in torch_optimizer.state.values():  # fused keeps each step as a float32 tensor beside its parameter
        if isinstance(state.get("step"), torch.Tensor):
            state["step"] = state["step"].to(torch.float32)


def main_to_model_copies(optimizer) -> dict | None:
    """Each float32 main parameter of a Megatron mixed-precision optimizer, and the model-weight
    memory that its _copy_main_params_to_model_params casts it into after every step (for the
    distributed optimizer: this rank's shard of the parameter, in DDP's parameter buffer). None
    where that copy is more than a cast (Megatron FSDP, FP8/FP4 weights, the precision-aware
    optimizer) or the optimizer keeps no main parameters (float32 training).

    The memory is looked up once: DDP's buffers stay where they are for the run (Megatron moves
    them only to offload them to the CPU, which this project does not do)."""
    if isinstance(optimizer, DistributedOptimizer):
        ddp_config = optimizer.ddp_config
        if (ddp_config.use_megatron_fsdp or ddp_config.fp8_param_gather or ddp_config.fp4_param_gather
                or optimizer.config.use_precision_aware_optimizer_no_fp8_or_ds_fp8
                or optimizer.config.reuse_grad_buf_for_mxfp8_param_ag):
            return None
        copies = {}
        for mains, models in ((optimizer.shard_fp32_from_float16_groups, optimizer.model_float16_groups),
                              (optimizer.shard_fp32_groups, optimizer.model_fp32_groups)):
            for main_group, model_group in zip(mains, models):
                for main, model in zip(main_group, model_group):
                    if optimizer._is_distopt_quantized_param(model):
                        return None  # FP8 weights: Megatron quantizes, not casts
                    world = optimizer._get_model_param_range_map(model)["gbuf_world_in_bucket"]
                    buffer_index, _, bucket_index = optimizer.model_param_gbuf_map[model]
                    buffer = optimizer.buffers[buffer_index].buckets[bucket_index].param_data
                    copies[main] = buffer.view(-1)[world.start:world.end]
        return copies
    if isinstance(optimizer, Float16OptimizerWithFloat16Params):
        if optimizer.is_stub_optimizer:
            return {}
        return {main: model.data for mains, models in zip(optimizer.fp32_from_float16_groups, optimizer.float16_groups)
                for main, model in zip(mains, models)}
    return None


def copy_main_params_in_one_launch(optimizer, copies: dict, adamw: "TritonAdamW | None" = None) -> None:
    """Megatron copies each main parameter into its model weight with a copy_ of its own, a few
    hundred launches after every step; torch._foreach_copy_ casts them all in one, to the same
    bf16 values (round to nearest even, as copy_). A float32 parameter's main parameter is its
    model memory already (the distributed optimizer's shard view): no copy. After `adamw`'s kernel
    step, which wrote the model weights itself, there is nothing left to copy."""
    mains = [main for main, model in copies.items() if model.data_ptr() != main.data_ptr()]
    models = [copies[main] for main in mains]

    def copy_main_params_to_model_params():
        if adamw is not None and adamw.wrote_model_params:
            adamw.wrote_model_params = False
            return
        if mains:
            torch._foreach_copy_(models, mains)

    optimizer._copy_main_params_to_model_params = copy_main_params_to_model_params


class TritonAdamW:
    """Steps a Megatron optimizer's torch AdamW with falcon_h1.kernels.adamw: one kernel per param
    group reads each main weight, gradient and moment once and writes the weight, the moments and
    the bf16 model weight; the gradient is divided by the optimizer's `grad_scale` (step.py)
    as it is read and, unlike in torch's kernel, not written back. 30 bytes a parameter instead of
    torch's 32 and Megatron's copy's 6; the same arithmetic as torch's fused CUDA AdamW (see the
    kernel). Steps torch's way where the kernel does not apply at step time (a closure, or a
    `found_inf` from torch's GradScaler).

    Installed as the torch optimizer's `step`; the checkpointed state is torch's own (`step`,
    `exp_avg`, `exp_avg_sq` of each parameter)."""

    def __init__(self, optimizer, copies: dict):
        self.torch_optimizer = optimizer.optimizer
        # The bf16 model weight of each main parameter that has one apart from itself.
        self.models = {main: model for main, model in copies.items() if model.data_ptr() != main.data_ptr()}
        self.wrote_model_params = False  # read (and cleared) by the main-to-model copy after the step
        self._kernels: dict[tuple[int, bool], MultiTensorAdamW] = {}  # (param group, with model copy)
        self._torch_step = self.torch_optimizer.step
        self.torch_optimizer.step = self.step

    @staticmethod
    def applies_to(optimizer) -> bool:
        """torch's AdamW (decoupled weight decay) over float32 main parameters with bf16 model
        weights, without amsgrad, maximize, capturable or tensor hyperparameters."""
        torch_optimizer = getattr(optimizer, "optimizer", None)
        if type(torch_optimizer) not in (torch.optim.Adam, torch.optim.AdamW) or not optimizer.config.bf16 \
                or optimizer.config.fp16 or optimizer.config.use_precision_aware_optimizer:
            return False
        for group in torch_optimizer.param_groups:
            if not group.get("decoupled_weight_decay", type(torch_optimizer) is torch.optim.AdamW) \
                    or group["amsgrad"] or group["maximize"] or group["capturable"] or group["differentiable"]:
                return False
            if any(torch.is_tensor(group[key]) for key in ("lr", "weight_decay", "eps")) \
                    or any(torch.is_tensor(beta) for beta in group["betas"]):
                return False
            if any(p.dtype != torch.float32 for p in group["params"]):
                return False
        return True

    @torch.no_grad()
    def step(self, closure=None):
        torch_optimizer = self.torch_optimizer
        if closure is not None or getattr(torch_optimizer, "found_inf", None) is not None:
            self.wrote_model_params = False
            return self._torch_step(closure)
        grad_scale = getattr(torch_optimizer, "grad_scale", None)
        for index, group in enumerate(torch_optimizer.param_groups):
            params = [p for p in group["params"] if p.grad is not None]
            states = [self._state(p) for p in params]
            beta1, beta2 = group["betas"]
            for with_model in (True, False):
                chosen = [(p, state) for p, state in zip(params, states) if (p in self.models) == with_model]
                if not chosen:
                    continue
                kernel = self._kernels.setdefault((index, with_model), MultiTensorAdamW())
                kernel.step([p for p, _ in chosen], [p.grad for p, _ in chosen],
                            [state["exp_avg"] for _, state in chosen], [state["exp_avg_sq"] for _, state in chosen],
                            [state["step"] for _, state in chosen],
                            [self.models[p] for p, _ in chosen] if with_model else None,
                            lr=group["lr"], beta1=beta1, beta2=beta2, weight_decay=group["weight_decay"],
                            eps=group["eps"], grad_scale=grad_scale)
        self.wrote_model_params = True
        return None

    def _state(self, param: torch.Tensor) -> dict:
        """The parameter's AdamW state, made as torch makes it on a first step (a float32 step
        count on the parameter's device, zero moments)."""
        state = self.torch_optimizer.state[param]
        if "step" not in state:
            state["step"] = torch.zeros((), dtype=torch.float32, device=param.device)
        elif state["step"].device != param.device or state["step"].dtype != torch.float32:
            state["step"] = state["step"].to(param.device, torch.float32)
        if "exp_avg" not in state:
            state["exp_avg"] = torch.zeros_like(param, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(param, memory_format=torch.preserve_format)
        return state


def build_scheduler(optimizer, optimizer_config: OptimizerConfig, schedule: LRSchedule,
                    max_steps: int) -> OptimizerParamScheduler:
    """Megatron's OptimizerParamScheduler for `schedule` over a run of `max_steps` steps."""
    steps = schedule.steps(max_steps)
    return OptimizerParamScheduler(
        optimizer,
        init_lr=schedule.init_lr,
        max_lr=optimizer_config.lr,
        min_lr=resolved_min_lr(optimizer_config),
        lr_warmup_steps=steps.warmup,
        lr_decay_steps=steps.decay,
        lr_decay_style=schedule.decay_style,
        start_wd=optimizer_config.weight_decay,
        end_wd=optimizer_config.weight_decay,
        wd_incr_steps=steps.decay,
        wd_incr_style="constant",
        wsd_decay_steps=steps.wsd_decay,
        lr_wsd_decay_style=schedule.wsd_decay_style,
    )
