"""Every patch falcon_h1 makes to third-party code (torch, Megatron Core, mamba_ssm), in one place.

Each patch is applied by one function, made for the version pinned in pyproject.toml, and checked
against the installed version first (`require_tested`): on another version it stops with a line
that names both, since a private name it relies on may have changed. tests/test_compat.py shows,
for each one, that the third-party behaviour it works around is still there, and that no module
outside this package assigns to a third-party module's attributes.

    cpu.enable()                         torch.cuda calls, Tensor.cuda and Megatron's CUDA RNG state
                                         on the CPU (the gloo debug mode; cpu.py)
    cpu.model_parallel_manual_seed()     Megatron's RNG-stream tracker over the CPU generator
    mamba_ssm_triton                     mamba_ssm's Triton kernels without its CUDA-extension __init__
    megatron.use_foreach_grad_norm()     gradient norm and clip scale without a host sync per tensor
    megatron.use_wgrad_fusion(module)    Megatron's fused weight-gradient GEMM without Apex
    megatron.keep_adam_step_on_state_load(optimizer)
                                         the distributed optimizer's checkpoint load with torch's Adam
    megatron.save_optimizer_state_at_unpadded_offsets(optimizer)
                                         the distributed optimizer's checkpoint save past a padded bucket
    megatron.write_results_queue_without_spawn(background)
                                         checkpoint writes that never re-run the user's __main__
    megatron.open_checkpoint_shards_with(open_fn)
                                         the checkpoint writer's file opening (checksums as written)

Instance-level hooks that are the project's own features (the deferred NaN check on DDP's bucket
groups, the gradient norm counting replicated rows once, Triton AdamW as the torch optimizer's
step) live beside the feature, in falcon_h1/training/.
"""

from __future__ import annotations

import os
from importlib.metadata import PackageNotFoundError, version

# The versions these patches were written and tested for (pyproject.toml pins the same).
TESTED = {"megatron-core": "0.19.2", "torch": "2.11", "mamba-ssm": "2.3.2.post1"}
# Set to 1 to run on other versions anyway (each patch then applies as it would on the tested one).
ALLOW_UNTESTED = "FALCON_H1_ALLOW_UNTESTED_VERSIONS"


class UntestedVersion(RuntimeError):
    """A patch met a third-party version it was not tested against."""


def require_tested(package: str, patch: str) -> None:
    """Stop before `patch` touches `package` when the installed version is not the tested one."""
    tested = TESTED[package]
    try:
        installed = version(package)
    except PackageNotFoundError:
        return  # imported from a source tree (e.g. a Megatron checkout): nothing to compare
    if (installed == tested or installed.startswith(tested + ".")) or os.environ.get(ALLOW_UNTESTED) == "1":
        return
    raise UntestedVersion(
        f"{package} {installed} is installed, but falcon_h1's patch '{patch}' (falcon_h1/compat) was tested with "
        f"{package} {tested}: install {package}=={tested} (pyproject.toml), or set {ALLOW_UNTESTED}=1 to try it anyway")
