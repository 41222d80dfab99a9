"""Tokenizing in several worker processes writes the same bytes as one worker."""

import filecmp
import gzip
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from falcon_h1.data.preprocess import main, preprocess

WORDS = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu".split()


def text(i: int) -> str:
    return " ".join(WORDS[(i * 7 + k) % len(WORDS)] for k in range(5 + i % 300)) + f" #{i}\n"


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """About a megabyte of text in three files: several batches per file for the workers to share."""
    root = tmp_path_factory.mktemp("inputs")
    (root / "a.jsonl").write_text("".join(json.dumps({"text": text(i)}) + "\n" for i in range(800)))
    pq.write_table(pa.table({"text": [text(i) for i in range(800, 1600)]}), root / "b.parquet")
    (root / "c.txt").write_text(text(1600) * 40)
    tokenizer = preprocess([str(root / "c.txt")], str(root / "bpe"), train_bpe_vocab=300, log_every=0).tokenizer_dir
    return [str(root / "a.jsonl"), str(root / "b.parquet"), str(root / "c.txt")], tokenizer


def written_files(directory):
    return sorted(p.name for p in directory.iterdir() if p.suffix in (".bin", ".idx"))


@pytest.mark.parametrize("shard_flags", [[], ["--shard-size", "20000"]], ids=["one dataset", "shards"])
def test_two_workers_write_the_bytes_one_worker_writes(tmp_path, inputs, shard_flags):
    files, tokenizer = inputs
    for workers in (1, 2):
        assert main(["--input", *files, "--output-prefix", str(tmp_path / f"w{workers}" / "data"), "--tokenizer",
                     tokenizer, "--workers", str(workers), "--log-every", "0", *shard_flags]) == 0
    names = written_files(tmp_path / "w1")
    assert names == written_files(tmp_path / "w2") and len(names) >= (8 if shard_flags else 2)
    for name in names:
        assert filecmp.cmp(tmp_path / "w1" / name, tmp_path / "w2" / name, shallow=False), name
    if shard_flags:
        manifests = [(tmp_path / w / "data.manifest.json").read_text() for w in ("w1", "w2")]
        assert manifests[0] == manifests[1]


def test_progress_lines_name_documents_tokens_rate_and_time_left(tmp_path, inputs, capsys):
    files, tokenizer = inputs
    preprocess(files, str(tmp_path / "data"), tokenizer_dir=tokenizer, log_every=1e-9)
    lines = [line for line in capsys.readouterr().out.splitlines() if "tokens/s" in line]
    assert lines and all("documents" in line and "ETA" in line for line in lines)


def test_a_damaged_input_stops_the_workers_and_leaves_none_of_its_output(tmp_path, inputs, capsys):
    files, tokenizer = inputs
    lines = "".join(json.dumps({"text": text(i)}) + "\n" for i in range(1500)).encode()
    (tmp_path / "cut.jsonl.gz").write_bytes(gzip.compress(lines)[:-100])  # batches in flight when it fails
    code = main(["--input", files[0], str(tmp_path / "cut.jsonl.gz"), "--output-prefix", str(tmp_path / "out" / "data"),
                 "--tokenizer", tokenizer, "--workers", "2", "--shard-size", "20000", "--log-every", "0"])
    err = capsys.readouterr().err
    assert code == 2 and "cut.jsonl.gz:" in err and "cannot read" in err and err.count("\n") == 1
    left = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert "data_00000.done.json" in left and not [n for n in left if n.startswith("data_00001") or ".tmp" in n]
