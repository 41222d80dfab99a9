"""Tokenize text into Megatron's indexed dataset format (.bin + .idx), the pretraining input.

    python -m falcon_h1.data.preprocess --input corpus.jsonl more/*.txt --output-prefix data/corpus \\
        --tokenizer path/to/hf_tokenizer_dir
    python -m falcon_h1.data.preprocess --input docs/ --output-prefix data/corpus --train-bpe 8192
    python -m falcon_h1.data.preprocess --input web/*.parquet --output-prefix data/web --tokenizer tok/ \\
        --workers 8 --shard-size 2GB

Inputs: Parquet and Arrow files (the text column: --text-key), directories saved with `datasets`'
save_to_disk, .jsonl / .jsonl.gz / .jsonl.zst (text under --text-key; --json-key is the same flag),
any other file (one document per file), or directories (their files matching --glob, recursively,
sorted). Each document is tokenized and ends with the tokenizer's end-of-document token. The
tokenizer is a Hugging Face tokenizer directory, or a byte-level BPE trained on the inputs and
saved next to the data (`<output-prefix>_tokenizer/`). --workers N tokenizes in N processes; the
output is byte-identical to one worker's (worker processes are spawned and import the main module:
a script calling preprocess(workers=N) keeps its work under `if __name__ == "__main__":`). Progress
lines (documents, tokens, tokens/s, ETA) come at most every --log-every seconds.

Without --shard-size the output is one dataset, PREFIX.bin/.idx. With it, the files (sorted as
above) are cut into inputs, each data file one input and each run of consecutive one-document text
files one input of up to 128 MiB (falcon_h1/data/readers.py), and input i gives the shards
PREFIX_{i:05d}_{j:04d}.bin/.idx (never spanning inputs: the shards depend only on the inputs and
the shard size), a completion record PREFIX_{i:05d}.done.json, and once every input has one,
PREFIX.manifest.json (its format: falcon_h1/data/shards.py). A re-run skips the inputs already
done. A task runner runs the BPE training once (--train-bpe VOCAB --tokenizer-only), then the tasks
(--task-index K --num-tasks N: the inputs i with i % N == K), then --write-manifest.

Outputs are written under temporary names and renamed when complete, so an interrupted or failed
run never leaves a dataset (or an input's shards) that looks complete.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Iterator

import numpy as np

# load_tokenizer is also imported from here (by inference, the datasets, the tests).
from falcon_h1.data.encoding import EncoderSpec, encode_in_order, encoder_spec, load_tokenizer
from falcon_h1.data.progress import Progress
# input_files and iter_jsonl are also imported from here (falcon_h1/inference/evaluate.py reads JSONL through it).
from falcon_h1.data.readers import Input, input_files, input_units, iter_documents, iter_jsonl, read_batches
from falcon_h1.data.shards import (IndexedWriter, ShardSize, manifest_path, parse_shard_size, read_record,
                                   remove_input_outputs, shard_prefix, write_manifest, write_record)

__all__ = ["EOD_TOKEN", "PreprocessResult", "input_files", "iter_jsonl", "load_tokenizer", "main", "preprocess",
           "prepare_tokenizer", "process_inputs", "run_task", "train_bpe_tokenizer", "write_dataset_manifest"]

EOD_TOKEN = "<|endoftext|>"


@dataclass(frozen=True)
class PreprocessResult:
    prefix: str
    tokenizer_dir: str
    documents: int
    tokens: int
    manifest: str | None = None  # sharded output: PREFIX.manifest.json, where written
    processed: tuple[int, ...] = ()  # sharded output: the inputs tokenized by this call...
    skipped: tuple[int, ...] = ()  # ...and those already complete


def train_bpe_tokenizer(units: list[Input], vocab_size: int, out_dir: Path, text_key: str = "text"):
    """Train a byte-level BPE on the documents and save it as a Hugging Face tokenizer directory."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOD_TOKEN],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train_from_iterator(iter_documents(units, text_key), trainer=trainer)
    # One special token, id 0, as in GPT-2: it ends each document, so it is also what precedes the
    # next one (bos) and what pads.
    wrapped = PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token=EOD_TOKEN, eos_token=EOD_TOKEN,
                                      pad_token=EOD_TOKEN)
    out_dir = Path(out_dir)
    tmp = out_dir.with_name(f"{out_dir.name}.tmp{os.getpid()}")
    wrapped.save_pretrained(tmp)
    if out_dir.exists():
        shutil.rmtree(out_dir)
    os.replace(tmp, out_dir)  # whole or absent: a directory that exists is a finished tokenizer
    return wrapped


