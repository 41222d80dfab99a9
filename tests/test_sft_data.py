"""SFT data: response-only loss masks, packing, and training on packed rows.

The tokenizer is the bundled corpus's BPE (with a small chat template added for the chat tests).
"""

import json
import shutil
import warnings

import pytest
import torch

from falcon_h1.data.sft import SFTDataModule, pack, read_jsonl, tokenize_example

CHAT_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}{{ eos_token }}{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>{% endif %}")


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    from falcon_h1.data.default_corpus import default_corpus

    target = tmp_path_factory.mktemp("tok") / "tokenizer"
    shutil.copytree(default_corpus().tokenizer_dir, target)
    config_path = target / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config["chat_template"] = CHAT_TEMPLATE
    config_path.write_text(json.dumps(config))
    return target


@pytest.fixture(scope="module")
def tokenizer(tokenizer_dir):
    from falcon_h1.data.preprocess import load_tokenizer

    return load_tokenizer(tokenizer_dir)


def test_prompt_response_learns_the_response_and_its_end(tokenizer):
    ids, mask = tokenize_example({"prompt": "def add(a, b):", "response": " return a + b"}, tokenizer)
    prompt = tokenizer("def add(a, b):", add_special_tokens=False)["input_ids"]
    assert ids[: len(prompt)] == prompt and ids[-1] == tokenizer.eos_token_id
    assert mask == [0] * len(prompt) + [1] * (len(ids) - len(prompt))
    assert tokenizer.decode([t for t, m in zip(ids, mask) if m], skip_special_tokens=True) == " return a + b"


def test_chat_learns_only_the_assistant_turns(tokenizer):
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello there"},
                {"role": "user", "content": "and?"}, {"role": "assistant", "content": "bye"}]
    ids, mask = tokenize_example({"messages": messages}, tokenizer)
    assert ids == list(tokenizer.apply_chat_template(messages, tokenize=True)["input_ids"])
    learned = tokenizer.decode([t for t, m in zip(ids, mask) if m])
    assert learned.replace(tokenizer.eos_token, "|") == "hello there|bye|"


def test_packing_keeps_documents_apart():
    documents = [(list(range(10, 16)), [0, 0, 1, 1, 1, 1]), (list(range(20, 25)), [0, 1, 1, 1, 1]),
                 (list(range(30, 40)), [1] * 10)]
    rows = pack(documents, seq_length=10, pad_id=0)
    assert len(rows) == 2  # 5 + 4 pairs fill the first row; the third (9 pairs) starts another
    first = rows[0]
    assert first["tokens"].tolist() == [10, 11, 12, 13, 14, 20, 21, 22, 23, 0]
    assert first["labels"].tolist() == [11, 12, 13, 14, 15, 21, 22, 23, 24, 0]
    assert first["loss_mask"].tolist() == [0, 1, 1, 1, 1, 1, 1, 1, 1, 0]
    assert first["seq_idx"].tolist() == [0] * 5 + [1] * 4 + [2]
    assert first["position_ids"].tolist() == [0, 1, 2, 3, 4, 0, 1, 2, 3, 0]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cut = pack([(list(range(50)), [1] * 50)], seq_length=10, pad_id=0)
    assert cut[0]["tokens"].tolist() == list(range(10)) and "cut" in str(caught[0].message)


