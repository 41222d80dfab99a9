"""Generation with the hybrid cache (attention KV + Mamba conv and SSM states).

Greedy generation for a batch of prompts of different lengths gives exactly the tokens
transformers' FalconH1ForCausalLM.generate gives for each prompt (float32, CPU, random weights;
transformers 5.17's own batched, left-padded generation of Falcon-H1 fails with a mask shape
error, so its reference is per prompt). The cached decode computes the logits a full forward over
the same tokens computes (also with a dt limit, see DT_LIMIT), and sampling is reproducible and
honours top-p and EOS.

End to end, a tiny-preset checkpoint with the bundled tokenizer, exported to Hugging Face:
transformers' greedy `generate` (its stop read from the exported config.json) and
falcon_h1.inference give the same tokens and stop at the same eos.
"""

from pathlib import Path

import pytest
import torch

from falcon_h1.inference.generate import generate, sample_next
from falcon_h1.parity import build_from_hf, make_hf_model, relative_error

CONFIGS = {
    "untied_1_group": dict(),
    "tied_2_groups_norm_biases": dict(tie_word_embeddings=True, mamba_n_groups=2, mamba_rms_norm=True,
                                      attention_bias=True, mamba_proj_bias=True, projectors_bias=True),
    "gqa_3_layers_chunk_8_padded_vocab": dict(num_attention_heads=6, num_key_value_heads=2, num_hidden_layers=3,
                                              mamba_chunk_size=8, vocab_size=301),
}
# transformers' one-token Mamba step does not clamp dt to time_step_limit while its chunked scan
# (its forward) does, so with a limit its cached generation departs from its own forward; ours
# clamps in both. Such a model is checked against the full forward only (released models have no
# limit).
DT_LIMIT = dict(num_hidden_layers=3, mamba_chunk_size=8, time_step_limit=(0.0, 0.5))
PROMPT_LENGTHS = (3, 11, 20)  # shorter than, across and beyond a chunk of 8


def prompts_for(hf, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(2, hf.config.vocab_size, (n,), generator=generator).tolist() for n in PROMPT_LENGTHS]


@pytest.fixture(scope="module")
def models(single_rank):
    out = {}
    for i, (name, overrides) in enumerate({**CONFIGS, "dt_limit": DT_LIMIT}.items()):
        hf = make_hf_model(seed=20 + i, **overrides)
        out[name] = (hf, build_from_hf(hf))
    return out


@pytest.mark.parametrize("name", list(CONFIGS))
def test_greedy_generation_matches_transformers(models, name):
    hf, model = models[name]
    prompts = prompts_for(hf)
    ours = generate(model, prompts, max_new_tokens=12)
    for prompt, tokens in zip(prompts, ours):
        reference = hf.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False, eos_token_id=None,
                                pad_token_id=0)
        assert tokens == reference[0, len(prompt):].tolist()


@pytest.mark.parametrize("name", [*CONFIGS, "dt_limit"])
def test_cached_decode_computes_the_full_forward_logits(models, name):
    from falcon_h1.model.decode_cache import HybridCache

    hf, model = models[name]
    prompt = prompts_for(hf, seed=1)[1]
    continuation = torch.randint(2, hf.config.vocab_size, (6,), generator=torch.Generator().manual_seed(2)).tolist()
    vocab = model.config.vocab_size
    with torch.no_grad():
        full = model(torch.tensor([prompt + continuation]))[0, :, :vocab]
        cache = HybridCache(1, len(prompt) + len(continuation))
        cache.start_prefill(0)
        stepped = [model(torch.tensor([prompt]), inference_context=cache)[0, :, :vocab]]
        cache.advance(len(prompt))
        cache.start_decode()
        for token in continuation:
            stepped.append(model(torch.tensor([[token]]), inference_context=cache)[0, :, :vocab])
            cache.advance(1)
    stepped = torch.cat(stepped)[: full.shape[0]]
    assert relative_error(stepped, full) <= 1e-5


def test_sampling_is_reproducible_and_respects_top_p_and_eos(models):
    hf, model = models["untied_1_group"]
    prompts = prompts_for(hf)
    first = generate(model, prompts, 8, temperature=1.0, top_p=0.9, seed=3)
    assert first == generate(model, prompts, 8, temperature=1.0, top_p=0.9, seed=3)
    assert all(0 <= t < hf.config.vocab_size for row in first for t in row)
    # A nucleus this small keeps only the most likely token: greedy.
    assert generate(model, prompts, 8, temperature=1.0, top_p=1e-9, seed=4) == generate(model, prompts, 8)
    greedy = generate(model, prompts, 8)
    eos = greedy[0][2]
    stopped = generate(model, prompts, 8, eos_token_id=eos)
    assert stopped[0] == greedy[0][: greedy[0].index(eos) + 1]
    for row, full in zip(stopped[1:], greedy[1:]):
        assert row == (full[: full.index(eos) + 1] if eos in full else full)
    # Several eos ids (as a config.json list): a row stops at the first of any of them.
    other = greedy[1][1]
    for row, full in zip(generate(model, prompts, 8, eos_token_id=[other, eos]), greedy):
        ends = [i for i, t in enumerate(full) if t in (other, eos)]
        assert row == (full[: ends[0] + 1] if ends else full)


