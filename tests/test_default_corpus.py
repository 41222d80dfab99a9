"""The bundled corpus, as built on this machine: the whole standard library of the running Python,
its generated near-copies dropped, validation held out as whole files across packages.

Checked on the datasets the main job reads: the validation split holds at least 30 files and 3% of
the tokens, from several packages, and no validation file shares more than half of its 8-grams of
tokens with any training file. The tiny preset's special token ids are the corpus tokenizer's.
"""

from pathlib import Path

import numpy as np
import pytest
from megatron.core.datasets.indexed_dataset import IndexedDataset

from falcon_h1.data.default_corpus import default_corpus, package_of, stdlib_sources
from falcon_h1.data.preprocess import load_tokenizer


@pytest.fixture(scope="module")
def corpus():
    return default_corpus()


@pytest.fixture(scope="module")
def splits(corpus):
    """{"train": [token ids of each file], "validation": [...]} without the end-of-document token."""
    out = {}
    for split, prefix in corpus.paths.items():
        dataset = IndexedDataset(prefix)
        out[split] = [np.array(dataset[i][:-1]) for i in range(len(dataset))]  # copies: the map closes
    return out


def ngrams(tokens: np.ndarray, n: int = 8) -> np.ndarray:
    """The distinct token n-grams of a document, as sorted 64-bit polynomial hashes."""
    if len(tokens) < n:
        return np.zeros(0, dtype=np.uint64)
    powers = np.array([pow(65_537, k, 2**64) for k in range(n)], dtype=np.uint64)
    windows = np.lib.stride_tricks.sliding_window_view(tokens.astype(np.uint64), n)
    return np.unique((windows * powers).sum(axis=1))


def test_built_once_then_read_from_the_cache(corpus, capfd):
    assert default_corpus() == corpus
    assert "preparing the default corpus" not in capfd.readouterr().out


def test_the_whole_standard_library_less_near_copies(corpus, splits):
    manifest = corpus.manifest()
    root = Path(manifest["stdlib"])
    every = {str(p.relative_to(root)) for p in stdlib_sources()}
    kept = set(manifest["train"]) | set(manifest["validation"])
    assert kept | set(manifest["dropped"]) == every and len(every) > 500
    assert {"__future__.py", "typing.py", "zoneinfo/_zoneinfo.py"} <= kept  # not an alphabetical prefix
    # One document per file, in the manifest's order.
    tokenizer = load_tokenizer(corpus.tokenizer_dir)
    for split in ("train", "validation"):
        assert len(splits[split]) == len(manifest[split])
        assert tokenizer.decode(splits[split][-1]) == (root / manifest[split][-1]).read_text(encoding="utf-8")
    # Generated codec modules: of the charmap tables at most one in five stays, of the CJK codecs one.
    texts = {name: (root / name).read_text(encoding="utf-8", errors="replace") for name in every}
    tables = [name for name, text in texts.items() if "decoding_table = (" in text]
    kept_tables = [name for name in tables if name not in manifest["dropped"]]
    assert len(tables) >= 50 and len(kept_tables) <= len(tables) / 5, kept_tables
    cjk = [name for name, text in texts.items() if "import _codecs_" in text]
    assert len(cjk) >= 10 and len([name for name in cjk if name not in manifest["dropped"]]) == 1
    # Each dropped file names the kept file it copies (None: a file of fewer than 8 words).
    assert all(original is None or original in kept for original in manifest["dropped"].values())


def test_validation_is_whole_files_across_packages_with_a_real_share_of_tokens(corpus, splits):
    validation_files = corpus.manifest()["validation"]
    assert len(validation_files) >= 30
    tokens = {split: sum(len(d) + 1 for d in docs) for split, docs in splits.items()}
    assert tokens["validation"] >= 0.03 * (tokens["train"] + tokens["validation"]), tokens
    assert len({package_of(name) for name in validation_files}) >= 8


def test_no_validation_file_shares_more_than_half_of_its_8grams_with_a_training_file(splits):
    train = [ngrams(document) for document in splits["train"]]
    grams = np.concatenate(train)
    owners = np.repeat(np.arange(len(train)), [len(g) for g in train])
    order = np.argsort(grams)
    grams, owners = grams[order], owners[order]
    for document in splits["validation"]:
        own = ngrams(document)
        assert len(own) > 0
        start, stop = np.searchsorted(grams, own, "left"), np.searchsorted(grams, own, "right")
        holders = np.concatenate([owners[a:b] for a, b in zip(start, stop)])
        shared = np.bincount(holders, minlength=len(train))  # per training file: 8-grams it shares
        assert shared.max() <= 0.5 * len(own)


def test_the_tiny_preset_has_the_tokenizers_special_token_ids(corpus):
    from falcon_h1.model.presets import preset_config

    tokenizer, tiny = load_tokenizer(corpus.tokenizer_dir), preset_config("tiny")
    assert (tiny.bos_token_id, tiny.eos_token_id, tiny.pad_token_id) == (
        tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id)
    assert tokenizer.convert_ids_to_tokens(tiny.eos_token_id) == "<|endoftext|>"
    assert len(tokenizer) == tiny.vocab_size
