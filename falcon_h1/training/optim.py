"""Optimizer and learning-rate schedule: Megatron's optimizer (distributed or not) and its
OptimizerParamScheduler, configured from two dataclasses that recipes can hold as data."""

import dataclasses
import math
from dataclasses import dataclass

import torch
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

from falcon_h1.arguments import check_integer, check_learning_rates
from falcon_h1.training.grad_norm import use_foreach_grad_norm

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


# Falcon-H1's AdamW (falcon_h1_reference.md), the one place recipes and code take it from. The
# schedule ends at lr / MIN_LR_DIVISOR unless the optimizer's min_lr is set.
ADAMW = dict(optimizer="adam", adam_beta1=0.9, adam_beta2=0.95, adam_eps=1e-8, clip_grad=1.0,
             use_distributed_optimizer=True)
MIN_LR_DIVISOR = 8


def falcon_h1_optimizer_config(lr: float = 3e-4, **overrides) -> OptimizerConfig:
    """Megatron's OptimizerConfig with Falcon-H1's AdamW settings (betas 0.9/0.95, clip 1.0, weight
    decay 0.1, the schedule ending at lr / 8 while min_lr is None). Precision fields (bf16,
    params_dtype) are filled in from the model config when the optimizer is built."""
    settings = dict(ADAMW, lr=lr, weight_decay=0.1)
    settings.update(overrides)
    return OptimizerConfig(**settings)


def resolved_min_lr(optimizer_config: OptimizerConfig) -> float:
    """The LR the schedule ends at: the config's min_lr if set, else its lr / 8 (so it follows lr)."""
    check_learning_rates(optimizer_config.lr, optimizer_config.min_lr)
    if optimizer_config.min_lr is None:
        return optimizer_config.lr / MIN_LR_DIVISOR
    return optimizer_config.min_lr


def build_optimizer(optimizer_config: OptimizerConfig, model_chunks, model_config):
    """Megatron's optimizer over DDP-wrapped model chunks, its precision taken from the model."""
    optimizer_config = dataclasses.replace(
        optimizer_config, bf16=model_config.bf16, fp16=model_config.fp16, params_dtype=model_config.params_dtype,
        min_lr=resolved_min_lr(optimizer_config))  # copied into every param group: the schedule reads it there
    use_foreach_grad_norm()
    optimizer = get_megatron_optimizer(optimizer_config, model_chunks)
    for inner in getattr(optimizer, "chained_optimizers", [optimizer]):
        _use_fused_adam(inner.optimizer)
        if isinstance(inner, DistributedOptimizer):
            _keep_step_on_state_load(inner)
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


def _keep_step_on_state_load(optimizer: DistributedOptimizer) -> None:
    """Two gaps of megatron-core 0.19's distributed-optimizer loading with torch's Adam (used
    when Apex/TE fused Adam is absent, e.g. on CPU), where each parameter's state holds a `step`:
    - the fully-reshardable loader expects `step` among each parameter's checkpoint tensors,
      where it is not (it is stored once, in the param groups, and restored from there): supply
      the current one so the loader copies the moments and main weights and leaves the step;
    - the restored step is one tensor shared by all parameters, which torch's foreach Adam then
      increments once per parameter: give every parameter its own copy.
    """
    set_states = optimizer._set_main_param_and_optimizer_states
    load_state_dict = optimizer.load_state_dict

    def set_states_keeping_step(model_param, tensors):
        group_index, group_order = optimizer.model_param_group_index_map[model_param]
        main_param = optimizer.optimizer.param_groups[group_index]["params"][group_order]
        step = optimizer.optimizer.state[main_param].get("step")
        if isinstance(step, torch.Tensor) and "step" not in tensors:
            tensors = {**tensors, "step": step}
        set_states(model_param, tensors)

    def load_state_dict_with_own_steps(state_dict):
        load_state_dict(state_dict)
        for param, state in optimizer.optimizer.state.items():
            if isinstance(state.get("step"), torch.Tensor):
                state["step"] = state["step"].to(param.device).clone()
        _use_fused_adam(optimizer.optimizer)  # checkpoints written by the foreach version restore it

    optimizer._set_main_param_and_optimizer_states = set_states_keeping_step
    optimizer.load_state_dict = load_state_dict_with_own_steps


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