def trained_tokenizer_dir(output_prefix: str | Path) -> Path:
    prefix = Path(output_prefix)
    return prefix.parent / f"{prefix.name}_tokenizer"


def prepare_tokenizer(inputs: list[str], output_prefix: str, vocab_size: int, text_key: str = "text",
                      glob: str = "*") -> str:
    """Train the byte-level BPE once, before any task: its directory (`<output-prefix>_tokenizer`)."""
    out_dir = trained_tokenizer_dir(output_prefix)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    train_bpe_tokenizer(input_units(input_files(inputs, glob)), vocab_size, out_dir, text_key)
    return str(out_dir)


def _encoder_spec(tokenizer_dir: str) -> EncoderSpec:
    from megatron.core.datasets.indexed_dataset import DType

    tokenizer = load_tokenizer(tokenizer_dir)
    return encoder_spec(tokenizer, tokenizer_dir, DType.optimal_dtype(len(tokenizer)))


def encoded_documents(units: list[Input], indices: list[int], text_key: str, spec: EncoderSpec, workers: int,
                      log_every: float) -> Iterator[tuple[int, np.ndarray | None]]:
    """(input index, a document's tokens) for every document of the inputs `indices`, in order, and
    (input index, None) after each input's last document."""
    def batches():
        for i in indices:
            for texts, position in read_batches(units[i], text_key):
                yield (i, position), texts
            yield (i, None), []  # the end of input i: an empty batch keeps its place in the order

    progress = Progress(sum(units[i].nbytes for i in indices), log_every)
    documents = tokens = done_before = 0
    for (i, position), (ids, lengths) in encode_in_order(batches(), spec, workers):
        if position is None:
            done_before += units[i].nbytes
            yield i, None
            continue
        ends = np.cumsum(lengths)
        for start, end in zip((ends - lengths).tolist(), ends.tolist()):
            yield i, ids[start:end]
        documents += len(lengths)
        tokens += int(ends[-1])
        progress.update(documents, tokens, done_before + position)


def _check_workers(workers: int) -> None:
    if workers < 1:
        raise ValueError(f"--workers {workers}: give at least 1 (the number of tokenizing processes)")


def preprocess(inputs: list[str], output_prefix: str, tokenizer_dir: str | None = None,
               train_bpe_vocab: int | None = None, text_key: str = "text", glob: str = "*",
               log_every: float = 5.0, workers: int = 1, shard_size: str | ShardSize | None = None
               ) -> PreprocessResult:
    """Tokenize `inputs` into `<output_prefix>.bin/.idx`, or with a shard size into shards and a
    manifest (skipping inputs an earlier run completed); returns what was written. log_every:
    seconds between progress lines (0: none)."""
    if (tokenizer_dir is None) == (train_bpe_vocab is None):
        raise ValueError("give exactly one of a tokenizer directory or a BPE vocabulary size to train")
    _check_workers(workers)
    if isinstance(shard_size, str):
        shard_size = parse_shard_size(shard_size)
    units = input_units(input_files(inputs, glob))
    prefix = Path(output_prefix)
    prefix.parent.mkdir(parents=True, exist_ok=True)
    if train_bpe_vocab is not None:
        tokenizer_dir = trained_tokenizer_dir(prefix)
        # A resumed sharded run keeps the tokenizer its finished inputs were made with.
        if shard_size is None or not (tokenizer_dir / "tokenizer_config.json").is_file():
            train_bpe_tokenizer(units, train_bpe_vocab, tokenizer_dir, text_key)
        else:
            print(f"using the tokenizer trained earlier: {tokenizer_dir} (delete it to train again)", flush=True)
        tokenizer_dir = str(tokenizer_dir)
    if shard_size is None:
        return _preprocess_one_dataset(units, inputs, prefix, tokenizer_dir, text_key, workers, log_every)
    processed, skipped = process_inputs(units, list(range(len(units))), prefix, tokenizer_dir, shard_size,
                                        text_key, workers, log_every)
    manifest = write_manifest(prefix, units)
    return PreprocessResult(str(prefix), tokenizer_dir, manifest["documents"], manifest["tokens"],
                            str(manifest_path(prefix)), tuple(processed), tuple(skipped))


