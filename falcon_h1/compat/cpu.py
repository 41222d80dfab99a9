"""CPU (gloo) debug mode: the places where Megatron Core assumes CUDA, in one module.

Users smoke-test recipes on a laptop and CI trains for real on CPU, so every Megatron code path
the project uses must also run without a GPU. `enable` replaces each CUDA assumption for the life
of the process (a model trained on the CPU is used after its run, by the same Megatron code);
both functions do nothing of the sort when CUDA is available.
"""

from __future__ import annotations

import contextlib

import torch
from megatron.core import parallel_state
from megatron.core.tensor_parallel import random as megatron_random
from torch.overrides import TorchFunctionMode

from falcon_h1.compat import require_tested

_enabled = False


def _is_cuda(device) -> bool:
    return (isinstance(device, str) and device.startswith("cuda")) or \
        (isinstance(device, torch.device) and device.type == "cuda")


class _HostStream:
    """Stands in for a CUDA stream: CPU work is already ordered, so waits are no-ops."""

    def wait_event(self, event) -> None:
        pass

    def wait_stream(self, stream) -> None:
        pass

    def synchronize(self) -> None:
        pass


class _CudaAllocationsOnCPU(TorchFunctionMode):
    """Megatron's optimizer, grad-norm and checkpoint code allocates small tensors with
    device="cuda", and its optimizers accept only parameters whose `type()` is a CUDA tensor
    type; in the CPU debug mode those tensors land on the CPU and CPU parameters pass the check."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.Tensor.type and len(args) == 1 and not kwargs:
            name = func(*args)
            return name.replace("torch.", "torch.cuda.", 1) if args[0].device.type == "cpu" else name
        if _is_cuda(kwargs.get("device")):
            kwargs = {**kwargs, "device": "cpu"}
        if func is torch.Tensor.to and args and any(_is_cuda(a) for a in args[1:]):
            args = tuple("cpu" if _is_cuda(a) else a for a in args)
        return func(*args, **kwargs)


def enable() -> None:
    """Turn on the CPU debug mode (idempotent; does nothing when CUDA is available)."""
    global _enabled
    if torch.cuda.is_available() or _enabled:
        return
    require_tested("torch", "CPU debug mode")
    require_tested("megatron-core", "CPU debug mode")
    _enabled = True
    # Megatron allocates communication and scratch buffers on torch.cuda.current_device(); with
    # no CUDA device that call raises. A device string is accepted wherever those buffers are made.
    torch.cuda.current_device = lambda: "cpu"
    # Likewise Megatron moves tensors with .cuda() (e.g. the tied embedding copy on the last
    # pipeline stage); in the CPU debug mode the CPU plays the GPU's part.
    torch.Tensor.cuda = lambda self, *args, **kwargs: self
    torch.cuda.synchronize = lambda *args, **kwargs: None
    torch.cuda.current_stream = lambda *args, **kwargs: _HostStream()  # DDP's gradient reduction
    _CudaAllocationsOnCPU().__enter__()  # stays on for the life of the process
    # Full-layer recompute (Megatron's CheckpointFunction) saves and restores the CUDA generator
    # beside the CPU one it already keeps; there is none here.
    megatron_random._get_cuda_rng_state = lambda *args, **kwargs: torch.empty(0, dtype=torch.uint8)
    megatron_random._set_cuda_rng_state = lambda *args, **kwargs: None


class CPURNGStatesTracker(megatron_random.CudaRNGStatesTracker):
    """Megatron's RNG-state tracker (separate streams for tensor-parallel regions, data-parallel
    regions, experts) over the CPU generator instead of the CUDA one."""

    def add(self, name, seed):
        self._is_initialized = True
        if seed in self.seeds_:
            raise ValueError(f"seed {seed} already exists")
        if name in self.states_:
            raise ValueError(f"rng state {name} already exists")
        self.seeds_.add(seed)
        original = torch.get_rng_state()
        torch.manual_seed(seed)
        self.states_[name] = torch.get_rng_state()
        torch.set_rng_state(original)

    @contextlib.contextmanager
    def fork(self, name=megatron_random._MODEL_PARALLEL_RNG_TRACKER_NAME):
        if name not in self.states_:
            raise ValueError(f"rng state {name} is not added; call model_parallel_manual_seed first")
        original = torch.get_rng_state()
        torch.set_rng_state(self.states_[name])
        try:
            yield
        finally:
            self.states_[name] = torch.get_rng_state()
            torch.set_rng_state(original)


def model_parallel_manual_seed(seed: int, use_cudagraphable_rng: bool = False) -> None:
    """Seed every RNG stream the way Megatron's model_parallel_cuda_manual_seed does: the same
    default stream on all ranks of a model-parallel group, a per-TP-rank stream for
    tensor-parallel regions. On CPU the streams live on the CPU generator. CUDA-graphed layers
    need graph-safe generators (`use_cudagraphable_rng`), and Megatron checks for them when the
    layers are built."""
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        megatron_random.model_parallel_cuda_manual_seed(seed, use_cudagraphable_rng=use_cudagraphable_rng)
        return
    require_tested("megatron-core", "CPU RNG tracker")
    tracker = CPURNGStatesTracker()
    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    tracker.add(megatron_random._DATA_PARALLEL_RNG_TRACKER_NAME, seed)
    tracker.add(megatron_random._MODEL_PARALLEL_RNG_TRACKER_NAME, seed + 2718 + tp_rank)
    tracker.add(megatron_random._EXPERT_PARALLEL_RNG_TRACKER_NAME, seed + 1024)
    megatron_random._CUDA_RNG_STATE_TRACKER = tracker
    megatron_random._CUDA_RNG_STATE_TRACKER_INITIALIZED = True
