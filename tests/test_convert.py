"""Hugging Face <-> falcon_h1 checkpoint conversion.

Each HF model is created locally by transformers (random weights away from init) and written with
save_pretrained in several safetensors shards. Import must give a checkpoint whose model computes
transformers' logits (float32, relative error <= 1e-5) at TP=1 and TP=2; export must give back
every tensor bitwise (names, dtypes, values) with a config.json transformers reads as the
original, also from a checkpoint written at TP=2 (other vocabulary padding). Bad input fails
before anything is written, and a failure half-way leaves no output behind. Export writes the bos/eos/pad
ids of the tokenizer the checkpoint carries, saying what it changed, and refuses ids it cannot decide.
"""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from falcon_h1.convert.hf_export import export_hf_checkpoint
from falcon_h1.convert.hf_import import import_hf_checkpoint
from falcon_h1.convert.safetensors_io import HFCheckpointError, HFWeights, read_tensor
from falcon_h1.parity import make_hf_model, random_tokens, relative_error
from falcon_h1.training.checkpoint_io import CheckpointError
from tests.conftest import REPO, torchrun

CONFIGS = {
    # head_dim != hidden / heads, 1 SSM group, untied embeddings, float32 files.
    "untied": dict(),
    # Tied embeddings, 2 SSM groups with the gated RMSNorm, every bias on.
    "tied_groups_norm_biases": dict(tie_word_embeddings=True, mamba_n_groups=2, mamba_rms_norm=True,
                                    attention_bias=True, mamba_proj_bias=True, projectors_bias=True, mlp_bias=True),
    # 6:2 GQA, 3 layers, a time-step limit, a vocabulary far from a multiple of 128; bfloat16 files.
    "gqa_padded_vocab_bf16": dict(num_attention_heads=6, num_key_value_heads=2, mamba_n_groups=2,
                                  num_hidden_layers=3, time_step_limit=(0.0, 0.5), vocab_size=301),
}
DTYPES = {"gqa_padded_vocab_bf16": torch.bfloat16}


def hf_tensors(directory: Path) -> dict[str, torch.Tensor]:
    weights = HFWeights(directory)
    return {name: read_tensor(entry) for name, entry in weights.entries.items()}


def hf_logits(directory: Path, tokens: torch.Tensor) -> torch.Tensor:
    from transformers import FalconH1ForCausalLM

    model = FalconH1ForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(input_ids=tokens).logits


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf")
    dirs = {}
    for i, (name, overrides) in enumerate(CONFIGS.items()):
        model = make_hf_model(seed=i + 7, **overrides).to(DTYPES.get(name, torch.float32))
        model.save_pretrained(root / name, max_shard_size="40KB")
        (root / name / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 4096}))
        dirs[name] = root / name
    return dirs


@pytest.fixture(scope="module")
def imported(hf_dirs, tmp_path_factory):
    root = tmp_path_factory.mktemp("imported")
    return {name: import_hf_checkpoint(path, root / name, progress=False) for name, path in hf_dirs.items()}


def test_hf_fixtures_are_sharded(hf_dirs):
    for path in hf_dirs.values():
        assert len(list(path.glob("model-*-of-*.safetensors"))) >= 3
        assert (path / "model.safetensors.index.json").is_file()


@pytest.mark.parametrize("name", list(CONFIGS))
def test_imported_checkpoint_computes_transformers_logits(single_rank, hf_dirs, imported, name):
    from falcon_h1.model.model import FalconH1Model
    from falcon_h1.training.checkpoint_io import checkpoint_model_config, load_model_weights

    config = checkpoint_model_config(imported[name], use_cpu_initialization=True, kernel_backend="torch")
    model = FalconH1Model(config).eval()
    load_model_weights([model], imported[name])
    tokens = random_tokens(model_config_as_hf(hf_dirs[name]), batch=2, seq_len=29, seed=3)
    with torch.no_grad():
        ours = model(tokens)[..., : config.vocab_size]
    assert relative_error(ours, hf_logits(hf_dirs[name], tokens)) <= 1e-5


