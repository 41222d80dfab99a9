"""Numerical parity with transformers' FalconH1ForCausalLM, the reference this project is held to.

Used by the test suite and by the self-check entrypoint: build a random Hugging Face model, copy
its weights into this project's model (any tensor-parallel layout), run both on the same tokens
and compare logits and every parameter's gradient.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from falcon_h1.convert.hf_modeling import hf_falcon_h1
from falcon_h1.convert.mapping import hf_to_local
from falcon_h1.model.config import config_from_hf
from falcon_h1.model.model import FalconH1Model
from falcon_h1.model.specs import local_layer_spec
from falcon_h1.model.tensor_parallel import sync_replicated_grads


def random_hf_config(seed: int, **overrides):
    """A small transformers FalconH1Config with every µP multiplier drawn away from 1."""
    from transformers import FalconH1Config as HFConfig

    rng = random.Random(seed)

    def mult():
        return round(rng.uniform(0.5, 1.5), 4)

    kwargs = dict(
        vocab_size=200, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=24,
        mamba_n_heads=4, mamba_d_head=16, mamba_d_ssm=64, mamba_d_state=16, mamba_n_groups=1,
        mamba_chunk_size=16, mamba_d_conv=4, rope_theta=1e11,
        embedding_multiplier=mult(), lm_head_multiplier=mult(), key_multiplier=mult(),
        attention_in_multiplier=mult(), attention_out_multiplier=mult(), ssm_in_multiplier=mult(),
        ssm_out_multiplier=mult(), ssm_multipliers=[mult() for _ in range(5)],
        mlp_multipliers=[mult(), mult()], pad_token_id=0, attn_implementation="eager",
    )
    kwargs.update(overrides)
    kwargs["mamba_d_ssm"] = kwargs["mamba_n_heads"] * kwargs["mamba_d_head"]
    return HFConfig(**kwargs)


@torch.no_grad()
def randomize_parameters(model: torch.nn.Module, seed: int) -> None:
    """Give every parameter a value that exercises it: O(1) activations, norm weights and biases
    away from their 1/0 init, A in [1, 16], varied D and dt bias."""
    gen = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        def randn(scale, shape=p.shape):
            return torch.randn(shape, generator=gen) * scale

        if name.endswith("A_log"):
            p.copy_(torch.log(torch.rand(p.shape, generator=gen) * 15 + 1))
        elif name.endswith(("dt_bias", ".D")):
            p.copy_(randn(0.5))
        elif "norm" in name:
            p.copy_(1 + randn(0.1))
        elif name.endswith("bias"):
            p.copy_(randn(0.1))
        elif "conv1d" in name:
            p.copy_(randn(0.5))
        elif p.dim() == 2 and "embed" in name:
            p.copy_(randn(1.0))
        else:
            p.copy_(randn(1.0 / math.sqrt(p.shape[-1])))


def make_hf_model(seed: int, **config_overrides):
    torch.manual_seed(seed)
    hf = hf_falcon_h1().FalconH1ForCausalLM(random_hf_config(seed, **config_overrides)).float().eval()
    randomize_parameters(hf, seed)
    return hf


def build_from_hf(hf_model, tp_rank: int = 0, tp_size: int = 1, **config_overrides) -> FalconH1Model:
    """This project's model (local spec, float32, CPU init) holding the HF model's weights."""
    overrides = dict(tensor_model_parallel_size=tp_size, use_cpu_initialization=True,
                     kernel_backend="torch")
    overrides.update(config_overrides)
    config = config_from_hf(hf_model.config.to_dict(), **overrides)
    model = FalconH1Model(config, local_layer_spec()).eval()
    state = hf_to_local(dict(hf_model.state_dict()), config, tp_rank, tp_size)
    model.load_state_dict(state, strict=True)
    return model


def random_tokens(hf_config, batch: int, seq_len: int, seed: int) -> torch.Tensor:
    """Token ids avoiding the pad id (HF freezes the pad embedding row, Megatron does not)."""
    gen = torch.Generator().manual_seed(seed)
    low = 1 if hf_config.pad_token_id == 0 else 0
    return torch.randint(low, hf_config.vocab_size, (batch, seq_len), generator=gen)


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """||actual - expected|| / ||expected|| (absolute error when expected is zero)."""
    diff = (actual.double() - expected.double()).norm().item()
    scale = expected.double().norm().item()
    return diff / scale if scale > 0 else diff


@dataclass
class ParityReport:
    logits_error: float
    grad_errors: dict[str, float] = field(default_factory=dict)

    @property
    def max_grad_error(self) -> float:
        return max(self.grad_errors.values(), default=0.0)

    @property
    def worst_grad(self) -> str:
        return max(self.grad_errors, key=self.grad_errors.get) if self.grad_errors else ""


def finish_tensor_parallel_grads(model: FalconH1Model) -> None:
    """What Megatron's finalize_model_grads does for TP without a DDP wrapper: sum the gradients
    of sequence-parallel (replicated, sequence-sharded) parameters over TP, and of replicated rows."""
    group = model.pg_collection.tp
    if dist.get_world_size(group) == 1:
        return
    for p in model.parameters():
        if getattr(p, "sequence_parallel", False) and p.grad is not None:
            dist.all_reduce(p.grad, group=group)
    sync_replicated_grads(model, group)


def compare_with_hf(hf_model, model: FalconH1Model, tokens: torch.Tensor, seed: int = 0,
                    tp_rank: int = 0, tp_size: int = 1) -> ParityReport:
    """Run both models forward and backward on `tokens` (loss: a fixed random projection of the
    logits, so every logit gets a gradient) and compare logits and parameter gradients."""
    vocab = hf_model.config.vocab_size
    gen = torch.Generator().manual_seed(seed + 1)
    projection = torch.randn(*tokens.shape, vocab, generator=gen)

    hf_model.zero_grad()
    hf_logits = hf_model(input_ids=tokens).logits
    (hf_logits * projection).sum().backward()

    model.zero_grad()
    logits = model(tokens, runtime_gather_output=True)[..., :vocab]
    (logits * projection).sum().backward()
    finish_tensor_parallel_grads(model)

    hf_grads = {name: p.grad for name, p in hf_model.named_parameters()}
    expected = hf_to_local(hf_grads, model.config, tp_rank, tp_size)
    report = ParityReport(relative_error(logits.detach(), hf_logits.detach()))
    for name, p in model.named_parameters():
        report.grad_errors[name] = relative_error(p.grad, expected[name])
    return report