def test_top_p_keeps_the_nucleus():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    draws = {int(sample_next(logits, 1.0, 0.7, torch.Generator().manual_seed(s))) for s in range(200)}
    assert draws == {0, 1}  # 0.5 + 0.3 crosses 0.7: tokens 2 and 3 are cut


def test_bad_prompts(models):
    _, model = models["untied_1_group"]
    with pytest.raises(ValueError, match="at least one token"):
        generate(model, [[1, 2], []], 4)
    with pytest.raises(ValueError, match="token ids must be in"):
        generate(model, [[1, model.config.vocab_size]], 4)


# ---------------------------------------------------------------- a tiny checkpoint, exported

# Short documents, each ending with the tokenizer's eos: a few dozen steps teach the tiny model to
# end a function, so its greedy continuations stop (a random model never picks eos).
DOCUMENTS = [f"def f{i}(x):\n    return x + {i}\n" for i in range(32)]
PROMPTS = ["def f7(x):\n", "def f30(x):\n", "def g(y, z):\n", "import os\n", "class A:\n"]
MAX_NEW_TOKENS = 16


@pytest.fixture(scope="module")
def tiny_checkpoint(single_rank, tmp_path_factory):
    """A tiny-preset checkpoint (the bundled tokenizer) trained 25 steps on DOCUMENTS."""
    from falcon_h1.data.default_corpus import default_corpus
    from falcon_h1.data.preprocess import load_tokenizer
    from falcon_h1.model.config import config_to_hf
    from falcon_h1.model.model import FalconH1Model
    from falcon_h1.model.presets import preset_config
    from falcon_h1.training.checkpoint_io import save_model

    tokenizer_dir = default_corpus().tokenizer_dir
    tokenizer = load_tokenizer(tokenizer_dir)
    config = preset_config("tiny", use_cpu_initialization=True, kernel_backend="torch")
    torch.manual_seed(0)
    model = FalconH1Model(config)
    documents = [tokenizer(d, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id] for d in DOCUMENTS]
    length = max(map(len, documents))
    rows = torch.tensor([d + [tokenizer.pad_token_id] * (length - len(d)) for d in documents])
    mask = torch.tensor([[1.0] * (len(d) - 1) + [0.0] * (length - len(d)) for d in documents])
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(25):
        loss = (model(rows[:, :-1], labels=rows[:, 1:]) * mask).sum() / mask.sum()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    path = tmp_path_factory.mktemp("tiny") / "checkpoint"
    return save_model([model], path, config_to_hf(config), {"step": 25}, tokenizer_dir)


def generate_both_ways(checkpoint, output):
    """(falcon_h1.inference's tokens, transformers' greedy tokens on the export) for PROMPTS."""
    from transformers import AutoTokenizer, FalconH1ForCausalLM

    from falcon_h1.convert.hf_export import export_hf_checkpoint
    from falcon_h1.inference.text import generate_tokens_from_checkpoint

    exported = export_hf_checkpoint(checkpoint, output, progress=False)
    hf = FalconH1ForCausalLM.from_pretrained(exported, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(exported)
    references = []
    for prompt in PROMPTS:
        inputs = tokenizer(prompt, add_special_tokens=False, return_tensors="pt")
        tokens = hf.generate(**inputs, max_new_tokens=MAX_NEW_TOKENS, do_sample=False)  # its own eos
        references.append(tokens[0, inputs["input_ids"].shape[1]:].tolist())
    return generate_tokens_from_checkpoint(checkpoint, PROMPTS, MAX_NEW_TOKENS, device="cpu")[0], references


def test_exported_tiny_model_generates_and_stops_like_transformers(tiny_checkpoint, tmp_path, capfd):
    ours, references = generate_both_ways(tiny_checkpoint, tmp_path / "hf")
    assert "to match the checkpoint's tokenizer" not in capfd.readouterr().err  # the tiny preset's ids are right
    assert ours == references
    # The stop is exercised: generations end at eos (id 0), before the limit, some after several tokens.
    stopped = [t for t in ours if t[-1] == 0 and len(t) < MAX_NEW_TOKENS]
    assert len(stopped) >= 2 and max(map(len, stopped)) >= 4, ours


def test_a_generation_config_sets_the_stop_for_both(tiny_checkpoint, tmp_path):
    """An imported model's generation_config.json (exported with it) names the eos ids transformers stops at."""
    import json
    import shutil

    from falcon_h1.data.preprocess import load_tokenizer
    from falcon_h1.training.checkpoint_io import tokenizer_path

    checkpoint = Path(shutil.copytree(tiny_checkpoint, tmp_path / "checkpoint"))
    [newline] = load_tokenizer(tokenizer_path(checkpoint))("\n")["input_ids"]  # most completions end a line
    (tokenizer_path(checkpoint) / "generation_config.json").write_text(json.dumps({"eos_token_id": [0, newline]}))
    ours, references = generate_both_ways(checkpoint, tmp_path / "hf")
    assert ours == references
    assert sum(t[-1] == newline for t in ours) >= 3, ours
