"""Import mamba_ssm's Triton kernels without its package __init__.

`mamba_ssm/__init__.py` imports CUDA extensions (selective_scan_cuda, and causal_conv1d's when
that package is absent) which a pure-Python install (MAMBA_SKIP_CUDA_BUILD=TRUE) does not build.
The Triton SSD and gated-norm modules need none of them, so when the package import fails an
empty package object is registered in its place and the submodules are imported directly.
"""

import importlib
import importlib.util
import sys
import types

from falcon_h1.compat import require_tested


def _import_submodule(name: str):
    try:
        return importlib.import_module(name)
    except ImportError:
        spec = importlib.util.find_spec("mamba_ssm") if "mamba_ssm" not in sys.modules else None
        if spec is None:
            raise
        require_tested("mamba-ssm", "mamba_ssm without its __init__")
        package = types.ModuleType("mamba_ssm")
        package.__path__ = list(spec.submodule_search_locations)
        sys.modules["mamba_ssm"] = package
        return importlib.import_module(name)


mamba_chunk_scan_combined = _import_submodule("mamba_ssm.ops.triton.ssd_combined").mamba_chunk_scan_combined
rmsnorm_fn = _import_submodule("mamba_ssm.ops.triton.layernorm_gated").rmsnorm_fn
