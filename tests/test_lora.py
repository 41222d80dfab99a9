"""LoRA adapters (falcon_h1/model/lora.py): what they compute, what trains, what a checkpoint holds.

Float32 on CPU, models built from random transformers FalconH1 models:
- fresh adapters (B = 0) leave the logits bitwise unchanged;
- with random adapters, the model equals its merged model (W + alpha/r B A) within 1e-5, and the
  merged checkpoint exported to Hugging Face computes the same logits in transformers;
- only adapters receive gradients;
- TP=2 (with and without sequence parallelism, torchrun + gloo) loads the TP=1 base and adapter
  checkpoints and gives the TP=1 logits and adapter gradients within 1e-5.
"""

import json

import pytest
import torch

from falcon_h1.model.config import config_to_hf
from falcon_h1.model.lora import LoRA, apply_lora, is_adapter_key, merge_lora
from falcon_h1.parity import build_from_hf, make_hf_model, random_tokens, relative_error
from falcon_h1.training import checkpoint_io
from tests.conftest import torchrun

CONFIGS = {
    "plain": dict(num_hidden_layers=2),
    # One KV head and one SSM group: at TP=2 their rows are replicated on both ranks.
    "gqa_groups": dict(num_hidden_layers=2, num_attention_heads=6, num_key_value_heads=1, mamba_n_groups=1,
                       mamba_rms_norm=True),
}