def _preprocess_one_dataset(units, inputs, prefix: Path, tokenizer_dir: str, text_key: str, workers: int,
                            log_every: float) -> PreprocessResult:
    spec = _encoder_spec(tokenizer_dir)
    writer = IndexedWriter(lambda _: str(prefix), spec.dtype)
    try:
        for _, ids in encoded_documents(units, list(range(len(units))), text_key, spec, workers, log_every):
            if ids is not None:
                writer.add(ids)
        if writer.documents == 0:
            raise ValueError(f"the inputs {inputs} contain no documents")
        [written] = writer.commit()
    except BaseException:
        writer.discard()
        raise
    return PreprocessResult(str(prefix), tokenizer_dir, written["documents"], written["tokens"])


def process_inputs(units: list[Input], indices: list[int], output_prefix: str | Path, tokenizer_dir: str,
                   shard_size: ShardSize, text_key: str = "text", workers: int = 1, log_every: float = 5.0
                   ) -> tuple[list[int], list[int]]:
    """Tokenize the inputs `indices` into their shards and completion records, skipping those whose
    record an earlier run wrote: (processed, skipped) input indices. Writes no manifest."""
    prefix = Path(output_prefix)
    prefix.parent.mkdir(parents=True, exist_ok=True)
    todo, skipped = [], []
    for i in indices:
        done = read_record(prefix, i, units[i].files, tokenizer_dir, shard_size)
        (skipped if done else todo).append(i)
    if not todo:
        return todo, skipped
    manifest_path(prefix).unlink(missing_ok=True)  # it would describe shards about to change
    for i in todo:
        remove_input_outputs(prefix, i)
    spec = _encoder_spec(tokenizer_dir)
    writer = None
    try:
        for i, ids in encoded_documents(units, todo, text_key, spec, workers, log_every):
            if writer is None:
                writer = IndexedWriter(partial(shard_prefix, prefix, i), spec.dtype, shard_size)
            if ids is not None:
                writer.add(ids)
            else:  # input i is complete: its shards, then its record, last
                write_record(prefix, i, units[i].files, tokenizer_dir, shard_size, writer.commit())
                writer = None
    except BaseException:
        if writer is not None:
            writer.discard()
        raise
    return todo, skipped


def _records_total(prefix: Path, units: list[Input], indices) -> tuple[int, int]:
    records = [read_record(prefix, i, units[i].files) for i in indices]
    return sum(r["documents"] for r in records if r), sum(r["tokens"] for r in records if r)


def run_task(inputs: list[str], output_prefix: str, tokenizer_dir: str, shard_size: str | ShardSize,
             task_index: int, num_tasks: int, text_key: str = "text", glob: str = "*", workers: int = 1,
             log_every: float = 5.0) -> PreprocessResult:
    """One task of N: the inputs i with i % num_tasks == task_index, into shards and records (no manifest)."""
    if not 0 <= task_index < num_tasks:
        raise ValueError(f"--task-index {task_index} is outside 0..{num_tasks - 1} (--num-tasks {num_tasks})")
    _check_workers(workers)
    if isinstance(shard_size, str):
        shard_size = parse_shard_size(shard_size)
    if not Path(tokenizer_dir).is_dir():
        raise FileNotFoundError(f"tokenizer directory does not exist: {tokenizer_dir} (tasks need a tokenizer made "
                                f"before them: a Hugging Face tokenizer directory, or --train-bpe VOCAB "
                                f"--tokenizer-only run once)")
    units = input_units(input_files(inputs, glob))
    mine = list(range(task_index, len(units), num_tasks))
    prefix = Path(output_prefix)
    processed, skipped = process_inputs(units, mine, prefix, tokenizer_dir, shard_size, text_key, workers, log_every)
    documents, tokens = _records_total(prefix, units, mine)
    return PreprocessResult(str(prefix), tokenizer_dir, documents, tokens, None, tuple(processed), tuple(skipped))


def write_dataset_manifest(inputs: list[str], output_prefix: str, glob: str = "*") -> PreprocessResult:
    """PREFIX.manifest.json from the inputs' completion records; fails naming the inputs without one."""
    units = input_units(input_files(inputs, glob))
    manifest = write_manifest(output_prefix, units)
    return PreprocessResult(str(output_prefix), manifest["tokenizer"], manifest["documents"], manifest["tokens"],
                            str(manifest_path(output_prefix)))


