"""Preprocessing text into Megatron indexed datasets, and the bundled default corpus."""

import json

import numpy as np
import pytest
from megatron.core.datasets.indexed_dataset import IndexedDataset

from falcon_h1.data.preprocess import load_tokenizer, main, preprocess

DOCS = ["def add(a, b):\n    return a + b\n", "The quick brown fox jumps over the lazy dog.",
        "import os\nprint(os.getcwd())\n", "ünïcödé text survives the round trip"]


@pytest.fixture
def corpus(tmp_path):
    jsonl = tmp_path / "docs.jsonl"
    jsonl.write_text("\n".join(json.dumps({"text": d}) for d in DOCS[:3]) + "\n")
    (tmp_path / "extra").mkdir()
    (tmp_path / "extra" / "one.txt").write_text(DOCS[3])
    return [str(jsonl), str(tmp_path / "extra")]


def test_documents_round_trip_through_the_indexed_dataset(tmp_path, corpus):
    result = preprocess(corpus, str(tmp_path / "out" / "data"), train_bpe_vocab=300, log_every=0)
    assert result.documents == 4
    dataset = IndexedDataset(result.prefix)
    tokenizer = load_tokenizer(result.tokenizer_dir)
    assert len(dataset) == 4 and int(dataset.sequence_lengths.sum()) == result.tokens
    for i, text in enumerate(DOCS):
        ids = dataset[i].tolist()
        assert ids[-1] == tokenizer.eos_token_id  # every document ends with the end-of-document token
        assert tokenizer.decode(ids[:-1]) == text


def test_an_existing_tokenizer_directory_is_used_as_is(tmp_path, corpus):
    first = preprocess(corpus, str(tmp_path / "a"), train_bpe_vocab=300, log_every=0)
    second = preprocess(corpus, str(tmp_path / "b"), tokenizer_dir=first.tokenizer_dir, log_every=0)
    a, b = IndexedDataset(first.prefix), IndexedDataset(second.prefix)  # keep the memory maps alive
    assert np.array_equal(a[2], b[2])


@pytest.mark.parametrize("make_input, message", [
    (lambda d: [str(d / "missing.jsonl")], "input path does not exist"),
    (lambda d: [str((d / "bad.jsonl").write_text('{"text": "ok"}\n{oops\n') and d / "bad.jsonl")], "bad.jsonl:2: not valid JSON"),
    (lambda d: [str((d / "key.jsonl").write_text('{"body": "x"}\n') and d / "key.jsonl")], "no 'text' field"),
])
def test_bad_input_fails_with_the_place_and_leaves_no_dataset(tmp_path, make_input, message):
    tokenizer = preprocess([str((tmp_path / "t.txt").write_text("some text") and tmp_path / "t.txt")],
                           str(tmp_path / "tok"), train_bpe_vocab=280, log_every=0).tokenizer_dir
    with pytest.raises((FileNotFoundError, ValueError), match=message):
        preprocess(make_input(tmp_path), str(tmp_path / "out"), tokenizer_dir=tokenizer, log_every=0)
    assert not list(tmp_path.glob("out*"))  # no partial .bin/.idx, no temporary files


def test_cli_reports_a_missing_tokenizer_directory(tmp_path, corpus, capsys):
    assert main(["--input", *corpus, "--output-prefix", str(tmp_path / "x"), "--tokenizer", str(tmp_path / "nope")]) == 2
    assert "tokenizer directory does not exist" in capsys.readouterr().err
