"""Sharded output: each input's documents in shards, a completion record per input, a manifest.

Input number i (of the sorted input list, cut into inputs by falcon_h1/data/readers.py) gives the
Megatron indexed datasets `PREFIX_{i:05d}_{j:04d}.bin/.idx`, j = 0, 1, ... Each shard is closed
at the first document boundary at which it holds at least the shard size (tokens, or bytes of its
.bin), so the shards never span inputs and depend only on the inputs and the shard size, not on
how many tasks or workers made them. An input's shards keep temporary names until the whole input
is tokenized; then they are renamed (.bin, then .idx) and the input's completion record is written,
last and atomically:

`PREFIX_{i:05d}.done.json`:
    {"format": "falcon-h1-input-record", "version": 1, "input": i,
     "files": {"first": absolute path, "last": absolute path, "count": n,
               "sha256": digest of every file's absolute path and size},
     "tokenizer": absolute path of the tokenizer directory,
     "shard_size": {"tokens": N} or {"bytes": N},
     "shards": [{"prefix": "PREFIXNAME_00003_0000", "documents": D, "tokens": T}, ...],
     "documents": D, "tokens": T}

A run skips the inputs whose record exists and whose shards are all there (resuming); a record
for other files (paths or sizes), another tokenizer or another shard size is an error, never
silently mixed. "files" is a digest, not a list: an input may be a run of a million small text files.

`PREFIX.manifest.json`, written after all records exist (atomically, so it exists only complete):
    {"format": "falcon-h1-indexed-shards",
     "version": 1,
     "tokenizer": "<tokenizer directory>",
     "shard_size": {"tokens": N} or {"bytes": N},
     "shards": [{"prefix": "corpus_00000_0000", "input": 0, "documents": D, "tokens": T}, ...],
     "inputs": [{"files": {"first": "/abs/a.parquet", "last": "/abs/a.parquet", "count": 1, "sha256": "..."},
                 "documents": D, "tokens": T, "shards": S}, ...],
     "documents": total D, "tokens": total T}

Paths in the manifest are relative to the manifest's directory: a shard's data is
`<manifest dir>/<prefix>.bin/.idx`, and the tokenizer is `<manifest dir>/<tokenizer>` (the
tokenizer stays an absolute path when it is not under the manifest's directory; joining the
directory with an absolute path gives that path). Shards are listed in order: by input, then by j.
Processing an input deletes an existing manifest first, so a manifest never describes shards that
have changed since.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

MANIFEST_FORMAT = "falcon-h1-indexed-shards"
RECORD_FORMAT = "falcon-h1-input-record"
VERSION = 1

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(I?B)?\s*$", re.IGNORECASE)
_DECIMAL = {"": 1, "K": 10**3, "M": 10**6, "G": 10**9, "T": 10**12}
_BINARY = {"K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}


@dataclass(frozen=True)
class ShardSize:
    value: int
    unit: str  # "tokens" or "bytes" (of the shard's .bin)

    def reached(self, tokens: int, itemsize: int) -> bool:
        return (tokens if self.unit == "tokens" else tokens * itemsize) >= self.value

    def to_json(self) -> dict:
        return {self.unit: self.value}


def parse_shard_size(text: str) -> ShardSize:
    """'50M' / '1000000' tokens, '2GB' / '512MB' (powers of 1000) or '1GiB' (powers of 1024) bytes."""
    match = _SIZE.match(str(text))
    # A bare B (5B) would read as bytes to some and billions of tokens to others: refused.
    if not match or (match.group(3) and not match.group(2)):
        raise ValueError(f"--shard-size {text!r} is not a size: give tokens (1000000, 50M, 2G) or bytes of the "
                         f".bin (512MB, 2GB, 1GiB)")
    number, prefix, suffix = float(match.group(1)), match.group(2).upper(), (match.group(3) or "").upper()
    scale = _BINARY[prefix] if suffix == "IB" else _DECIMAL[prefix]
    value = round(number * scale)
    if value < 1:
        raise ValueError(f"--shard-size {text!r} is below one token or byte: give a positive size")
    return ShardSize(value, "bytes" if suffix else "tokens")


def shard_prefix(output_prefix: str | Path, input_index: int, shard_index: int) -> str:
    return f"{output_prefix}_{input_index:05d}_{shard_index:04d}"


def record_path(output_prefix: str | Path, input_index: int) -> Path:
    return Path(f"{output_prefix}_{input_index:05d}.done.json")


def manifest_path(output_prefix: str | Path) -> Path:
    return Path(f"{output_prefix}.manifest.json")


def write_json_atomically(path: Path, content: dict) -> None:
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    tmp.write_text(json.dumps(content, indent=1) + "\n")
    os.replace(tmp, path)


class IndexedWriter:
    """Documents into indexed datasets named `final_prefix(j)`, j = 0, 1, ...: a new one each time the
    current one reaches `limit` (one only without a limit). Everything is written under temporary
    names until commit(); discard() deletes it."""

    def __init__(self, final_prefix: Callable[[int], str], dtype, limit: ShardSize | None = None):
        self.final_prefix, self.dtype, self.limit = final_prefix, np.dtype(dtype), limit
        self.shards: list[dict] = []  # closed shards: final prefix, temporary prefix, documents, tokens
        self._builder = None
        self._documents = self._tokens = 0

    @property
    def documents(self) -> int:
        return sum(s["documents"] for s in self.shards) + (self._documents if self._builder is not None else 0)

    def add(self, ids: np.ndarray) -> None:
        """One document."""
        if self._builder is None:
            from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

            final = self.final_prefix(len(self.shards))
            self._open = {"final": final, "tmp": f"{final}.tmp{os.getpid()}"}
            # Megatron names dtypes by their scalar type (np.uint16), not a dtype instance.
            self._builder = IndexedDatasetBuilder(f"{self._open['tmp']}.bin", dtype=self.dtype.type)
            self._documents = self._tokens = 0
        self._builder.add_document(ids, [len(ids)])
        self._documents += 1
        self._tokens += len(ids)
        if self.limit is not None and self.limit.reached(self._tokens, self.dtype.itemsize):
            self._close()

    def _close(self) -> None:
        self._builder.finalize(f"{self._open['tmp']}.idx")
        self._builder = None
        self.shards.append({**self._open, "documents": self._documents, "tokens": self._tokens})

    def commit(self) -> list[dict]:
        """Renames every shard to its final name; returns [{"prefix", "documents", "tokens"}] in order."""
        if self._builder is not None:
            self._close()
        for shard in self.shards:
            for suffix in (".bin", ".idx"):  # .idx last: its presence marks a complete dataset
                os.replace(f"{shard['tmp']}{suffix}", f"{shard['final']}{suffix}")
        return [{"prefix": s["final"], "documents": s["documents"], "tokens": s["tokens"]} for s in self.shards]

    def discard(self) -> None:
        if self._builder is not None:
            self._builder.data_file.close()
            self.shards.append({**self._open, "documents": 0, "tokens": 0})
            self._builder = None
        for shard in self.shards:
            for suffix in (".bin", ".idx"):
                Path(f"{shard['tmp']}{suffix}").unlink(missing_ok=True)
        self.shards = []


def remove_input_outputs(output_prefix: str | Path, input_index: int) -> None:
    """Deletes input i's record and shards (finished or temporary) left by an earlier run, before it is redone."""
    prefix = Path(output_prefix)
    record_path(prefix, input_index).unlink(missing_ok=True)
    pattern = re.compile(re.escape(f"{prefix.name}_{input_index:05d}_") + r"\d{4}(\.tmp\d+)?\.(bin|idx)$")
    for path in prefix.parent.glob(f"{prefix.name}_{input_index:05d}_*"):
        if pattern.fullmatch(path.name):
            path.unlink(missing_ok=True)


