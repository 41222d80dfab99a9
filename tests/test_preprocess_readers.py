"""Every input format preprocessing reads gives the tokens of tokenizing its texts directly; a file
that cannot be read is named in one line with the place and the reason, and leaves no output."""

import gzip
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard
from megatron.core.datasets.indexed_dataset import IndexedDataset

from falcon_h1.data.preprocess import load_tokenizer, main, preprocess

TEXTS = ["def add(a, b):\n    return a + b\n", "The quick brown fox jumps over the lazy dog.", "",
         "ünïcödé text survives the round trip", "import os\nprint(os.getcwd())\n",
         "an <|endoftext|> inside a document is the special token, as the tokenizer reads it"]


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("tokenizer")
    (root / "corpus.txt").write_text(" ".join(TEXTS) * 20)
    return preprocess([str(root / "corpus.txt")], str(root / "bpe"), train_bpe_vocab=300, log_every=0).tokenizer_dir


def tokens_of(tokenizer_dir, texts) -> list[list[int]]:
    """What each document must become: the tokenizer's own ids, then the end-of-document token."""
    tokenizer = load_tokenizer(tokenizer_dir)
    return [tokenizer(t, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id] for t in texts]


def documents(prefix) -> list[list[int]]:
    dataset = IndexedDataset(str(prefix))
    return [dataset[i].tolist() for i in range(len(dataset))]


def run(*args) -> int:
    return main([*map(str, args), "--log-every", "0"])


def test_parquet_is_read_in_record_batches_from_the_column_text_key_names(tmp_path, tokenizer_dir):
    texts = TEXTS * 500  # several record batches and several tokenizing batches
    pq.write_table(pa.table({"id": list(range(len(texts))), "text": ["not this"] * len(texts), "body": texts}),
                   tmp_path / "part.parquet", row_group_size=700)
    assert run("--input", tmp_path / "part.parquet", "--output-prefix", tmp_path / "out", "--tokenizer",
               tokenizer_dir, "--text-key", "body") == 0
    assert documents(tmp_path / "out") == tokens_of(tokenizer_dir, texts)


def test_a_saved_datasets_directory_is_read_without_the_datasets_package(tmp_path, tokenizer_dir):
    datasets = pytest.importorskip("datasets")  # only to write the fixture
    datasets.Dataset.from_dict({"text": TEXTS * 3}).save_to_disk(str(tmp_path / "saved"), num_shards=2)
    assert run("--input", tmp_path / "saved", "--output-prefix", tmp_path / "out", "--tokenizer", tokenizer_dir) == 0
    assert documents(tmp_path / "out") == tokens_of(tokenizer_dir, TEXTS * 3)


def test_a_saved_dataset_dict_asks_for_one_split(tmp_path, tokenizer_dir, capsys):
    datasets = pytest.importorskip("datasets")
    datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": TEXTS})}).save_to_disk(str(tmp_path / "dd"))
    assert run("--input", tmp_path / "dd", "--output-prefix", tmp_path / "out", "--tokenizer", tokenizer_dir) == 2
    assert f"give one split's directory, e.g. {tmp_path / 'dd' / 'train'}" in capsys.readouterr().err


def test_arrow_ipc_files(tmp_path, tokenizer_dir):
    table = pa.table({"text": TEXTS})
    with pa.ipc.new_file(tmp_path / "docs.arrow", table.schema) as writer:
        writer.write_table(table, max_chunksize=2)
    assert run("--input", tmp_path / "docs.arrow", "--output-prefix", tmp_path / "out",
               "--tokenizer", tokenizer_dir) == 0
    assert documents(tmp_path / "out") == tokens_of(tokenizer_dir, TEXTS)


