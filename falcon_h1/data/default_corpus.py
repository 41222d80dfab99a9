"""The bundled default corpus: the running Python's standard-library sources.

Every machine that runs this project has them, so the default recipe trains without a download.
The corpus is the whole standard library (tests and third-party packages left out) with its
near-copies dropped: generated files such as the charmap codec tables (`encodings/cp*.py`,
`iso8859_*.py`, `mac_*.py`) or license-only `__init__.py` files share most of their word 8-grams
with a larger file. The validation split is whole files drawn across packages, none of which
shares more than a quarter of its 8-grams with any other file of the corpus. A byte-level BPE is
trained on the training files; both splits are tokenized with it into separate indexed datasets
and cached under `$FALCON_H1_CACHE` (default `~/.cache/falcon_h1`) with a manifest (corpus.json)
of which file went where. Concurrent ranks wait on a file lock and the first one builds.
"""

import fcntl
import json
import os
import random
import re
import sys
import sysconfig
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from falcon_h1.data.preprocess import load_tokenizer, preprocess

# Bump when the corpus' content or layout changes, so no older cache is reused.
CORPUS_VERSION = 3
DEFAULT_VOCAB = 4096
NGRAM = 8
NEAR_COPY_SHARE = 0.5  # a file sharing more of its 8-grams with a larger kept file is a near-copy
# A validation file shares at most this of its word 8-grams with any other file: a margin under
# the half allowed, as 8-grams of BPE tokens overlap more (up to 0.38 on Python 3.12's stdlib).
VALIDATION_MAX_SHARE = 0.25
VALIDATION_BYTES = 0.04  # validation takes files until it holds this share of the corpus...
MIN_VALIDATION_FILES = 30  # ...and at least this many files
LARGE_FILE = 0.01  # files above this share of the corpus stay in training (one would dominate validation)
_SKIPPED_DIRS = {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__"}
WORDS = re.compile(r"\w+|[^\w\s]")


@dataclass(frozen=True)
class DefaultCorpus:
    directory: str
    train_prefix: str
    validation_prefix: str
    tokenizer_dir: str

    @property
    def paths(self) -> dict[str, str]:
        """The splits as PreTrainingDataModule takes them."""
        return {"train": self.train_prefix, "validation": self.validation_prefix}

    def manifest(self) -> dict:
        """corpus.json: the files of each split, the dropped near-copies, bytes and tokens."""
        return json.loads((Path(self.directory) / "corpus.json").read_text())


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def stdlib_sources(root: Path | None = None) -> list[Path]:
    """Every .py file of the standard library, tests and installed packages left out, sorted."""
    root = root or stdlib_root()
    return [p for p in sorted(root.rglob("*.py")) if not _SKIPPED_DIRS.intersection(p.relative_to(root).parts)]


def package_of(relative: str) -> str:
    """The top-level package of a stdlib file ('email' for email/mime/text.py), '' for a top-level module."""
    parts = Path(relative).parts
    return parts[0] if len(parts) > 1 else ""


def word_ngrams(texts: list[str], n: int = NGRAM) -> list[np.ndarray]:
    """The distinct word n-grams of each text (words and punctuation marks), as sorted 64-bit hashes."""
    vocabulary: dict[str, int] = {}
    return [ngram_hashes(text, vocabulary, n) for text in texts]


def ngram_hashes(text: str, vocabulary: dict[str, int], n: int = NGRAM) -> np.ndarray:
    """The distinct word n-grams of `text` as sorted 64-bit hashes; words get ids from `vocabulary`
    (extended as new words come), so texts hashed with one vocabulary hash an n-gram alike."""
    powers = np.array([pow(1_000_003, k, 2**64) for k in range(n)], dtype=np.uint64)
    ids = np.array([vocabulary.setdefault(w, len(vocabulary)) for w in WORDS.findall(text)], dtype=np.uint64)
    if len(ids) < n:
        return np.zeros(0, dtype=np.uint64)
    windows = np.lib.stride_tricks.sliding_window_view(ids, n)
    return np.unique((windows * powers).sum(axis=1))  # wraps modulo 2**64: a polynomial hash


def shared_ngrams(ngrams: list[np.ndarray]) -> np.ndarray:
    """[files, files] matrix: how many distinct n-grams file i shares with file j (0 on the diagonal)."""
    hashes = np.concatenate(ngrams)
    owners = np.repeat(np.arange(len(ngrams)), [len(g) for g in ngrams])
    order = np.argsort(hashes, kind="stable")
    hashes, owners = hashes[order], owners[order]
    shared = np.zeros((len(ngrams), len(ngrams)), dtype=np.int64)
    for i, grams in enumerate(ngrams):
        start, stop = np.searchsorted(hashes, grams, "left"), np.searchsorted(hashes, grams, "right")
        counts = stop - start
        start, counts = start[counts > 1], counts[counts > 1]  # only n-grams some other file has too
        offsets = np.arange(counts.sum()) - np.repeat(np.cumsum(counts) - counts, counts)
        shared[i] = np.bincount(owners[np.repeat(start, counts) + offsets], minlength=len(ngrams))
        shared[i, i] = 0
    return shared


def drop_near_copies(sizes: np.ndarray, shared: np.ndarray) -> dict[int, int | None]:
    """{dropped file: the kept file it copies (None: no 8-gram at all)}. Files are kept largest
    (most 8-grams) first; a file sharing more than NEAR_COPY_SHARE of its 8-grams with a kept one
    is a near-copy. Kept files then share at most that much with each other, both ways."""
    kept, dropped = [], {}
    for i in sorted(range(len(sizes)), key=lambda i: -sizes[i]):
        if sizes[i] == 0:
            dropped[i] = None
            continue
        copied = [j for j in kept if shared[i, j] > NEAR_COPY_SHARE * sizes[i]]
        if copied:
            dropped[i] = max(copied, key=lambda j: shared[i, j])
        else:
            kept.append(i)
    return dropped


def choose_validation(files: list[str], nbytes: list[int], overlap: list[float], seed: int = 0) -> list[int]:
    """Indices of whole files held out for validation: round-robin over the packages (in a seeded
    random order, each package giving at most a quarter of its files) until validation holds
    VALIDATION_BYTES of the corpus and MIN_VALIDATION_FILES files. Candidates share at most
    VALIDATION_MAX_SHARE of their 8-grams with any other file and are not among the largest."""
    rng = random.Random(seed)
    total = sum(nbytes)
    packages: dict[str, list[int]] = {}
    for i, name in enumerate(files):
        packages.setdefault(package_of(name), []).append(i)
    pools, caps = {}, {}
    for package, members in packages.items():
        pools[package] = [i for i in members if overlap[i] <= VALIDATION_MAX_SHARE and nbytes[i] <= LARGE_FILE * total]
        rng.shuffle(pools[package])
        caps[package] = len(members) // 4
    order = sorted(pools)
    rng.shuffle(order)
    chosen, held = [], 0
    while held < VALIDATION_BYTES * total or len(chosen) < MIN_VALIDATION_FILES:
        progressed = False
        for package in order:
            if pools[package] and caps[package] > 0:
                i = pools[package].pop()
                caps[package] -= 1
                chosen.append(i)
                held += nbytes[i]
                progressed = True
        if not progressed:
            raise ValueError(f"the standard library in {stdlib_root()} has too few distinct files for a validation "
                             f"split of {MIN_VALIDATION_FILES} files and {VALIDATION_BYTES:.0%} of the bytes")
    return sorted(chosen)


def split_stdlib(root: Path | None = None) -> dict:
    """The corpus plan: {"train": [...], "validation": [...], "dropped": {file: copied file}} of
    stdlib paths relative to `root`, each list sorted."""
    root = root or stdlib_root()
    paths = stdlib_sources(root)
    names = [str(p.relative_to(root)) for p in paths]
    texts = [p.read_text(encoding="utf-8", errors="replace") for p in paths]
    ngrams = word_ngrams(texts)
    sizes = np.array([len(g) for g in ngrams])
    shared = shared_ngrams(ngrams)
    dropped = drop_near_copies(sizes, shared)
    kept = [i for i in range(len(paths)) if i not in dropped]
    among_kept = shared[np.ix_(kept, kept)]
    # Both ways: the share of this file's 8-grams another file has, and of the other's this one has.
    overlap = np.maximum(among_kept / sizes[kept][:, None], among_kept / sizes[kept][None, :]).max(axis=1)
    validation = set(choose_validation([names[i] for i in kept], [len(texts[i].encode()) for i in kept],
                                       overlap.tolist()))
    return {"train": [names[i] for k, i in enumerate(kept) if k not in validation],
            "validation": [names[i] for k, i in enumerate(kept) if k in validation],
            "dropped": {names[i]: None if j is None else names[j] for i, j in sorted(dropped.items())}}


def cache_directory(cache_dir: str | os.PathLike | None, vocab_size: int) -> Path:
    cache = Path(cache_dir or os.environ.get("FALCON_H1_CACHE", Path.home() / ".cache" / "falcon_h1"))
    version = f"py{sys.version_info.major}{sys.version_info.minor}"
    return cache / f"stdlib_corpus_v{CORPUS_VERSION}_{version}_{vocab_size}"


def default_corpus(cache_dir: str | os.PathLike | None = None, vocab_size: int = DEFAULT_VOCAB) -> DefaultCorpus:
    """The cached default corpus (train and validation datasets, tokenizer), building it if needed."""
    directory = cache_directory(cache_dir, vocab_size)
    directory.mkdir(parents=True, exist_ok=True)
    corpus = DefaultCorpus(str(directory), str(directory / "train"), str(directory / "validation"),
                           str(directory / "train_tokenizer"))  # preprocess names it after the training data
    with open(directory / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (directory / "corpus.json").is_file():  # written last: its presence marks a complete build
            build(corpus, vocab_size)
    return corpus


def build(corpus: DefaultCorpus, vocab_size: int) -> None:
    root = stdlib_root()
    print(f"preparing the default corpus (Python {sys.version.split()[0]} standard library) in {corpus.directory}",
          flush=True)
    start = time.time()
    plan = split_stdlib(root)
    train = preprocess([str(root / f) for f in plan["train"]], corpus.train_prefix, train_bpe_vocab=vocab_size,
                       log_every=0)
    validation = preprocess([str(root / f) for f in plan["validation"]], corpus.validation_prefix,
                            tokenizer_dir=train.tokenizer_dir, log_every=0)
    nbytes = {split: sum((root / f).stat().st_size for f in plan[split]) for split in ("train", "validation")}
    manifest = {"python": sys.version.split()[0], "stdlib": str(root), **plan, "bytes": nbytes,
                "tokens": {"train": train.tokens, "validation": validation.tokens}}
    tmp = Path(corpus.directory) / f"corpus.json.tmp{os.getpid()}"
    tmp.write_text(json.dumps(manifest, indent=1) + "\n")
    os.replace(tmp, Path(corpus.directory) / "corpus.json")
    share = validation.tokens / (train.tokens + validation.tokens)
    print(f"default corpus: {train.documents} training files ({nbytes['train'] / 1e6:.1f} MB, {train.tokens} tokens), "
          f"{validation.documents} validation files ({share:.1%} of the tokens), {len(plan['dropped'])} near-copies "
          f"dropped; built in {time.time() - start:.0f} s", flush=True)


def default_tokenizer(cache_dir=None, **kwargs):
    return load_tokenizer(default_corpus(cache_dir, **kwargs).tokenizer_dir)


def default_corpus_data(seq_length: int, micro_batch_size: int, global_batch_size: int,
                        seed: int = 1234):
    """A PreTrainingDataModule over the bundled corpus' train and validation files (built on first
    use, on the machine that runs the job): the data of the tiny recipe and of `make run`."""
    from falcon_h1.data.pretraining import PreTrainingDataModule

    corpus = default_corpus()
    return PreTrainingDataModule(corpus.paths, corpus.tokenizer_dir, seq_length=seq_length,
                                 micro_batch_size=micro_batch_size, global_batch_size=global_batch_size, seed=seed)