def files_identity(files) -> dict:
    """What a record says of its input's files: enough to tell other files (or changed sizes) apart,
    and small also for a run of a million text files."""
    paths = [Path(f).resolve() for f in files]
    digest = hashlib.sha256()
    for path in paths:
        digest.update(f"{path}\0{path.stat().st_size}\n".encode())
    return {"first": str(paths[0]), "last": str(paths[-1]), "count": len(paths), "sha256": digest.hexdigest()}


def _describe(identity: dict) -> str:
    if identity["count"] == 1:
        return identity["first"]
    return f"{identity['first']} .. {identity['last']} ({identity['count']} files)"


def write_record(output_prefix: str | Path, input_index: int, files, tokenizer_dir: str, shard_size: ShardSize,
                 shards: list[dict]) -> dict:
    record = {"format": RECORD_FORMAT, "version": VERSION, "input": input_index,
              "files": files_identity(files), "tokenizer": str(Path(tokenizer_dir).resolve()),
              "shard_size": shard_size.to_json(),
              "shards": [{**s, "prefix": Path(s["prefix"]).name} for s in shards],
              "documents": sum(s["documents"] for s in shards), "tokens": sum(s["tokens"] for s in shards)}
    write_json_atomically(record_path(output_prefix, input_index), record)
    return record