def test_bad_jsonl_names_the_line(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_text('{"prompt": "a", "response": "b"}\n{"prompt": "only a prompt"}\n')
    with pytest.raises(ValueError, match="data.jsonl:2: an example needs"):
        read_jsonl(path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_jsonl(tmp_path / "missing.jsonl")


def test_prompt_labels_change_no_gradient(single_rank, tokenizer):
    """Loss masking: the loss ignores prompt positions, so changing their labels changes nothing."""
    from falcon_h1.model.model import FalconH1Model
    from falcon_h1.model.packing import PackedDocuments
    from falcon_h1.model.presets import preset_config

    examples = [{"prompt": "import os\n", "response": "print(os.getcwd())"},
                {"prompt": "x = [1, 2]\n", "response": "y = sum(x)"}]
    rows = pack([tokenize_example(e, tokenizer) for e in examples], seq_length=48, pad_id=tokenizer.eos_token_id)
    row = rows[0]
    torch.manual_seed(0)
    model = FalconH1Model(preset_config("tiny", num_layers=2, use_cpu_initialization=True, kernel_backend="torch"))
    packed = PackedDocuments(row["seq_idx"][None], row["position_ids"][None])

    def grads(labels):
        model.zero_grad()
        loss = (model(row["tokens"][None], labels=labels[None], packed_seq_params=packed) * row["loss_mask"]).sum()
        loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters()}

    reference = grads(row["labels"])
    changed = row["labels"].clone()
    masked = row["loss_mask"] == 0
    changed[masked] = (changed[masked] + 7) % tokenizer.vocab_size
    assert masked.any() and not torch.equal(changed, row["labels"])
    for name, grad in grads(changed).items():
        assert torch.equal(grad, reference[name]), name


def test_sft_training_on_packed_rows_learns(single_rank, tokenizer_dir, tmp_path):
    from falcon_h1.model.presets import preset_config
    from falcon_h1.training.checkpoint import AutoResume
    from falcon_h1.training.module import FalconH1Module
    from falcon_h1.training.optim import LRSchedule, falcon_h1_optimizer_config
    from falcon_h1.training.pretrain import build_trainer, pretrain

    path = tmp_path / "train.jsonl"
    with open(path, "w") as f:
        for i in range(40):
            f.write(json.dumps({"prompt": f"n = {i}\n", "response": f"print(n + {i % 5})"}) + "\n")
    data = SFTDataModule(str(path), str(tokenizer_dir), seq_length=64, micro_batch_size=4, global_batch_size=8)
    module = FalconH1Module(preset_config("tiny", num_layers=2), falcon_h1_optimizer_config(lr=3e-3),
                            LRSchedule(warmup_steps=2, decay_style="constant"))
    trainer = build_trainer(str(tmp_path / "run"), max_steps=30, val_check_interval=30, limit_val_batches=1,
                            checkpoint_every_n_steps=None, keep_last_k=None)
    result = pretrain(module, data, trainer, AutoResume(resume_if_exists=False))
    with open(tmp_path / "run" / "loss.csv") as f:
        validation = [float(line.split(",")[-1]) for line in f if ",val," in line]
    assert result.global_step == 30
    assert validation[-1] < 0.5 * validation[0], validation


def test_evaluate_checkpoint_matches_transformers(tokenizer_dir, tmp_path):
    """The evaluate command on an imported checkpoint: the masked mean token loss transformers'
    model gives document by document (float32, 1e-5 relative)."""
    from falcon_h1.convert.hf_import import import_hf_checkpoint
    from falcon_h1.data.preprocess import load_tokenizer
    from falcon_h1.inference.evaluate import evaluate_checkpoint
    from falcon_h1.parity import make_hf_model

    hf = make_hf_model(seed=41, vocab_size=4096, mamba_chunk_size=8)
    hf.save_pretrained(tmp_path / "hf")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tokenizer_dir / name, tmp_path / "hf" / name)
    checkpoint = import_hf_checkpoint(tmp_path / "hf", tmp_path / "ckpt", progress=False)
    examples = [{"prompt": f"x = {i}\n", "response": f"print(x * {i})"} for i in range(7)]
    path = tmp_path / "val.jsonl"
    path.write_text("".join(json.dumps(e) + "\n" for e in examples))

    result = evaluate_checkpoint(str(checkpoint), str(path), seq_length=40, batch_size=2)

    tokenizer = load_tokenizer(tokenizer_dir)
    total, count = 0.0, 0
    with torch.no_grad():
        for example in examples:
            ids, mask = tokenize_example(example, tokenizer)
            logits = hf(input_ids=torch.tensor([ids[:-1]])).logits[0]
            losses = torch.nn.functional.cross_entropy(logits, torch.tensor(ids[1:]), reduction="none")
            total += float((losses * torch.tensor(mask[1:], dtype=torch.float32)).sum())
            count += sum(mask[1:])
    assert result["tokens"] == count
    assert abs(result["loss"] - total / count) <= 1e-5 * abs(total / count), (result, total / count)