def randomize_adapters(model, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if is_adapter_key("." + name):
                param.copy_(torch.randn(param.shape, generator=generator) * 0.05)


def projected_loss(logits: torch.Tensor, seed: int = 7) -> torch.Tensor:
    projection = torch.randn(logits.shape, generator=torch.Generator().manual_seed(seed))
    return (logits * projection).sum()


@pytest.fixture(scope="module", params=list(CONFIGS))
def hf_and_model(request, single_rank):
    hf = make_hf_model(seed=5, **CONFIGS[request.param])
    return hf, build_from_hf(hf)


def test_fresh_adapters_change_nothing(hf_and_model):
    hf, _ = hf_and_model
    model = build_from_hf(hf)
    tokens = random_tokens(hf.config, 2, 24, seed=1)
    with torch.no_grad():
        before = model(tokens)
        apply_lora(model, LoRA(dim=4))
        after = model(tokens)
    assert torch.equal(before, after)


def test_adapters_equal_their_merged_weights(hf_and_model):
    hf, _ = hf_and_model
    model = build_from_hf(hf)
    apply_lora(model, LoRA(dim=4, alpha=8))
    randomize_adapters(model, seed=3)
    tokens = random_tokens(hf.config, 2, 24, seed=2)
    with torch.no_grad():
        adapted = model(tokens)
        merge_lora(model)
        merged = model(tokens)
    assert not any(is_adapter_key("." + n) for n, _ in model.named_parameters())
    assert relative_error(merged, adapted) < 1e-5
    with torch.no_grad():
        base = build_from_hf(hf)(tokens)
    assert relative_error(base, adapted) > 1e-3  # the adapters do change the model


def test_only_adapters_train(hf_and_model):
    hf, _ = hf_and_model
    model = build_from_hf(hf)
    apply_lora(model, LoRA(dim=4, target_modules=["in_proj", "linear_fc2"]))
    randomize_adapters(model, seed=4)
    projected_loss(model(random_tokens(hf.config, 2, 16, seed=3))).backward()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    layers = hf.config.num_hidden_layers
    assert len(trainable) == layers * 4 and all(is_adapter_key("." + n) for n in trainable)
    assert with_grad == trainable


def test_bad_scheme_names_the_targets():
    with pytest.raises(ValueError, match="q_proj.*choose from"):
        LoRA(target_modules=["q_proj"])


def save_base_and_adapters(hf, model, directory, lora: LoRA):
    """TP=1 checkpoints: `base` (all weights, no adapters) and `adapters` (adapters only)."""
    hf_config = config_to_hf(model.config)
    base = checkpoint_io.save_model([model], directory / "base", hf_config, {})
    apply_lora(model, lora)
    randomize_adapters(model, seed=11)
    adapters = checkpoint_io.save_model([model], directory / "adapters", hf_config,
                                        dict(peft=lora.to_dict(), base_checkpoint=str(base)),
                                        part=checkpoint_io.ADAPTERS)
    return base, adapters


def test_adapter_checkpoint_holds_only_adapters_and_reloads(hf_and_model, tmp_path):
    hf, _ = hf_and_model
    model = build_from_hf(hf)
    lora = LoRA(dim=4, alpha=4)
    _, adapters = save_base_and_adapters(hf, model, tmp_path, lora)
    from falcon_h1.convert.dist_checkpoint import CheckpointWeights

    stored = CheckpointWeights(adapters / checkpoint_io.WEIGHTS_DIR).tensors
    assert stored and all(is_adapter_key("." + key) for key in stored), sorted(stored)[:5]
    tokens = random_tokens(hf.config, 2, 16, seed=5)
    with torch.no_grad():
        expected = model(tokens)
    # Into a model without adapters: a clear error; with them: the base and the adapters.
    reloaded = build_from_hf(hf)
    randomize_all = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in reloaded.parameters():
            p.copy_(torch.randn(p.shape, generator=randomize_all))
    with pytest.raises(checkpoint_io.CheckpointError, match="LoRA adapters only"):
        checkpoint_io.load_model_weights([reloaded], adapters)
    apply_lora(reloaded, lora)
    checkpoint_io.load_model_weights([reloaded], adapters)
    with torch.no_grad():
        assert torch.equal(reloaded(tokens), expected)


def test_merged_export_matches_transformers(hf_and_model, tmp_path):
    from falcon_h1.convert.hf_export import export_hf_checkpoint
    from falcon_h1.convert.hf_modeling import hf_falcon_h1

    hf, _ = hf_and_model
    model = build_from_hf(hf)
    _, adapters = save_base_and_adapters(hf, model, tmp_path, LoRA(dim=4, alpha=8))
    tokens = random_tokens(hf.config, 2, 16, seed=6)
    with torch.no_grad():
        expected = model(tokens)[..., :hf.config.vocab_size]
    export_hf_checkpoint(adapters, tmp_path / "hf", progress=False)
    exported = hf_falcon_h1().FalconH1ForCausalLM.from_pretrained(tmp_path / "hf").float().eval()
    with torch.no_grad():
        logits = exported(input_ids=tokens).logits
    assert relative_error(logits, expected) < 1e-5
    assert not any(p.name.startswith(".hf.merged-") for p in tmp_path.iterdir())  # scratch removed


# Sequence parallelism on the shape with replicated rows only (each launch costs CI ~12 s).
@pytest.mark.parametrize("shape, sequence_parallel", [("plain", False), ("gqa_groups", False), ("gqa_groups", True)])
def test_tensor_parallel_adapters_match_one_rank(single_rank, tmp_path, shape, sequence_parallel):
    hf = make_hf_model(seed=5, **CONFIGS[shape])
    model = build_from_hf(hf)
    _, adapters = save_base_and_adapters(hf, model, tmp_path, LoRA(dim=4, alpha=8))
    tokens = random_tokens(hf.config, 2, 24, seed=7)
    model.zero_grad()
    logits = model(tokens, runtime_gather_output=True)
    projected_loss(logits).backward()
    args = ["--adapters", str(adapters), "--out", str(tmp_path / "tp2.pt"), "--grads-to", str(tmp_path / "grads"),
            "--tokens", json.dumps(tokens.tolist())]
    torchrun("tests/distributed/lora_parity.py", 2, *args, *(["--sequence-parallel"] if sequence_parallel else []))
    assert relative_error(torch.load(tmp_path / "tp2.pt"), logits.detach()) < 1e-5
    # The TP=2 gradients were saved as adapter values: load them canonically at TP=1.
    grads = build_from_hf(hf)
    apply_lora(grads, LoRA(dim=4, alpha=8))
    checkpoint_io.load_model_weights([grads], tmp_path / "grads")
    expected = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    for name, param in grads.named_parameters():
        if name in expected:
            assert relative_error(param.detach(), expected[name]) < 1e-5, name
