"""transformers' Falcon-H1 modeling module, the reference: import checks a checkpoint's tensors
against it, and the parity checks (falcon_h1/parity.py) run it against this project's model."""

from __future__ import annotations

import importlib
import inspect
import sys

_KERNEL_PACKAGES = ("causal_conv1d", "mamba_ssm")


def hf_falcon_h1():
    """transformers' Falcon-H1 modeling module, on its pure-torch path.

    transformers binds Falcon-H1's conv and scan functions to the causal-conv1d and mamba_ssm
    packages when they import (its kernel path, tf32-level accurate). The reference is the torch
    path, so the module is imported with those packages hidden."""
    name = "transformers.models.falcon_h1.modeling_falcon_h1"
    if name not in sys.modules:
        hidden = {m: sys.modules.pop(m) for m in list(sys.modules) if m.split(".")[0] in _KERNEL_PACKAGES}
        sys.modules.update(dict.fromkeys(_KERNEL_PACKAGES))  # None: "import fails"
        try:
            importlib.import_module(name)
        finally:
            for package in _KERNEL_PACKAGES:
                del sys.modules[package]
            sys.modules.update(hidden)
    module = sys.modules[name]
    for func in (module.causal_conv1d_fn, module.mamba2_chunk_scan):
        if inspect.getclosurevars(func).nonlocals.get("is_new_implementation"):
            raise RuntimeError(f"{name} was imported on its kernel path; call {__name__}.hf_falcon_h1() before "
                               "anything else imports it")
    return module
