"""Tokenize text into Megatron's indexed dataset format (.bin + .idx), the pretraining input.

    python -m falcon_h1.data.preprocess --input corpus.jsonl more/*.txt --output-prefix data/corpus \
        --tokenizer path/to/hf_tokenizer_dir
    python -m falcon_h1.data.preprocess --input docs/ --output-prefix data/corpus --train-bpe 8192

Inputs: .jsonl files (one document per line, text under --json-key), any other file (one
document per file), or directories (their files matching --glob, recursively). Each document is
tokenized and ends with the tokenizer's end-of-document token. The tokenizer is a Hugging Face
tokenizer directory, or a byte-level BPE trained on the inputs and saved next to the data
(`<output-prefix>_tokenizer/`). Outputs are written under temporary names and renamed at the end,
so an interrupted run never leaves a dataset that looks complete.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

EOD_TOKEN = "<|endoftext|>"


@dataclass(frozen=True)
class PreprocessResult:
    prefix: str
    tokenizer_dir: str
    documents: int
    tokens: int


def input_files(inputs: list[str], glob: str = "*") -> list[Path]:
    """The files named by `inputs` (directories expanded, sorted), failing on missing paths."""
    files = []
    for item in inputs:
        path = Path(item)
        if not path.exists():
            raise FileNotFoundError(f"input path does not exist: {path} (give existing .jsonl/.txt files or directories)")
        files += sorted(p for p in path.rglob(glob) if p.is_file()) if path.is_dir() else [path]
    if not files:
        raise ValueError(f"no input files found in {inputs} (directories are searched for {glob!r})")
    return files


def iter_jsonl(path: Path) -> Iterator[tuple[int, object]]:
    """(line number, parsed JSON) of each non-empty line; a bad line fails naming file:line."""
    with Path(path).open(encoding="utf-8") as f:
        for line_number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                yield line_number, json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(f"{path}:{line_number}: not valid JSON ({error})") from None


def iter_documents(files: list[Path], json_key: str = "text") -> Iterator[str]:
    for path in files:
        if path.suffix == ".jsonl":
            for line_number, record in iter_jsonl(path):
                if json_key not in record:
                    raise ValueError(f"{path}:{line_number}: no {json_key!r} field (set --json-key)")
                yield record[json_key]
        else:
            yield path.read_text(encoding="utf-8", errors="replace")


def train_bpe_tokenizer(files: list[Path], vocab_size: int, out_dir: Path, json_key: str = "text"):
    """Train a byte-level BPE on the documents and save it as a Hugging Face tokenizer directory."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOD_TOKEN],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train_from_iterator(iter_documents(files, json_key), trainer=trainer)
    # One special token, id 0, as in GPT-2: it ends each document, so it is also what precedes the
    # next one (bos) and what pads.
    wrapped = PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token=EOD_TOKEN, eos_token=EOD_TOKEN,
                                      pad_token=EOD_TOKEN)
    out_dir.mkdir(parents=True, exist_ok=True)
    wrapped.save_pretrained(out_dir)
    return wrapped


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


def preprocess(inputs: list[str], output_prefix: str, tokenizer_dir: str | None = None,
               train_bpe_vocab: int | None = None, json_key: str = "text", glob: str = "*",
               log_every: int = 1000) -> PreprocessResult:
    """Tokenize `inputs` into `<output_prefix>.bin/.idx`; returns what was written."""
    from megatron.core.datasets.indexed_dataset import DType, IndexedDatasetBuilder

    if (tokenizer_dir is None) == (train_bpe_vocab is None):
        raise ValueError("give exactly one of a tokenizer directory or a BPE vocabulary size to train")
    files = input_files(inputs, glob)
    prefix = Path(output_prefix)
    prefix.parent.mkdir(parents=True, exist_ok=True)
    if train_bpe_vocab is not None:
        tokenizer_dir = str(prefix.parent / f"{prefix.name}_tokenizer")
        train_bpe_tokenizer(files, train_bpe_vocab, Path(tokenizer_dir), json_key)
    tokenizer = load_tokenizer(tokenizer_dir)
    dtype = DType.optimal_dtype(len(tokenizer))
    eod = tokenizer.eos_token_id

    tmp_prefix = f"{prefix}.tmp{os.getpid()}"
    builder = IndexedDatasetBuilder(f"{tmp_prefix}.bin", dtype=dtype)
    documents = tokens = 0
    start = time.time()
    try:
        for text in iter_documents(files, json_key):
            ids = tokenizer(text, add_special_tokens=False)["input_ids"] + [eod]
            builder.add_document(np.asarray(ids, dtype=dtype), [len(ids)])
            documents += 1
            tokens += len(ids)
            if log_every and documents % log_every == 0:
                print(f"  {documents} documents, {tokens} tokens, "
                      f"{tokens / (time.time() - start):.0f} tokens/s", flush=True)
        if documents == 0:
            raise ValueError(f"the inputs {inputs} contain no documents")
        builder.finalize(f"{tmp_prefix}.idx")
        for suffix in (".bin", ".idx"):  # .idx last: its presence marks a complete dataset
            os.replace(f"{tmp_prefix}{suffix}", f"{prefix}{suffix}")
    finally:
        builder.data_file.close()
        for suffix in (".bin", ".idx"):
            if os.path.exists(f"{tmp_prefix}{suffix}"):
                os.remove(f"{tmp_prefix}{suffix}")
    return PreprocessResult(str(prefix), str(tokenizer_dir), documents, tokens)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m falcon_h1.data.preprocess", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", nargs="+", required=True, help=".jsonl / text files or directories")
    parser.add_argument("--output-prefix", required=True, help="writes PREFIX.bin and PREFIX.idx")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--tokenizer", help="Hugging Face tokenizer directory")
    source.add_argument("--train-bpe", type=int, metavar="VOCAB", help="train a byte-level BPE of this size")
    parser.add_argument("--json-key", default="text", help="field holding the text in .jsonl lines")
    parser.add_argument("--glob", default="*", help="file pattern inside input directories (default: all)")
    args = parser.parse_args(argv)
    try:
        result = preprocess(args.input, args.output_prefix, args.tokenizer, args.train_bpe, args.json_key, args.glob)
    except (FileNotFoundError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"wrote {result.prefix}.bin/.idx: {result.documents} documents, {result.tokens} tokens "
          f"(tokenizer: {result.tokenizer_dir})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
