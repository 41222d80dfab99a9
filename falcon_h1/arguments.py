"""Checks of a run's numeric and layout arguments: sequence length, batch sizes, steps, learning
rates, intervals, parallel sizes.

Each check raises a one-line ValueError naming the value as the user set it, the allowed range and
what the value means. `name` maps an argument to how the user spells it: a recipe field as typed
on the `falcon-h1` command line ("data.seq_length", the default) or a flag of the main job
("--seq-length"). The data modules, build_trainer, the optimizer and schedule configs and the
model config run these checks when they are made; the main job and the `falcon-h1` command run
them on their arguments before anything is imported, built or launched. This module imports
nothing heavy, so the main job can check its flags first.
"""

import math
from collections.abc import Callable
from numbers import Integral, Real

Names = Callable[[str], str]


def setting(name: str, value) -> str:
    """How the user wrote the value: "--seq-length 0" for a flag, "data.seq_length=0" for a field."""
    return f"{name} {value}" if name.startswith("--") else f"{name}={value}"


def check_integer(name: str, value, minimum: int, meaning: str, optional: bool = False) -> None:
    """`value` is an integer >= `minimum` (or None, where `optional`)."""
    if value is None and optional:
        return
    if isinstance(value, bool) or not isinstance(value, Integral) or value < minimum:
        rule = "a positive integer" if minimum == 1 else f"an integer >= {minimum}"
        raise ValueError(f"{setting(name, value)}: must be {rule} ({meaning})")


def check_positive_number(name: str, value, meaning: str) -> None:
    """`value` is a finite number > 0 (NaN and infinity are not)."""
    if isinstance(value, bool) or not isinstance(value, Real) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{setting(name, value)}: must be a positive finite number ({meaning})")


def check_seconds(name: str, value, meaning: str) -> None:
    """`value` is a finite number of seconds >= 0 (or None)."""
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, Real) or not math.isfinite(value) or value < 0:
        raise ValueError(f"{setting(name, value)}: must be a number of seconds >= 0 ({meaning})")


def check_batch_sizes(seq_length, micro_batch_size, global_batch_size, data_parallel_size: int | None = None,
                      name: Names = "data.{}".format) -> None:
    """Positive sizes, and a global batch that splits into micro-batches on every data-parallel rank
    (`data_parallel_size` where it is known before the processes start)."""
    check_integer(name("seq_length"), seq_length, 1, "the tokens per training sequence, e.g. 2048")
    check_integer(name("micro_batch_size"), micro_batch_size, 1,
                  "the sequences of one forward and backward pass on one data-parallel rank")
    check_integer(name("global_batch_size"), global_batch_size, 1,
                  "the sequences of one optimizer step over all data-parallel ranks")
    ranks = data_parallel_size or 1
    if global_batch_size % (micro_batch_size * ranks):
        split = f" x {ranks} data-parallel ranks = {micro_batch_size * ranks}" if ranks > 1 else ""
        raise ValueError(f"{setting(name('global_batch_size'), global_batch_size)}: must be a multiple of "
                         f"{setting(name('micro_batch_size'), micro_batch_size)}{split} (each step is whole "
                         "micro-batches on every data-parallel rank)")


def check_trainer_arguments(max_steps, val_check_interval, limit_val_batches, log_every_n_steps,
                            checkpoint_every_n_steps=None, keep_last_k=None, devices=None, num_nodes=1,
                            hang_timeout=None, name: Names = "trainer.{}".format) -> None:
    """The run's length, its intervals (validation, progress lines, checkpoints) and its processes."""
    check_integer(name("max_steps"), max_steps, 1, "the optimizer steps to train")
    check_integer(name("val_check_interval"), val_check_interval, 1, "the training steps between validations")
    check_integer(name("limit_val_batches"), limit_val_batches, 0,
                  "the global batches of one validation; 0: no validation")
    check_integer(name("log_every_n_steps"), log_every_n_steps, 1, "the training steps between progress lines")
    check_integer(name("checkpoint_every_n_steps"), checkpoint_every_n_steps, 1,
                  "the training steps between checkpoints; None: only at the end", optional=True)
    check_integer(name("keep_last_k"), keep_last_k, 1, "the complete checkpoints to keep; None: all",
                  optional=True)
    check_integer(name("devices"), devices, 1, "the processes per node", optional=True)
    check_integer(name("num_nodes"), num_nodes, 1, "the nodes of the run")
    check_seconds(name("hang_timeout"), hang_timeout, "a process without progress for this long exits; 0: never")


def check_learning_rates(lr, min_lr=None, name: Names = "model.optimizer.{}".format) -> None:
    """A positive peak LR, and an end LR (None: lr / 8) between 0 and it."""
    check_positive_number(name("lr"), lr, "the peak learning rate, e.g. 3e-4")
    if min_lr is None:
        return
    if isinstance(min_lr, bool) or not isinstance(min_lr, Real) or not 0 <= min_lr <= lr:
        raise ValueError(f"{setting(name('min_lr'), min_lr)}: must be between 0 and {setting(name('lr'), lr)} "
                         "(the learning rate the schedule ends at; None: lr / 8)")


def check_parallel_sizes(tensor, pipeline, virtual, context, world_size: int | None = None,
                         name: Names = "trainer.strategy.{}".format) -> None:
    """Model-parallel sizes >= 1, virtual stages only with pipeline stages to interleave, and a
    world (where it is known before the processes start) made of whole model replicas."""
    tp, pp, vpp, cp = (name(field) for field in ("tensor_model_parallel_size", "pipeline_model_parallel_size",
                                                 "virtual_pipeline_model_parallel_size", "context_parallel_size"))
    check_integer(tp, tensor, 1, "the ranks that split each layer's heads")
    check_integer(pp, pipeline, 1, "the pipeline stages that split the layers")
    check_integer(vpp, virtual, 1, "the model chunks per pipeline rank; None: one", optional=True)
    check_integer(cp, context, 1, "the ranks that split each sequence")
    if virtual is not None and pipeline == 1:
        raise ValueError(f"{setting(vpp, virtual)}: interleaves pipeline stages and needs {pp} > 1; "
                         "unset it, or add pipeline stages")
    replica = tensor * pipeline * context
    if world_size and world_size % replica:
        raise ValueError(f"{setting(tp, tensor)} x {setting(pp, pipeline)} x {setting(cp, context)} = {replica} "
                         f"ranks per model replica do not divide the {world_size} processes of the run: "
                         f"launch a multiple of {replica} processes, or change the layout")


def check_pipeline_split(num_layers, pipeline, virtual, name: Names) -> None:
    """Every model chunk (pipeline stage x virtual stage) holds the same number of layers."""
    check_integer(name("num_layers"), num_layers, 1, "the model's layers")
    chunks = pipeline * (virtual or 1)
    if num_layers % chunks:
        stages = setting(name("pipeline_model_parallel_size"), pipeline)
        if virtual:
            stages += f" x {setting(name('virtual_pipeline_model_parallel_size'), virtual)} = {chunks} model chunks"
        raise ValueError(f"{setting(name('num_layers'), num_layers)}: must be divisible by {stages} "
                         "(every pipeline stage holds the same number of layers)")
