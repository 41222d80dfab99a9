"""Sharded preprocessing: shards that depend only on the inputs and the shard size, a completion
record per input (re-runs skip finished inputs), tasks, and the manifest written last."""

import json
import os

import numpy as np
import pytest
from megatron.core.datasets.indexed_dataset import IndexedDataset

from falcon_h1.data.preprocess import main, preprocess
from falcon_h1.data.shards import MANIFEST_FORMAT, ShardSize, parse_shard_size

WORDS = "red green blue cyan magenta yellow black white".split()


def text(i: int) -> str:
    return " ".join(WORDS[(i * 3 + k) % len(WORDS)] for k in range(3 + i % 60)) + "\n"


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """Three inputs: two JSONL files and a directory of text files (one input: a run of text files)."""
    root = tmp_path_factory.mktemp("inputs")
    for n, name in enumerate(("a.jsonl", "b.jsonl")):
        (root / name).write_text("".join(json.dumps({"text": text(i)}) + "\n" for i in range(n * 300, n * 300 + 300)))
    (root / "texts").mkdir()
    for i in range(20):
        (root / "texts" / f"{i:02d}.txt").write_text(text(1000 + i) * 5)
    files = [str(root / "a.jsonl"), str(root / "b.jsonl"), str(root / "texts")]
    tokenizer = preprocess(files, str(root / "bpe"), train_bpe_vocab=300, log_every=0).tokenizer_dir
    return files, tokenizer


def run(files, prefix, tokenizer, *flags) -> int:
    return main(["--input", *files, "--output-prefix", str(prefix), "--log-every", "0",
                 *(["--tokenizer", tokenizer] if tokenizer else []), *map(str, flags)])


def manifest(prefix) -> dict:
    return json.loads(open(f"{prefix}.manifest.json").read())


def shard_documents(directory, shard) -> list[list[int]]:
    dataset = IndexedDataset(str(directory / shard["prefix"]))
    return [dataset[i].tolist() for i in range(len(dataset))]


@pytest.mark.parametrize("text, size", [
    ("50M", ShardSize(50_000_000, "tokens")), ("1000000", ShardSize(1_000_000, "tokens")),
    ("2G", ShardSize(2 * 10**9, "tokens")), ("2GB", ShardSize(2 * 10**9, "bytes")),
    ("512MB", ShardSize(512 * 10**6, "bytes")), ("1GiB", ShardSize(2**30, "bytes")),
    ("1.5k", ShardSize(1500, "tokens")),
])
def test_shard_sizes_are_tokens_or_bytes(text, size):
    assert parse_shard_size(text) == size


@pytest.mark.parametrize("text", ["5B", "big", "-3", "0", "2 GBs"])
def test_a_shard_size_that_is_not_one_says_how_to_write_one(text):
    with pytest.raises(ValueError, match="--shard-size"):
        parse_shard_size(text)


def test_shards_hold_every_document_once_and_the_manifest_counts_them(tmp_path, inputs):
    files, tokenizer = inputs
    assert run(files, tmp_path / "one", tokenizer) == 0
    assert run(files, tmp_path / "sharded" / "data", tokenizer, "--shard-size", 2000) == 0
    content = manifest(tmp_path / "sharded" / "data")
    assert content["format"] == MANIFEST_FORMAT and content["version"] == 1
    assert content["shard_size"] == {"tokens": 2000} and content["tokenizer"] == tokenizer  # outside the directory
    assert [s["prefix"] for s in content["shards"]] == sorted(s["prefix"] for s in content["shards"])
    everything = []
    for shard in content["shards"]:
        docs = shard_documents(tmp_path / "sharded", shard)
        assert shard["prefix"].startswith(f"data_{shard['input']:05d}_")  # shards never span inputs
        assert (len(docs), sum(map(len, docs))) == (shard["documents"], shard["tokens"])
        # closed at the first document boundary at or past the size: without its last document it is short
        assert sum(map(len, docs[:-1])) < 2000
        everything += docs
    last_of_input = {}
    for shard in content["shards"]:
        last_of_input[shard["input"]] = shard
    assert all(s["tokens"] >= 2000 for s in content["shards"] if s is not last_of_input[s["input"]])
    shards_per_input = [sum(s["input"] == n for s in content["shards"]) for n in range(3)]
    assert [i["shards"] for i in content["inputs"]] == shards_per_input
    whole = IndexedDataset(str(tmp_path / "one"))
    assert everything == [whole[i].tolist() for i in range(len(whole))]  # the same documents, in order
    assert (content["documents"], content["tokens"]) == (len(everything), sum(map(len, everything)))


def test_a_shard_size_in_bytes_counts_the_bin_file(tmp_path, inputs):
    files, tokenizer = inputs
    assert run(files[:1], tmp_path / "data", tokenizer, "--shard-size", "4KB") == 0
    sizes = [os.path.getsize(tmp_path / f"{s['prefix']}.bin") for s in manifest(tmp_path / "data")["shards"]]
    assert len(sizes) > 2 and all(size >= 4000 for size in sizes[:-1])
    assert manifest(tmp_path / "data")["shard_size"] == {"bytes": 4000}


