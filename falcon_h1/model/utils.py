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
