"""Data on the command line: `data=mock`, `data=pretraining(...)`, `data=sft(...)`.

A data factory does not know the recipe it goes into: the sizes it leaves unset (sequence length,
micro and global batch) are the recipe's, a size the command line sets wins, and mock data takes
the model's vocabulary. One default split ("98,2,0") everywhere; data too small for its split
fails before Megatron builds its index (where it would loop forever), saying how many documents
the split needs. Through the CLI, tiny trains 5 steps on mock and on indexed data, then fine-tunes
5 steps on SFT jsonl from the indexed-data run's checkpoint.
"""

import inspect
import json
import random
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace

import fiddle as fdl
import pytest
import yaml

from falcon_h1.data.pretraining import DEFAULT_SPLIT, MockDataModule, PreTrainingDataModule
from recipes import common, falcon_h1_7b, tiny
from falcon_h1.run_context import inherit_data_sizes
from tests.conftest import falcon_h1_cli


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """An indexed dataset of 40 short documents and the BPE tokenizer trained on them."""
    from falcon_h1.data.preprocess import preprocess

    root = tmp_path_factory.mktemp("corpus")
    rng = random.Random(0)
    with open(root / "code.jsonl", "w") as f:
        for i in range(40):
            f.write(json.dumps({"text": f"def f{i}(x):\n    return x * {i} + {rng.randint(0, 99)}\n"}) + "\n")
    return preprocess([str(root / "code.jsonl")], str(root / "code"), train_bpe_vocab=300, log_every=0)


def parsed(recipe, *overrides):
    """The recipe with command-line overrides, as the falcon-h1 command makes it."""
    from nemo_run.cli.cli_parser import parse_cli_args

    return inherit_data_sizes(parse_cli_args(recipe(), list(overrides)), recipe())


def trainer_stub(max_steps=5, vocab_size=None):
    """What a data module reads of its Trainer: the run's length, validation batches, the model."""
    model = SimpleNamespace(config=SimpleNamespace(vocab_size=vocab_size))
    return SimpleNamespace(max_steps=max_steps, limit_val_batches=2, limit_test_batches=2, lightning_module=model)


def test_a_data_factory_takes_the_recipes_sizes_unless_the_command_line_sets_them(corpus):
    task = parsed(tiny.pretrain_recipe, "data=mock", "data.global_batch_size=32")
    data = fdl.build(task.data)
    assert isinstance(data, MockDataModule) and data.vocab_size is None  # the model's, at setup
    assert (data.seq_length, data.micro_batch_size, data.global_batch_size) == (128, 8, 32)

    pretraining = f"data=pretraining(paths={corpus.prefix},tokenizer={corpus.tokenizer_dir})"
    task = parsed(falcon_h1_7b.pretrain_recipe, pretraining)
    data = fdl.build(task.data)
    assert isinstance(data, PreTrainingDataModule) and data.split == DEFAULT_SPLIT
    assert (data.seq_length, data.micro_batch_size, data.global_batch_size) == (8192, 1, 128)

    task = parsed(lambda: tiny.finetune_recipe(checkpoint="ckpt"), "data=sft(path=train.jsonl,seq_length=64)")
    assert (task.data.train_path, task.data.tokenizer_dir) == ("train.jsonl", None)  # finetune: the checkpoint's
    assert (task.data.seq_length, task.data.micro_batch_size, task.data.global_batch_size) == (64, 8, 16)


def test_blends_are_lists_given_after_the_factory(corpus):
    # nemo-run splits a factory's arguments at every comma, so lists follow as overrides.
    task = parsed(tiny.pretrain_recipe, f"data=pretraining(tokenizer={corpus.tokenizer_dir})",
                  f'data.paths=["{corpus.prefix}","{corpus.prefix}"]', "data.weights=[0.7,0.3]")
    assert fdl.build(task.data)._blend == ([corpus.prefix, corpus.prefix], [0.7, 0.3])
    with pytest.raises(ValueError, match=r"data.weights=\[1.0\] has 1 values for 2 paths"):
        PreTrainingDataModule([corpus.prefix] * 2, corpus.tokenizer_dir, weights=[1.0])
    with pytest.raises(ValueError, match="given twice"):
        PreTrainingDataModule([1.0, corpus.prefix], corpus.tokenizer_dir, weights=[1.0])
    with pytest.raises(ValueError, match=r"needs the tokenizer it was made with: data.tokenizer_dir=DIR"):
        fdl.build(parsed(tiny.pretrain_recipe, f"data=pretraining(paths={corpus.prefix})").data)


