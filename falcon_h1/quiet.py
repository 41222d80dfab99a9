"""Notices of the libraries under falcon_h1 that tell a user nothing they can act on, filtered where
they are raised.

A run's output is its header, progress lines and summary. Megatron Core, PyTorch Lightning and
PyTorch print, on every rank, notices about optional packages, their own deprecated internals and
API choices falcon_h1 makes on purpose. `quiet_third_party_notices()` filters exactly those: each
Python warning by its message and the module that raises it, each log record by its message on
the one logger that emits it. Anything else these libraries say still shows.

Megatron warns when it is imported, and a config warns when it is built, so a process must install
the filters before either: the entry points do (`python -m falcon_h1.train`, the `falcon-h1`
command), and `pretrain()` again in every process of a run. Installing them twice changes nothing.
"""

from __future__ import annotations

import logging
import warnings


class _DropMessages(logging.Filter):
    """Drops the records of one logger whose message starts with one of `prefixes`."""

    def __init__(self, prefixes: tuple[str, ...]):
        super().__init__()
        self.prefixes = prefixes

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(self.prefixes)


def _drop_log_messages(logger_name: str, *prefixes: str) -> None:
    logger = logging.getLogger(logger_name)
    if not any(isinstance(f, _DropMessages) and f.prefixes == prefixes for f in logger.filters):
        logger.addFilter(_DropMessages(prefixes))


def _ignore(message: str, module: str) -> None:
    """Both are regular expressions matched at the start (warnings.filterwarnings drops an identical
    filter before adding it again)."""
    warnings.filterwarnings("ignore", message=message, module=module)


def quiet_third_party_notices() -> None:
    """Filter the notices below in this process (idempotent)."""
    # Optional fused kernels: falcon_h1 runs torch's fused Adam and its own Triton kernels without them.
    _ignore(r"(Transformer Engine and )?Apex (is|are) not installed", r"megatron\.")
    # Megatron's own default cuda_graph_modules="full" raises its own deprecation at every config.
    _ignore(r"full scope is deprecated", r"megatron\.core\.transformer\.transformer_config")
    # A config built before the process group exists: one process, and rank 0 is right.
    _ignore(r"Could not determine rank from torch\.distributed", r"megatron\.core\._rank_utils")
    # A Megatron class falcon_h1 does not use, announced when Megatron imports it.
    _ignore(r"MimoModelConfig is experimental", r"megatron\.")
    # Megatron's distributed optimizer reads .grad of its fp32 shard views in zero_grad (its own
    # comment says so); on CPU the read goes through compat/cpu.py's TorchFunctionMode.
    _ignore(r"The \.grad attribute of a Tensor that is not a leaf Tensor",
            r"(megatron\.core\.optimizer|falcon_h1\.compat\.cpu)")
    # Lightning looks for `srun` on PATH at every start and, on a machine with Slurm's clients (a
    # login node), tells a run outside a Slurm job to use it. Slurm jobs go through the executors
    # (falcon_h1.slurm), whose srun starts every task.
    _ignore(r"The `srun` command is available on your system but is not used", r"lightning_fabric\.")
    # Megatron reads checkpoints with torch's loader in single-process mode on purpose (no_dist=True:
    # every rank reads its own shards), passing the reader positionally, into ShardedTensors.
    _ignore(r"torch\.distributed is disabled, unavailable or uninitialized", r"torch\.distributed\.checkpoint")
    _ignore(r"The argument order of load has been changed", r"torch\.distributed\.checkpoint")
    _ignore(r"Please use DTensor instead and we are deprecating ShardedTensor",
            r"(torch\.distributed\.checkpoint|falcon_h1\.compat\.cpu)")
    # Lightning 2.6 calls a torch pytree API that torch has since deprecated.
    _ignore(r"`isinstance\(treespec, LeafSpec\)` is deprecated", r"pytorch_lightning\.")
    # FalconH1Module's steps take the data iterator on purpose: Megatron's schedules pull the micro-batches.
    _ignore(r"You are using the `dataloader_iter` step flavor|Found `dataloader_iter` argument", r"pytorch_lightning\.")
    # The evaluation loss is reduced over the ranks before it is logged (FalconH1Module._log_evaluation).
    _ignore(r"It is recommended to use `self\.log\('(val|test)_loss'", r"pytorch_lightning\.")
    # The data modules resume from the checkpoint's consumed_samples, not from the DataLoader's state.
    _ignore(r"You're resuming from a checkpoint that ended before the epoch ended", r"pytorch_lightning\.")

    # Said at import on every machine without CUDA.
    _drop_log_messages("torch.utils.cpp_extension", "No CUDA runtime is found")
    # Megatron computes the gradient buffer layout itself, as it did before it asked callers to.
    _drop_log_messages("megatron.core.distributed.distributed_data_parallel",
                       "DistributedDataParallel: full_param_layout not provided")
    # Megatron's synchronous save runs through its own async writer, which announces its deprecation.
    _drop_log_messages("megatron.core.dist_checkpointing.strategies.torch", "MCore's async save is deprecated")
    # Lightning's banners and echoes of settings: falcon_h1's header names the devices, layout and
    # batches, MegatronCheckpoint the checkpoint it resumed from, the summary the last step.
    for logger_name in ("pytorch_lightning.utilities.rank_zero", "lightning_fabric.utilities.rank_zero"):
        _drop_log_messages(logger_name, "GPU available:", "TPU available:", "HPU available:", "💡 Tip:",
                           "`Trainer(limit_", "Restoring states from the checkpoint path at",
                           "Restored all states from the checkpoint at", "`Trainer.fit` stopped:",
                           "-" * 100 + "\ndistributed_backend=")
    _drop_log_messages("lightning_fabric.utilities.distributed", "Initializing distributed:")  # one per rank
    _drop_log_messages("pytorch_lightning.accelerators.cuda", "LOCAL_RANK: ")  # one per GPU rank