def test_a_rerun_redoes_only_the_inputs_without_a_completion_record(tmp_path, inputs, capsys):
    files, tokenizer = inputs
    prefix = tmp_path / "data"
    assert run(files, prefix, tokenizer, "--shard-size", 2000) == 0
    first = manifest(prefix)
    mtimes = {p.name: p.stat().st_mtime_ns for p in tmp_path.glob("data_0000[02]_*")}
    (tmp_path / "data_00001.done.json").unlink()
    capsys.readouterr()
    assert run(files, prefix, tokenizer, "--shard-size", 2000) == 0
    assert "processed 1 input, skipped 2 inputs already complete" in capsys.readouterr().out
    assert {p.name: p.stat().st_mtime_ns for p in tmp_path.glob("data_0000[02]_*")} == mtimes
    assert manifest(prefix) == first
    assert run(files, prefix, tokenizer, "--shard-size", 2000) == 0
    assert "processed 0 inputs, skipped 3 inputs already complete" in capsys.readouterr().out


def test_tasks_then_write_manifest_give_what_one_process_gives(tmp_path, inputs, capsys):
    files, tokenizer = inputs
    assert run(files, tmp_path / "single" / "data", tokenizer, "--shard-size", 2000) == 0
    tasks = tmp_path / "tasks" / "data"
    assert run(files, tasks, tokenizer, "--shard-size", 2000, "--task-index", 1, "--num-tasks", 2) == 0
    assert "processed 1 input [1]" in capsys.readouterr().out
    assert not (tmp_path / "tasks" / "data.manifest.json").exists()  # a task writes no manifest
    assert run(files, tasks, None, "--write-manifest") == 2  # input 0 and 2 are missing
    assert "for input 0 (" in capsys.readouterr().err and not (tmp_path / "tasks" / "data.manifest.json").exists()
    assert run(files, tasks, tokenizer, "--shard-size", 2000, "--task-index", 0, "--num-tasks", 2) == 0
    assert "processed 2 inputs [0, 2]" in capsys.readouterr().out
    assert run(files, tasks, None, "--write-manifest") == 0
    single = sorted(p.name for p in (tmp_path / "single").iterdir())
    assert single == sorted(p.name for p in (tmp_path / "tasks").iterdir())
    for name in single:
        assert (tmp_path / "single" / name).read_bytes() == (tmp_path / "tasks" / name).read_bytes(), name


def test_tasks_need_a_tokenizer_trained_before_them(tmp_path, inputs, capsys):
    files, _ = inputs
    prefix = tmp_path / "data"
    assert run(files, prefix, None, "--train-bpe", 300, "--shard-size", 2000, "--task-index", 0, "--num-tasks", 2) == 2
    err = capsys.readouterr().err
    assert "--train-bpe trains once, before the tasks" in err and err.count("\n") == 1
    assert run(files, prefix, None, "--train-bpe", 300, "--tokenizer-only") == 0
    assert run(files, prefix, tokenizer := f"{prefix}_tokenizer", "--shard-size", 2000, "--task-index", 0,
               "--num-tasks", 1) == 0
    assert run(files, prefix, None, "--write-manifest") == 0
    assert manifest(prefix)["tokenizer"] == "data_tokenizer"  # under the manifest's directory: relative
    assert os.path.isdir(tokenizer)


def test_records_of_other_inputs_are_refused_not_mixed(tmp_path, inputs, capsys):
    files, tokenizer = inputs
    assert run(files, tmp_path / "data", tokenizer, "--shard-size", 2000) == 0
    capsys.readouterr()
    assert run(files[1:], tmp_path / "data", tokenizer, "--shard-size", 2000) == 2
    err = capsys.readouterr().err
    assert "data_00000.done.json was written for input 0" in err and "use another --output-prefix" in err
    assert run(files, tmp_path / "data", tokenizer, "--shard-size", 3000) == 2
    assert "written with shard size {'tokens': 2000}" in capsys.readouterr().err


def test_the_shards_read_as_megatron_indexed_datasets_of_the_tokenizer_dtype(tmp_path, inputs):
    files, tokenizer = inputs
    assert run(files[:1], tmp_path / "data", tokenizer, "--shard-size", "1M") == 0
    [shard] = manifest(tmp_path / "data")["shards"]
    dataset = IndexedDataset(str(tmp_path / shard["prefix"]))
    assert dataset.index.dtype == np.uint16 and len(dataset) == 300


def test_the_help_names_every_flag(capsys):
    with pytest.raises(SystemExit) as exit:
        main(["--help"])
    out = capsys.readouterr().out
    assert exit.value.code == 0
    assert all(flag in out for flag in ("--text-key", "--json-key", "--workers", "--shard-size", "--task-index",
                                        "--num-tasks", "--write-manifest", "--tokenizer-only", "--log-every"))