def read_record(output_prefix: str | Path, input_index: int, files, tokenizer_dir: str | None = None,
                shard_size: ShardSize | None = None) -> dict | None:
    """Input i's completion record; None when it is absent or a shard it lists is gone. A record of
    other files, tokenizer or shard size fails: the outputs would mix two datasets."""
    path = record_path(output_prefix, input_index)
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text())
        listed = record["files"], record["tokenizer"], record["shard_size"], record["shards"]
        _describe(listed[0])
    except (ValueError, KeyError, TypeError):
        return None  # not a record this code wrote whole: the input is redone
    fix = f"use another --output-prefix, or delete {Path(output_prefix).name}_* to start over"
    current = files_identity(files)
    if listed[0] != current:
        raise ValueError(f"{path} was written for input {input_index} = {_describe(listed[0])}, but input "
                         f"{input_index} is now {_describe(current)} (other paths or sizes): {fix}")
    if tokenizer_dir is not None and listed[1] != str(Path(tokenizer_dir).resolve()):
        raise ValueError(f"{path} was written with the tokenizer {listed[1]}, not "
                         f"{Path(tokenizer_dir).resolve()}: {fix}")
    if shard_size is not None and listed[2] != shard_size.to_json():
        raise ValueError(f"{path} was written with shard size {listed[2]}, not {shard_size.to_json()}: {fix}")
    directory = Path(output_prefix).parent
    if not all((directory / f"{s['prefix']}{suffix}").is_file() for s in listed[3] for suffix in (".bin", ".idx")):
        return None
    return record


def build_manifest(output_prefix: str | Path, units) -> dict:
    """The manifest of all inputs' records; fails naming the inputs that have none."""
    records = [read_record(output_prefix, i, unit.files) for i, unit in enumerate(units)]
    missing = [i for i, record in enumerate(records) if record is None]
    if missing:
        named = ", ".join(f"{i} ({units[i]})" for i in missing[:5])
        named += f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        raise ValueError(f"no completion record ({record_path(output_prefix, missing[0]).name}, ...), or one whose "
                         f"shards are gone, for input {named}: run the tasks that process them (input i is task "
                         f"i % --num-tasks), then --write-manifest again")
    for field in ("tokenizer", "shard_size"):
        values = {json.dumps(r[field]) for r in records}
        if len(values) > 1:
            raise ValueError(f"the records of {output_prefix} disagree on the {field} ({', '.join(sorted(values))}): "
                             f"redo the inputs with one {field} (delete the records of the others)")
    if not any(r["shards"] for r in records):
        raise ValueError(f"the inputs of {output_prefix} contain no documents: give inputs with text")
    directory = Path(output_prefix).parent.resolve()
    tokenizer = Path(records[0]["tokenizer"])
    if tokenizer.is_relative_to(directory):
        tokenizer = tokenizer.relative_to(directory)
    return {"format": MANIFEST_FORMAT, "version": VERSION, "tokenizer": str(tokenizer),
            "shard_size": records[0]["shard_size"],
            "shards": [{"prefix": s["prefix"], "input": i, "documents": s["documents"], "tokens": s["tokens"]}
                       for i, r in enumerate(records) for s in r["shards"]],
            "inputs": [{"files": r["files"], "documents": r["documents"], "tokens": r["tokens"],
                        "shards": len(r["shards"])} for r in records],
            "documents": sum(r["documents"] for r in records), "tokens": sum(r["tokens"] for r in records)}


def write_manifest(output_prefix: str | Path, units) -> dict:
    manifest = build_manifest(output_prefix, units)
    write_json_atomically(manifest_path(output_prefix), manifest)
    return manifest