@pytest.mark.parametrize("suffix, compress", [
    (".jsonl", lambda data: data),
    (".jsonl.gz", gzip.compress),
    (".jsonl.zst", lambda data: zstandard.ZstdCompressor().compress(data)),
])
def test_jsonl_plain_gzip_and_zstandard(tmp_path, tokenizer_dir, suffix, compress):
    lines = "".join(json.dumps({"content": t, "n": i}) + "\n" for i, t in enumerate(TEXTS))
    (tmp_path / f"docs{suffix}").write_bytes(compress(lines.encode()))
    # --json-key, the flag's older name, still works
    assert run("--input", tmp_path / f"docs{suffix}", "--output-prefix", tmp_path / "out", "--tokenizer",
               tokenizer_dir, "--json-key", "content") == 0
    assert documents(tmp_path / "out") == tokens_of(tokenizer_dir, TEXTS)


def test_directories_are_read_recursively_in_path_order_whatever_the_formats(tmp_path, tokenizer_dir):
    data = tmp_path / "data"
    (data / "b").mkdir(parents=True)
    pq.write_table(pa.table({"text": TEXTS[:2]}), data / "a.parquet")
    (data / "b" / "one.txt").write_text(TEXTS[2])
    (data / "b" / "two.txt").write_text(TEXTS[3])
    (data / "c.jsonl.gz").write_bytes(gzip.compress("".join(json.dumps({"text": t}) + "\n" for t in TEXTS[4:]).encode()))
    assert run("--input", data, "--output-prefix", tmp_path / "out", "--tokenizer", tokenizer_dir) == 0
    assert documents(tmp_path / "out") == tokens_of(tokenizer_dir, TEXTS)


def corrupt_second_gzip_member(path):
    """Two gzip members (gzip readers read them as one stream); the second's compressed bytes damaged."""
    first = gzip.compress(b"".join(json.dumps({"text": t}).encode() + b"\n" for t in TEXTS))
    second = bytearray(gzip.compress(b"".join(json.dumps({"text": t * 50}).encode() + b"\n" for t in TEXTS)))
    second[20:40] = b"\xff" * 20
    path.write_bytes(first + bytes(second))


@pytest.mark.parametrize("name, write, message", [
    ("bad.parquet", lambda p: p.write_bytes(b"PAR1 this is not parquet"), "bad.parquet: not a readable Parquet file ("),
    ("bad.parquet", lambda p: pq.write_table(pa.table({"body": TEXTS}), p),
     "bad.parquet: no 'text' column (columns: body; set --text-key)"),
    ("bad.parquet", lambda p: pq.write_table(pa.table({"text": ["a", None, "c"]}), p),
     "bad.parquet: row 1: the text is null"),
    ("bad.jsonl.gz", corrupt_second_gzip_member, f"bad.jsonl.gz:{len(TEXTS) + 1}: cannot read ("),
    ("bad.jsonl.zst", lambda p: p.write_bytes(b"\x28\xb5\x2f\xfd garbage"), "bad.jsonl.zst:1: cannot read ("),
    ("bad.arrow", lambda p: p.write_bytes(b"not arrow at all"), "bad.arrow: not an Arrow IPC file or stream ("),
])
@pytest.mark.parametrize("sharded", [False, True])
def test_an_unreadable_input_is_named_in_one_line_and_leaves_no_output(tmp_path, tokenizer_dir, capsys, name,
                                                                     write, message, sharded):
    (tmp_path / "good.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS))
    write(tmp_path / name)
    shard_flags = ["--shard-size", "100"] if sharded else []
    code = run("--input", tmp_path / "good.jsonl", tmp_path / name, "--output-prefix", tmp_path / "out" / "data",
               "--tokenizer", tokenizer_dir, *shard_flags)
    err = capsys.readouterr().err
    assert code == 2 and message in err and err.count("\n") == 1 and "Traceback" not in err
    left = sorted(p.name for p in (tmp_path / "out").iterdir())
    if sharded:  # the good input 0 is complete (a re-run skips it); the bad input 1 left nothing
        assert "data_00000.done.json" in left and not [n for n in left if n.startswith("data_00001")]
        assert all(".tmp" not in n for n in left) and "data.manifest.json" not in left
    else:
        assert left == []