def model_config_as_hf(directory: Path):
    from transformers import FalconH1Config

    return FalconH1Config.from_pretrained(directory)


def test_import_carries_every_config_field_and_the_tokenizer(hf_dirs, imported):
    from falcon_h1.training.checkpoint_io import read_context

    for name, path in imported.items():
        context, run_info = read_context(path)
        original = json.loads((hf_dirs[name] / "config.json").read_text())
        for key in ("hidden_size", "head_dim", "num_key_value_heads", "mamba_n_groups", "mamba_rms_norm",
                    "mamba_chunk_size", "tie_word_embeddings", "attention_bias", "projectors_bias",
                    "embedding_multiplier", "lm_head_multiplier", "key_multiplier", "ssm_multipliers",
                    "mlp_multipliers", "ssm_out_multiplier", "vocab_size"):
            assert context[key] == original[key], (name, key)
        assert context["rope_theta"] == original["rope_parameters"]["rope_theta"]
        assert run_info["weights_only"] is True
        assert (path / "context" / "tokenizer" / "tokenizer_config.json").is_file()


@pytest.mark.parametrize("name", list(CONFIGS))
def test_export_round_trip_is_bitwise(hf_dirs, imported, tmp_path, name):
    from transformers import FalconH1Config

    out = export_hf_checkpoint(imported[name], tmp_path / "hf", max_shard_size="30KB", progress=False)
    original, exported = hf_tensors(hf_dirs[name]), hf_tensors(out)
    assert sorted(exported) == sorted(original)
    for key, tensor in original.items():
        assert exported[key].dtype == tensor.dtype and torch.equal(exported[key], tensor), key
    assert len(list(out.glob("model-*-of-*.safetensors"))) >= 3
    assert FalconH1Config.from_pretrained(out).to_dict() == FalconH1Config.from_pretrained(hf_dirs[name]).to_dict()
    assert (out / "tokenizer_config.json").is_file()
    tokens = random_tokens(model_config_as_hf(out), batch=1, seq_len=12, seed=1)
    assert torch.equal(hf_logits(out, tokens), hf_logits(hf_dirs[name], tokens))


def test_tp2_loads_the_import_and_its_tp2_save_exports_the_original(hf_dirs, imported, tmp_path):
    """Vocabulary 301: padded to 384 at TP=1 (the import) and to 512 at TP=2 (the re-save)."""
    name = "gqa_padded_vocab_bf16"
    torchrun("tests/distributed/checkpoint_logits.py", 1, "--checkpoint", str(imported[name]),
             "--out", str(tmp_path / "tp1.pt"))
    torchrun("tests/distributed/checkpoint_logits.py", 2, "--checkpoint", str(imported[name]),
             "--out", str(tmp_path / "tp2.pt"), "--save-to", str(tmp_path / "tp2_checkpoint"))
    tp1, tp2 = torch.load(tmp_path / "tp1.pt"), torch.load(tmp_path / "tp2.pt")
    assert relative_error(tp2[..., :301], tp1[..., :301]) <= 1e-5
    out = export_hf_checkpoint(tmp_path / "tp2_checkpoint", tmp_path / "hf", progress=False)
    original, exported = hf_tensors(hf_dirs[name]), hf_tensors(out)
    assert exported["model.embed_tokens.weight"].shape[0] == 301
    assert all(torch.equal(exported[k], v) for k, v in original.items())


# ---------------------------------------------------------------- special token ids


def with_bundled_tokenizer(source: Path, target: Path, **config_fields) -> Path:
    """A copy of the HF directory `source` carrying the bundled corpus tokenizer (<|endoftext|> = id 0
    is its bos, eos and pad), with `config_fields` set in its config.json."""
    from falcon_h1.data.default_corpus import default_corpus

    copy_dir(source, target)
    for file in Path(default_corpus().tokenizer_dir).iterdir():
        shutil.copy(file, target / file.name)
    config = json.loads((target / "config.json").read_text())
    config.update(config_fields)
    (target / "config.json").write_text(json.dumps(config))
    return target