def test_mock_data_draws_from_the_models_vocabulary():
    data = MockDataModule(seq_length=16, micro_batch_size=2, global_batch_size=2)
    data.trainer = trainer_stub(vocab_size=50)
    data.setup("fit")
    assert data.vocab_size == 50 and max(int(data._train[i]["tokens"].max()) for i in range(10)) < 50
    too_wide = MockDataModule(vocab_size=60, seq_length=16, micro_batch_size=2, global_batch_size=2)
    too_wide.trainer = trainer_stub(vocab_size=50)
    with pytest.raises(ValueError, match="data.vocab_size=60 exceeds the model's vocab_size=50"):
        too_wide.setup("fit")


def test_one_default_split_everywhere():
    from falcon_h1.train import parse_args

    assert DEFAULT_SPLIT == "98,2,0"
    for function in (PreTrainingDataModule, common.pretraining):
        assert inspect.signature(function).parameters["split"].default == DEFAULT_SPLIT, function
    assert parse_args(["--data", "web", "--tokenizer", "tok"]).split == DEFAULT_SPLIT  # the main job's


def test_data_too_small_for_its_split_fails_saying_how_many_documents_it_needs(corpus, tmp_path):
    def setup(split):
        data = PreTrainingDataModule(corpus.prefix, corpus.tokenizer_dir, seq_length=32, micro_batch_size=2,
                                     global_batch_size=4, split=split, index_mapping_dir=str(tmp_path))
        data.trainer = trainer_stub()
        data.setup("fit")
        return data

    # 40 documents: 0.1% of them is no test document (Megatron would loop forever filling its samples).
    with pytest.raises(ValueError, match=r"has 40 documents, too few for split='949,50,1': its test split would get "
                                         r"none. That split needs at least 501 documents: add data, or "
                                         r"data.split='39,1,0' \(one validation document\)"):
        setup("949,50,1")
    with pytest.raises(ValueError, match="its validation split would get none. That split needs at least 51"):
        setup("99,1")
    data = setup(DEFAULT_SPLIT)  # 39 training documents, 1 validation document (repeated to fill its samples)
    assert (len(data._train), len(data._validation), data._test) == (5 * 4, 2 * 4, None)


def run_cli(*args, tmp_path):
    done = falcon_h1_cli(*args, "trainer.max_steps=5", "-y", tmp_path=tmp_path, timeout=900, threads=1)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done


def test_tiny_trains_on_each_data_factory_through_the_cli(corpus, tmp_path):
    """`data=mock` and `data=pretraining(...)` side by side (a core each), both at the tiny
    recipe's sizes, then `data=sft(...)` fine-tuning from the indexed-data run's checkpoint with
    that checkpoint's tokenizer."""
    runs = {"mock": "data=mock",
            "pretraining": f"data=pretraining(paths={corpus.prefix},tokenizer={corpus.tokenizer_dir})"}
    with ThreadPoolExecutor(2) as pool:
        futures = {name: pool.submit(run_cli, "pretrain", "--factory", "tiny", data,
                                     f"trainer.log_dir={tmp_path / name}", tmp_path=tmp_path / f"{name}_cli")
                   for name, data in runs.items()}
        for name, future in futures.items():
            future.result()
            result = json.loads((tmp_path / name / "result.json").read_text())
            assert result["global_step"] == 5 and result["train_loss"] > 0, (name, result)
            data = yaml.safe_load((tmp_path / name / "config.yaml").read_text())["data"]  # the run's config
            assert (data["seq_length"], data["micro_batch_size"], data["global_batch_size"]) == (128, 8, 16), name
    checkpoint = tmp_path / "pretraining" / "checkpoints" / "step=0000005"
    tokenizer = json.loads((checkpoint / "context" / "tokenizer" / "tokenizer.json").read_text())
    assert len(tokenizer["model"]["vocab"]) == 300  # the checkpoint carries the data's tokenizer

    sft = tmp_path / "sft.jsonl"
    sft.write_text("".join(json.dumps({"prompt": f"f{i}(2)", "response": f" = {2 * i}"}) + "\n" for i in range(32)))
    run_cli("finetune", "--factory", f"tiny(checkpoint={checkpoint})", f"data=sft(path={sft})",
            f"trainer.log_dir={tmp_path / 'sft'}", tmp_path=tmp_path / "sft_cli")
    result = json.loads((tmp_path / "sft" / "result.json").read_text())
    assert result["global_step"] == 5 and result["val_loss"] > 0
