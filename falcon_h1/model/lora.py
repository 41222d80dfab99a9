"""LoRA: low-rank adapters on the mixer's fused projections and the MLP, tensor-parallel aware.

An adapter adds `scale * B A x` to the output of one of a layer's four GEMMs, before anything
else touches that output (µP multipliers, biases, the SwiGLU split), so merging it into the base
weight, W + scale * B A, is exact. Each GEMM is sharded over TP, and so is its adapter:

    column-parallel base (mixer in_proj, MLP linear_fc1): W rows split over ranks
        A [r, h] on every rank; B [rows of this rank, r], split like W's rows
        x -> A x (on this rank's tokens) -> all-gather over the sequence under SP -> B (.)
    row-parallel base (mixer out_proj, MLP linear_fc2): W columns split over ranks
        A [r, columns of this rank], split like W's columns; B [h, r] on every rank
        x -> A x (partial) -> sum over TP (reduce-scatter under SP) -> B (.)

Only the r-wide intermediate crosses ranks, so an adapter costs one small collective per GEMM.
B starts at zero: a model with fresh adapters computes exactly what its base does.

Adapters live in `module.adapters` (an empty ModuleDict until `apply_lora`), which the mixer and
the MLP add in their forward; their checkpoint keys are `...adapters.<target>.lora_a/lora_b`,
stored in the same canonical (TP-independent) layout as the base weights.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from megatron.core import tensor_parallel
from megatron.core.transformer.utils import ensure_metadata_has_dp_cp_group
from megatron.core.utils import get_pg_rank, get_pg_size, make_sharded_tensor_for_checkpoint, \
    make_tp_sharded_tensor_for_checkpoint

COLUMN, ROW = "column", "row"
TARGETS = {"in_proj": ("self_attention", COLUMN), "out_proj": ("self_attention", ROW),
           "linear_fc1": ("mlp", COLUMN), "linear_fc2": ("mlp", ROW)}
ADAPTER_KEY = ".adapters."


@dataclass
class LoRA:
    """The LoRA scheme of a fine-tuning run (`peft=` of FalconH1Module).

    Args:
        target_modules: which GEMMs of every layer get an adapter: in_proj, out_proj (the mixer's
            fused projections), linear_fc1, linear_fc2 (the MLP's).
        dim: the adapters' rank r. Under tensor parallelism every rank holds all r.
        alpha: the update is scaled by alpha / dim.
        dropout: dropout on the adapters' input.
        seed: seed of A's initialisation.
    """

    target_modules: list[str] = field(default_factory=lambda: list(TARGETS))
    dim: int = 16
    alpha: float = 32.0
    dropout: float = 0.0
    seed: int = 1234

    def __post_init__(self):
        unknown = sorted(set(self.target_modules) - set(TARGETS))
        if unknown or not self.target_modules:
            raise ValueError(f"LoRA target_modules {unknown or '[]'}: choose from {sorted(TARGETS)}")
        if self.dim < 1:
            raise ValueError(f"LoRA dim must be >= 1, got {self.dim}")

    @property
    def scale(self) -> float:
        return self.alpha / self.dim

    def to_dict(self) -> dict:
        return dict(asdict(self), scheme="lora")

    @classmethod
    def from_dict(cls, values: dict) -> "LoRA":
        values = dict(values)
        if values.pop("scheme", "lora") != "lora":
            raise ValueError(f"not a LoRA scheme: {values}")
        return cls(**values)


class LoRAAdapter(torch.nn.Module):
    """`scale * B A x` for one tensor-parallel linear (see the module docstring).

    Args:
        parallel: "column" or "row": how the base linear is split over TP.
        in_features / out_features: the base linear's local input / output width on this rank.
    """

    def __init__(self, parallel: str, in_features: int, out_features: int, lora: LoRA, config, tp_group,
                 device, dtype, init_seed: int):
        super().__init__()
        self.parallel, self.scale = parallel, lora.scale
        self.tp_group, self.sequence_parallel = tp_group, config.sequence_parallel
        self.dropout = torch.nn.Dropout(lora.dropout) if lora.dropout > 0 else torch.nn.Identity()
        tp_size = get_pg_size(tp_group)
        # A: Kaiming-uniform over the full input width, as LoRA initialises it; B: zeros.
        full_in = in_features * (tp_size if parallel == ROW else 1)
        generator = torch.Generator().manual_seed(init_seed)
        a = torch.empty(lora.dim, full_in, device="cpu").uniform_(-1, 1, generator=generator) / math.sqrt(full_in)
        if parallel == ROW:  # this rank's columns; an even split is all an initialisation needs
            rank = get_pg_rank(tp_group)
            a = a[:, rank * in_features:(rank + 1) * in_features]
        self.lora_a = torch.nn.Parameter(a.to(device=device, dtype=dtype))
        self.lora_b = torch.nn.Parameter(torch.zeros(out_features, lora.dim, device=device, dtype=dtype))
        sharded, replicated = (self.lora_b, self.lora_a) if parallel == COLUMN else (self.lora_a, self.lora_b)
        tensor_parallel.set_tensor_model_parallel_attributes(sharded, True, 0 if parallel == COLUMN else 1, 1)
        # The replicated matrix sees this rank's tokens only under SP: Megatron sums its gradient
        # over TP, as it does for the norms.
        replicated.sequence_parallel = config.sequence_parallel

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: the base linear's input ([s/TP, b, h] under SP for column, [s, b, cols] for row) ->
        the update of the base linear's output on this rank."""
        t = F.linear(self.dropout(x), self.lora_a)
        if self.parallel == COLUMN:
            if self.sequence_parallel:
                t = tensor_parallel.gather_from_sequence_parallel_region(t, group=self.tp_group)
            else:  # forward: identity; backward: sum of the ranks' partial gradients
                t = tensor_parallel.copy_to_tensor_model_parallel_region(t, group=self.tp_group)
        elif self.sequence_parallel:
            t = tensor_parallel.reduce_scatter_to_sequence_parallel_region(t, group=self.tp_group)
        else:
            t = tensor_parallel.reduce_from_tensor_model_parallel_region(t, group=self.tp_group)
        return F.linear(t, self.lora_b) * self.scale

    def delta_weight(self) -> torch.Tensor:
        """scale * B A, shaped like this rank's base weight."""
        return (self.lora_b.float() @ self.lora_a.float()) * self.scale

    def sharded_state_dict(self, prefix="", sharded_offsets=(), metadata=None):
        """Generic TP sharding (even splits); the mixer and MLP override the keys whose base weight
        has a special layout (fused row blocks, SwiGLU halves)."""
        metadata = ensure_metadata_has_dp_cp_group(metadata)
        groups = dict(tp_group=self.tp_group, dp_cp_group=metadata["dp_cp_group"])
        sharded_name, axis = ("lora_b", 0) if self.parallel == COLUMN else ("lora_a", 1)
        out = {}
        for name in ("lora_a", "lora_b"):
            key, param = f"{prefix}{name}", getattr(self, name)
            if name == sharded_name:
                out[key] = make_tp_sharded_tensor_for_checkpoint(param, key, axis, prepend_offsets=sharded_offsets,
                                                                 **groups)
            else:
                out[key] = make_sharded_tensor_for_checkpoint(param, key, sharded_offsets, **groups)
        return out


class AdapterDict(torch.nn.ModuleDict):
    """The adapters of a module by target name; empty unless LoRA is applied."""

    def sharded_state_dict(self, prefix="", sharded_offsets=(), metadata=None):
        out = {}
        for name, adapter in self.items():
            out.update(adapter.sharded_state_dict(f"{prefix}{name}.", sharded_offsets, metadata))
        return out


def add_adapter(module: torch.nn.Module, name: str, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """`out` plus the update of adapter `name` of `module` for input `x`, if it has one."""
    adapter = module.adapters[name] if name in module.adapters else None
    return out if adapter is None else out + adapter(x).to(out.dtype)


def _layers(model) -> list:
    return list(model.decoder.layers)


def apply_lora(model: torch.nn.Module, lora: LoRA) -> None:
    """Freeze every parameter of `model` (a FalconH1Model chunk) and give each of its layers'
    targets a fresh adapter, the only trainable parameters afterwards. Call before the model
    is wrapped for training (DDP) and before the optimizer is built."""
    from falcon_h1.model.tensor_parallel import mark_replicated_rows

    for param in model.parameters():
        param.requires_grad_(False)
    for layer in _layers(model):
        for index, name in enumerate(lora.target_modules):
            owner_name, parallel = TARGETS[name]
            owner = getattr(layer, owner_name)
            if name in owner.adapters:
                raise ValueError(f"layer {layer.layer_number} already has a {name} adapter")
            base = getattr(owner, name)
            out_features, in_features = base.weight.shape
            adapter = LoRAAdapter(parallel, in_features, out_features, lora, owner.config, owner.tp_group,
                                  base.weight.device, base.weight.dtype,
                                  init_seed=lora.seed * 1_000_003 + layer.layer_number * 16 + index)
            if name == "in_proj":  # rows some TP ranks share, like the base weight's
                mark_replicated_rows(adapter.lora_b, owner.layout.in_proj)
            owner.adapters[name] = adapter


def has_adapters(model: torch.nn.Module) -> bool:
    return any(isinstance(m, LoRAAdapter) for m in model.modules())


@torch.no_grad()
def merge_lora(model: torch.nn.Module) -> None:
    """Fold every adapter into its base weight (W += scale * B A on each rank, exact at any TP) and
    remove the adapters; all parameters become trainable again."""
    for layer in _layers(model):
        for owner in (layer.self_attention, layer.mlp):
            for name in list(owner.adapters):
                weight = getattr(owner, name).weight
                weight.copy_(weight.float() + owner.adapters[name].delta_weight())
                del owner.adapters[name]
    for param in model.parameters():
        param.requires_grad_(True)


def is_adapter_key(key: str) -> bool:
    return ADAPTER_KEY in key