def test_export_takes_the_token_ids_of_the_checkpoints_tokenizer(hf_dirs, tmp_path, capfd):
    """The tiny preset used to say eos 11 and bos 1: '+' and '!' in the bundled tokenizer."""
    stale = with_bundled_tokenizer(hf_dirs["untied"], tmp_path / "stale", bos_token_id=1, eos_token_id=11,
                                   pad_token_id=0)
    checkpoint = import_hf_checkpoint(stale, tmp_path / "ckpt", progress=False)
    capfd.readouterr()
    out = export_hf_checkpoint(checkpoint, tmp_path / "hf", progress=False)
    assert capfd.readouterr().err.splitlines() == [
        "export: config.json bos_token_id 1 ('!') -> 0 ('<|endoftext|>'), eos_token_id 11 ('+') -> 0 "
        "('<|endoftext|>') to match the checkpoint's tokenizer"]
    config = json.loads((out / "config.json").read_text())
    assert (config["bos_token_id"], config["eos_token_id"], config["pad_token_id"]) == (0, 0, 0)
    original, exported = hf_tensors(hf_dirs["untied"]), hf_tensors(out)
    assert all(torch.equal(exported[k], v) for k, v in original.items())

    # Ids that already agree (an eos list holding the tokenizer's eos included) are written as they are.
    agreeing = with_bundled_tokenizer(hf_dirs["untied"], tmp_path / "agreeing", bos_token_id=0, eos_token_id=[0, 7])
    export_hf_checkpoint(import_hf_checkpoint(agreeing, tmp_path / "ckpt2", progress=False), tmp_path / "hf2",
                         progress=False)
    assert "to match" not in capfd.readouterr().err
    assert json.loads((tmp_path / "hf2" / "config.json").read_text())["eos_token_id"] == [0, 7]


def test_export_refuses_token_ids_it_cannot_decide(hf_dirs, tmp_path):
    listed = with_bundled_tokenizer(hf_dirs["untied"], tmp_path / "listed", eos_token_id=[5, 7])
    checkpoint = import_hf_checkpoint(listed, tmp_path / "ckpt", progress=False)
    with pytest.raises(CheckpointError, match=r"eos_token_id=\[5, 7\] does not hold the tokenizer's eos id 0"):
        export_hf_checkpoint(checkpoint, tmp_path / "hf", progress=False)
    assert not (tmp_path / "hf").exists()

    outside = with_bundled_tokenizer(hf_dirs["untied"], tmp_path / "outside")  # a vocabulary of 200
    settings = json.loads((outside / "tokenizer_config.json").read_text())
    vocabulary = json.loads((outside / "tokenizer.json").read_text())["model"]["vocab"]
    settings["eos_token"] = next(token for token, i in vocabulary.items() if i == 250)
    (outside / "tokenizer_config.json").write_text(json.dumps(settings))
    checkpoint = import_hf_checkpoint(outside, tmp_path / "ckpt2", progress=False)
    with pytest.raises(CheckpointError, match="has id 250, outside the model's vocabulary of 200"):
        export_hf_checkpoint(checkpoint, tmp_path / "hf", progress=False)


# ---------------------------------------------------------------- bad input


