"""The bundled default corpus: the running Python's standard-library sources.

Every machine that runs this project has them, so the default recipe trains without a download.
They are tokenized once with a byte-level BPE trained on them and cached under
`$FALCON_H1_CACHE` (default `~/.cache/falcon_h1`); concurrent ranks wait on a file lock and the
first one builds.
"""

import fcntl
import os
import random
import sys
import sysconfig
from pathlib import Path

from falcon_h1.data.preprocess import PreprocessResult, load_tokenizer, preprocess

DEFAULT_MAX_BYTES = 6_000_000
DEFAULT_VOCAB = 4096


def stdlib_sources(max_bytes: int) -> list[Path]:
    """The standard library's .py files (tests and vendored packages left out), in a fixed order,
    up to `max_bytes` in total."""
    root = Path(sysconfig.get_paths()["stdlib"])
    skip = {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__", "lib2to3", "ensurepip"}
    files, total = [], 0
    for path in sorted(root.rglob("*.py")):
        if skip.intersection(path.relative_to(root).parts):
            continue
        size = path.stat().st_size
        if total + size > max_bytes:
            break
        files.append(path)
        total += size
    return files


def default_corpus(cache_dir: str | os.PathLike | None = None, max_bytes: int = DEFAULT_MAX_BYTES,
                   vocab_size: int = DEFAULT_VOCAB) -> PreprocessResult:
    """Paths of the cached default corpus (.bin/.idx prefix and tokenizer), building it if needed."""
    cache = Path(cache_dir or os.environ.get("FALCON_H1_CACHE", Path.home() / ".cache" / "falcon_h1"))
    version = f"py{sys.version_info.major}{sys.version_info.minor}"
    directory = cache / f"stdlib_corpus_v2_{version}_{max_bytes}_{vocab_size}"
    directory.mkdir(parents=True, exist_ok=True)
    prefix = directory / "stdlib"
    with open(directory / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        tokenizer_dir = directory / "stdlib_tokenizer"
        if not (Path(f"{prefix}.idx").exists() and tokenizer_dir.is_dir()):
            print(f"preparing the default corpus (Python {sys.version.split()[0]} standard library) in {directory}",
                  flush=True)
            files = [str(p) for p in stdlib_sources(max_bytes)]
            # Megatron splits train/validation/test by document order: shuffle the files (with a
            # fixed seed) so the validation documents are a random sample, not the alphabetical tail.
            random.Random(0).shuffle(files)
            return preprocess(files, str(prefix), train_bpe_vocab=vocab_size, log_every=0)
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    dataset = IndexedDataset(str(prefix))
    return PreprocessResult(str(prefix), str(tokenizer_dir), len(dataset.document_indices) - 1,
                            int(dataset.sequence_lengths.sum()))


def default_tokenizer(cache_dir=None, **kwargs):
    return load_tokenizer(default_corpus(cache_dir, **kwargs).tokenizer_dir)


def default_corpus_data(seq_length: int = 128, micro_batch_size: int = 8, global_batch_size: int = 16,
                        split: str = "98,2,0", seed: int = 1234):
    """A PreTrainingDataModule over the bundled corpus (built on first use, on the machine that
    runs the job): the data of the tiny recipe and of `make run`."""
    from falcon_h1.data.pretraining import PreTrainingDataModule

    corpus = default_corpus()
    return PreTrainingDataModule(corpus.prefix, corpus.tokenizer_dir, seq_length=seq_length,
                                 micro_batch_size=micro_batch_size, global_batch_size=global_batch_size,
                                 split=split, seed=seed)