def _inputs(n: list[int] | tuple[int, ...]) -> str:
    return f"{len(n)} input{'s' if len(n) != 1 else ''}"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m falcon_h1.data.preprocess", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", nargs="+", required=True,
                        help="data files (.parquet, .arrow, .jsonl[.gz|.zst], text) or directories")
    parser.add_argument("--output-prefix", required=True,
                        help="writes PREFIX.bin/.idx, or with --shard-size PREFIX_*.bin/.idx and PREFIX.manifest.json")
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--tokenizer", help="Hugging Face tokenizer directory")
    source.add_argument("--train-bpe", type=int, metavar="VOCAB", help="train a byte-level BPE of this size")
    parser.add_argument("--text-key", "--json-key", dest="text_key", default="text",
                        help="the text column (Parquet, Arrow) or field (.jsonl) (default: text)")
    parser.add_argument("--glob", default="*", help="file pattern inside input directories (default: all)")
    parser.add_argument("--workers", type=int, default=1, help="tokenizing processes (default: 1)")
    parser.add_argument("--shard-size", metavar="SIZE",
                        help="shards of this many tokens (50M, 1000000) or bytes (512MB, 2GB, 1GiB)")
    parser.add_argument("--task-index", type=int, metavar="K", help="with --num-tasks: only the inputs i %% N == K")
    parser.add_argument("--num-tasks", type=int, metavar="N", help="the number of tasks sharing the inputs")
    parser.add_argument("--write-manifest", action="store_true",
                        help="only write PREFIX.manifest.json from the inputs' completion records")
    parser.add_argument("--tokenizer-only", action="store_true",
                        help="with --train-bpe: train the tokenizer and stop (before the tasks)")
    parser.add_argument("--log-every", type=float, default=5.0, metavar="SECONDS",
                        help="seconds between progress lines, 0 for none (default: 5)")
    return parser


def _check_arguments(args) -> None:
    """Fails with one line on a combination of flags that cannot work, before any work."""
    if (args.task_index is None) != (args.num_tasks is None):
        raise ValueError("--task-index and --num-tasks go together (task K of N takes the inputs i % N == K)")
    tasks = args.task_index is not None
    if args.write_manifest and (tasks or args.train_bpe is not None or args.tokenizer_only):
        raise ValueError("--write-manifest runs alone, after the tasks: leave out --task-index, --train-bpe "
                         "and --tokenizer-only")
    if args.tokenizer_only and args.train_bpe is None:
        raise ValueError("--tokenizer-only trains a tokenizer: give --train-bpe VOCAB")
    if tasks and args.train_bpe is not None:
        raise ValueError(f"--train-bpe trains once, before the tasks: run it alone first (--train-bpe "
                         f"{args.train_bpe} --tokenizer-only), then give each task --tokenizer "
                         f"{trained_tokenizer_dir(args.output_prefix)}")
    if tasks and args.shard_size is None:
        raise ValueError("--num-tasks needs --shard-size: tasks write each input's shards")
    if not args.write_manifest and args.tokenizer is None and args.train_bpe is None:
        raise ValueError("give --tokenizer DIR (a Hugging Face tokenizer directory) or --train-bpe VOCAB")


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    try:
        _check_arguments(args)
        return _run(args)
    except (OSError, ValueError) as error:  # FileNotFoundError, ChildProcessError, bad data, bad flags
        print(f"error: {error}", file=sys.stderr)
        return 2


def _run(args) -> int:
    if args.write_manifest:
        result = write_dataset_manifest(args.input, args.output_prefix, args.glob)
        print(f"wrote {result.manifest}: {result.documents} documents, {result.tokens} tokens")
        return 0
    if args.tokenizer_only:
        print(f"trained {prepare_tokenizer(args.input, args.output_prefix, args.train_bpe, args.text_key, args.glob)}")
        return 0
    if args.task_index is not None:
        result = run_task(args.input, args.output_prefix, args.tokenizer, args.shard_size, args.task_index,
                          args.num_tasks, args.text_key, args.glob, args.workers, args.log_every)
        print(f"task {args.task_index} of {args.num_tasks}: processed {_inputs(result.processed)} "
              f"{list(result.processed)}, skipped {_inputs(result.skipped)} already complete; {result.documents} "
              f"documents, {result.tokens} tokens (run --write-manifest once every task is done)")
        return 0
    result = preprocess(args.input, args.output_prefix, args.tokenizer, args.train_bpe, args.text_key, args.glob,
                        args.log_every, args.workers, args.shard_size)
    if result.manifest is None:
        print(f"wrote {result.prefix}.bin/.idx: {result.documents} documents, {result.tokens} tokens "
              f"(tokenizer: {result.tokenizer_dir})")
    else:
        print(f"wrote {result.manifest}: {result.documents} documents, {result.tokens} tokens; processed "
              f"{_inputs(result.processed)}, skipped {_inputs(result.skipped)} already complete "
              f"(tokenizer: {result.tokenizer_dir})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
