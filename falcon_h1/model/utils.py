"""Small helpers shared by the model modules."""

import torch


def param_device(config) -> torch.device:
    """Where Megatron modules allocate parameters: the CPU under use_cpu_initialization, else the
    current CUDA device; the meta device inside `with torch.device("meta")` (a model skeleton for
    shapes and checkpoint keys, as the converter builds)."""
    if torch.get_default_device().type == "meta":
        return torch.device("meta")
    if config.use_cpu_initialization or not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda", torch.cuda.current_device())


def buffer_for_autograd(buffer: torch.Tensor | None, config) -> torch.Tensor | None:
    """A module buffer that autograd will save for backward: the buffer itself, or a copy under
    per-layer CUDA graphs (cuda_graph_impl="local"). Megatron's capture restores a layer's buffers
    in place between capturing its forward and its backward, which would invalidate the saved one."""
    if buffer is None or config.cuda_graph_impl != "local":
        return buffer
    return buffer.clone()