def test_directory_without_config_json(hf_dirs, tmp_path):
    broken = tmp_path / "no_config"
    broken.mkdir()
    (broken / "model.safetensors").write_bytes(b"")
    with pytest.raises(HFCheckpointError, match="has no config.json"):
        import_hf_checkpoint(broken, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def test_checkpoint_of_another_architecture(hf_dirs, tmp_path):
    other = copy_dir(hf_dirs["untied"], tmp_path / "llama")
    config = json.loads((other / "config.json").read_text())
    config.update(model_type="llama", architectures=["LlamaForCausalLM"])
    (other / "config.json").write_text(json.dumps(config))
    with pytest.raises(HFCheckpointError, match="not a Falcon-H1 model"):
        import_hf_checkpoint(other, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def test_truncated_safetensors_file(hf_dirs, tmp_path):
    broken = copy_dir(hf_dirs["untied"], tmp_path / "truncated")
    shard = sorted(broken.glob("model-*.safetensors"))[1]
    shard.write_bytes(shard.read_bytes()[:-100])
    with pytest.raises(HFCheckpointError, match=f"{shard.name} is truncated"):
        import_hf_checkpoint(broken, tmp_path / "out", progress=False)
    assert list(tmp_path.iterdir()) == [broken]  # no output, no partial directory


def test_tensor_shape_disagrees_with_config(hf_dirs, tmp_path):
    broken = copy_dir(hf_dirs["untied"], tmp_path / "shape")
    config = json.loads((broken / "config.json").read_text())
    config["intermediate_size"] += 8
    (broken / "config.json").write_text(json.dumps(config))
    with pytest.raises(HFCheckpointError, match=r"feed_forward\.\w+_proj\.weight has shape .* implies"):
        import_hf_checkpoint(broken, tmp_path / "out", progress=False)


def test_existing_output_is_kept_unless_overwrite(hf_dirs, imported, tmp_path):
    target = tmp_path / "ckpt"
    import_hf_checkpoint(hf_dirs["untied"], target, progress=False)
    stamp = (target / "context" / "run.json").read_text()
    with pytest.raises(FileExistsError, match="already exists"):
        import_hf_checkpoint(hf_dirs["tied_groups_norm_biases"], target, progress=False)
    assert (target / "context" / "run.json").read_text() == stamp
    with pytest.raises(FileExistsError, match="already exists"):
        export_hf_checkpoint(imported["untied"], target, progress=False)
    import_hf_checkpoint(hf_dirs["tied_groups_norm_biases"], target, overwrite=True, progress=False)
    assert json.loads((target / "context" / "config.json").read_text())["tie_word_embeddings"] is True
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


def test_failure_half_way_leaves_nothing(imported, tmp_path, monkeypatch):
    from falcon_h1.convert import dist_checkpoint

    reads = []

    def failing_read(self, key, rows=None):
        reads.append(key)
        if len(reads) > 5:
            raise OSError("disk went away")
        return original_read(self, key, rows)

    original_read = dist_checkpoint.CheckpointWeights.read
    monkeypatch.setattr(dist_checkpoint.CheckpointWeights, "read", failing_read)
    with pytest.raises(OSError, match="disk went away"):
        export_hf_checkpoint(imported["untied"], tmp_path / "hf", max_shard_size="30KB", progress=False)
    assert list(tmp_path.iterdir()) == []


def test_export_of_a_missing_checkpoint(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        export_hf_checkpoint(tmp_path / "nowhere", tmp_path / "hf", progress=False)


def test_command_line(hf_dirs, tmp_path):
    def convert(*args):
        return subprocess.run([sys.executable, "-m", "falcon_h1.convert", *map(str, args)], capture_output=True,
                              text=True, cwd=REPO, timeout=300)

    done = convert("import", hf_dirs["untied"], tmp_path / "ckpt")
    assert done.returncode == 0, done.stderr
    assert "import untied:" in done.stderr and "done in" in done.stderr  # the progress line
    done = convert("export", tmp_path / "ckpt", tmp_path / "hf", "--max-shard-size", "50KB", "--quiet")
    assert done.returncode == 0, done.stderr
    assert "from_pretrained" in done.stdout
    failed = convert("import", tmp_path / "missing", tmp_path / "other")
    assert failed.returncode == 2 and "is not a directory" in failed.stderr


def copy_dir(source: Path, target: Path) -> Path:
    shutil.copytree(source, target)
    return target
