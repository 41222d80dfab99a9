"""Batches of texts into token arrays, in this process (1 worker) or in N worker processes, in order.

Each document becomes its tokens (no special tokens added) followed by the end-of-document token.
Results come back in the order the batches went in, so the output does not depend on how many
workers tokenized it. Every worker, and this process when it is the only one, tokenizes on one
thread: Hugging Face fast tokenizers would otherwise spread a batch over Rust threads
(TOKENIZERS_PARALLELISM), and N workers would not be N times one.

Tokenizers built on the `tokenizers` library are sent to workers as their serialized backend
(importing `tokenizers` starts a worker in a fraction of a second; transformers takes seconds) and
called as transformers calls them, without the offsets it discards anyway (`encode_batch_fast`).
Other tokenizers are loaded from their directory in each worker and called through transformers.
"""

from __future__ import annotations

import itertools
import multiprocessing
import os
from collections import deque
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, TypeVar

import numpy as np

Tag = TypeVar("Tag")


@dataclass(frozen=True)
class EncoderSpec:
    """What a worker needs to tokenize as this process would (picklable)."""
    tokenizer_dir: str
    eod: int
    dtype: str  # numpy dtype of the token arrays
    backend_json: str | None  # the tokenizers backend, serialized; None: call the transformers tokenizer
    split_special_tokens: bool = False


def load_tokenizer(tokenizer_dir: str | Path):
    """A Hugging Face tokenizer from a local directory, with an end-of-document token."""
    from transformers import AutoTokenizer

    path = Path(tokenizer_dir)
    if not path.is_dir():
        raise FileNotFoundError(f"tokenizer directory does not exist: {path} (a Hugging Face tokenizer "
                                f"directory with tokenizer.json / tokenizer_config.json)")
    tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    if tokenizer.eos_token_id is None:
        raise ValueError(f"tokenizer in {path} has no eos_token; it is needed to mark document ends")
    return tokenizer


def encoder_spec(tokenizer, tokenizer_dir: str, dtype) -> EncoderSpec:
    from transformers.tokenization_utils_base import PreTrainedTokenizerBase
    from transformers.tokenization_utils_tokenizers import TokenizersBackend

    cls = type(tokenizer)
    # The backend is called directly only where transformers' own call reduces to backend.encode_batch:
    # a subclass that changes how text is encoded keeps its own call.
    direct = (isinstance(tokenizer, TokenizersBackend) and cls._encode_plus is TokenizersBackend._encode_plus
              and cls.__call__ is PreTrainedTokenizerBase.__call__)
    return EncoderSpec(str(tokenizer_dir), int(tokenizer.eos_token_id), np.dtype(dtype).name,
                       tokenizer.backend_tokenizer.to_str() if direct else None,
                       bool(getattr(tokenizer, "split_special_tokens", False)))


class Encoder:
    """texts -> (all tokens of the batch, one array; each document's length), every document ending
    with the end-of-document token."""

    def __init__(self, spec: EncoderSpec):
        self.eod, self.dtype = spec.eod, np.dtype(spec.dtype)
        if spec.backend_json is not None:
            from tokenizers import Tokenizer

            backend = Tokenizer.from_str(spec.backend_json)
            # What transformers' call sets before encoding (no truncation, no padding, special tokens).
            backend.no_truncation()
            backend.no_padding()
            backend.encode_special_tokens = spec.split_special_tokens
            encode_fast = getattr(backend, "encode_batch_fast", backend.encode_batch)
            self._ids = lambda texts: [e.ids for e in encode_fast(texts, add_special_tokens=False)]
        else:
            tokenizer = load_tokenizer(spec.tokenizer_dir)
            self._ids = lambda texts: tokenizer(texts, add_special_tokens=False)["input_ids"]

    def __call__(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        if not texts:
            return np.zeros(0, self.dtype), np.zeros(0, np.int64)
        ids = self._ids(texts)
        lengths = np.fromiter((len(d) + 1 for d in ids), np.int64, len(ids))
        eod = (self.eod,)
        tokens = np.fromiter(itertools.chain.from_iterable(itertools.chain(d, eod) for d in ids),
                             self.dtype, int(lengths.sum()))
        return tokens, lengths


def single_threaded_tokenizers() -> None:
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # read by the tokenizers library at each batch


_worker_encoder: Encoder | None = None
_worker_error: BaseException | None = None


def _start_worker(spec: EncoderSpec) -> None:
    global _worker_encoder, _worker_error
    single_threaded_tokenizers()
    try:
        _worker_encoder = Encoder(spec)
    except Exception as error:  # reported by the first batch: a failing initializer breaks the whole pool
        _worker_error = error


def _encode_in_worker(texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    if _worker_error is not None:
        raise _worker_error
    return _worker_encoder(texts)


def encode_in_order(items: Iterator[tuple[Tag, list[str]]], spec: EncoderSpec, workers: int = 1
                    ) -> Iterator[tuple[Tag, tuple[np.ndarray, np.ndarray]]]:
    """(tag, encoded texts) for each (tag, texts), in order; tags stay in this process."""
    if workers == 1:
        yield from _encode_here(items, spec)
        return
    # spawn: a fresh interpreter per worker, safe whatever threads this process runs (fork is not).
    pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"),
                               initializer=_start_worker, initargs=(spec,))
    pending = deque()
    try:
        for tag, texts in items:
            pending.append((tag, pool.submit(_encode_in_worker, texts)))
            # Two batches queued per worker keep each busy while this process reads and writes;
            # more would only hold memory.
            if len(pending) > 2 * workers:
                tag, future = pending.popleft()
                yield tag, future.result()
        while pending:
            tag, future = pending.popleft()
            yield tag, future.result()
    except BrokenProcessPool:
        raise ChildProcessError(f"a tokenizer worker process died: out of memory (try fewer --workers than "
                                f"{workers}), or a script calls this outside `if __name__ == \"__main__\":` "
                                f"(worker processes import the main module)") from None
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _encode_here(items, spec: EncoderSpec):
    previous = os.environ.get("TOKENIZERS_PARALLELISM")
    single_threaded_tokenizers()
    try:
        encoder = Encoder(spec)
        for tag, texts in items:
            yield tag, encoder(texts)
    finally:  # this process may go on tokenizing elsewhere (a training job building its corpus)
        if previous is None:
            os.environ.pop("TOKENIZERS_PARALLELISM", None)
        else:
            os.environ["TOKENIZERS_PARALLELISM"] = previous
