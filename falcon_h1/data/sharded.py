"""Sharded pretraining datasets: which shards a dataset path names, checked before any work.

`python -m falcon_h1.data.preprocess ... --output-prefix data/web --shard-size 50M` writes shards
`data/web_{i:05d}_{j:04d}.bin/.idx` (Megatron indexed datasets: i numbers the input, j the shard
of that input), a completion record per input and, last, the manifest `data/web.manifest.json`
(falcon_h1/data/shards.py writes it and documents it):

    {"format": MANIFEST_FORMAT, "version": 1, "tokenizer": DIR,
     "shards": [{"prefix": "web_00000_0000", "documents": N, "tokens": T, ...}, ...], ...}

with the shard prefixes and the tokenizer relative to the manifest's directory (an absolute
tokenizer path stays one), shards in reading order. Wherever a dataset prefix is accepted, a
sharded dataset is accepted as one dataset, named by
  - its manifest (`data/web.manifest.json`),
  - its prefix (`data/web`, when data/web.manifest.json exists and data/web.bin/.idx do not),
  - its directory: the directory's manifest if it holds exactly one (several: an error); without
    a manifest, every `.idx`/`.bin` pair in it, in name order (refused where preprocess has left
    unfinished shards).
falcon_h1.data.sharded_dataset reads the shards as one indexed dataset.
"""

from __future__ import annotations

import json
import re
import struct
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

# The writer's names (preprocess writes through falcon_h1.data.shards): one format, one place.
from falcon_h1.data.shards import MANIFEST_FORMAT, manifest_path
from falcon_h1.data.shards import VERSION as MANIFEST_VERSION

MANIFEST_SUFFIX = manifest_path("").name  # ".manifest.json"
# What preprocess leaves next to shards it has not finished: temporaries (PREFIX.tmp<pid>.bin/.idx)
# and, until every input is done and the manifest written, per-input records (PREFIX_00003.done.json).
_TEMPORARY = re.compile(r"\.tmp\d+$")
_RECORD = "*.done.json"
_MAKE_SHARDS = "`python -m falcon_h1.data.preprocess ... --shard-size SIZE`"


@dataclass(frozen=True)
class Shards:
    """A sharded dataset: `path` (its manifest, or its directory), its shards' prefixes in reading
    order, and the tokenizer directory its manifest names (None without a manifest)."""

    path: str
    prefixes: tuple[str, ...]
    tokenizer: str | None


def _is_prefix(path: str) -> bool:
    """An indexed dataset's prefix (or half of one: check_dataset_prefixes names the missing file).
    It wins over a directory of the same name, which Megatron's index cache makes (PREFIX/cache/)."""
    return Path(f"{path}.bin").exists() or Path(f"{path}.idx").exists()


def dataset_path(path: str) -> str:
    """The path the data module gives Megatron for `path`: an indexed dataset's prefix as it is, a
    sharded dataset's manifest (also for its prefix, or a directory holding just that manifest), or a
    directory of shards without a manifest. One dataset named two ways is one path, so one index cache."""
    path = str(path)
    if _is_prefix(path) or path.endswith(".json"):
        return path
    if manifest_path(path).is_file():
        return str(manifest_path(path))
    if Path(path).is_dir():
        manifests = sorted(Path(path).glob(f"*{MANIFEST_SUFFIX}"))
        if len(manifests) > 1:
            # Their shards side by side are several datasets: reading them all would mix them silently.
            raise ValueError(f"directory {path!r} holds {len(manifests)} shard manifests "
                             f"({', '.join(m.name for m in manifests)}): give the one to read, e.g. {manifests[0]}")
        if manifests:
            return str(manifests[0])
    return path


def is_sharded(path: str) -> bool:
    """Whether `path` (as dataset_path gives it) is a sharded dataset rather than a prefix."""
    return not _is_prefix(path) and (str(path).endswith(".json") or Path(path).is_dir())


def cache_prefix(path: str) -> str:
    """Where Megatron's index cache of `path` goes by default, `<this>/cache/`: next to the data, as
    for a prefix (data/web.manifest.json -> data/web; a directory -> the directory)."""
    path = str(path)
    for suffix in (MANIFEST_SUFFIX, ".json"):
        if path.endswith(suffix):
            return path[:-len(suffix)]
    return path


def sequence_count(prefix: str) -> int:
    """Sequences (documents, as preprocess writes them) of an indexed dataset, from its .idx header:
    magic (9 bytes), version (8), dtype code (1), then the sequence count (8)."""
    with open(f"{prefix}.idx", "rb") as index:
        index.seek(18)
        return struct.unpack("<Q", index.read(8))[0]


def read_shards(path: str) -> Shards:
    """The shards of a sharded dataset (a manifest or a directory), every one present; a bad
    manifest or a missing shard fails in one line naming it."""
    if str(path).endswith(".json"):
        return _read_manifest(Path(path))
    return _read_directory(Path(path))


def _read_manifest(manifest: Path) -> Shards:
    if not manifest.is_file():
        raise FileNotFoundError(f"shard manifest {str(manifest)!r} does not exist: give the manifest {_MAKE_SHARDS} "
                                "wrote (PREFIX.manifest.json), its prefix or its directory")
    try:
        content = json.loads(manifest.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"shard manifest {str(manifest)!r} is not valid JSON ({error}): "
                         f"re-run {_MAKE_SHARDS}") from None
    found = content.get("format") if isinstance(content, dict) else None
    if found != MANIFEST_FORMAT:
        raise ValueError(f"{str(manifest)!r} is not a falcon-h1 shard manifest (format {found!r}, expected "
                         f"{MANIFEST_FORMAT!r}): give a manifest written by {_MAKE_SHARDS}")
    if content.get("version") != MANIFEST_VERSION:
        raise ValueError(f"shard manifest {str(manifest)!r} has version {content.get('version')!r}; this falcon-h1 "
                         f"reads version {MANIFEST_VERSION}: re-run {_MAKE_SHARDS} with this falcon-h1")
    entries = content.get("shards")
    if not isinstance(entries, list) or not entries or not all(
            isinstance(e, dict) and isinstance(e.get("prefix"), str) for e in entries):
        raise ValueError(f"shard manifest {str(manifest)!r} lists no shards (\"shards\": [{{\"prefix\": ...}}, ...]): "
                         f"re-run {_MAKE_SHARDS}")
    prefixes = tuple(str(manifest.parent / e["prefix"]) for e in entries)
    missing = [f"{p}{ext}" for p in prefixes for ext in (".bin", ".idx") if not Path(f"{p}{ext}").is_file()]
    if missing:
        raise FileNotFoundError(f"shard manifest {str(manifest)!r} lists a missing shard: {missing[0]} does not exist "
                                f"({len(missing)} shard files missing): restore it, or re-run {_MAKE_SHARDS}")
    for entry, prefix in zip(entries, prefixes):
        if "documents" in entry and sequence_count(prefix) != entry["documents"]:
            raise ValueError(f"shard {prefix!r} holds {sequence_count(prefix)} documents, its manifest "
                             f"{str(manifest)!r} says {entry['documents']}: the shard was rewritten after the "
                             f"manifest; re-run {_MAKE_SHARDS}")
    tokenizer = content.get("tokenizer")
    return Shards(str(manifest), prefixes, str(tokenizer) if tokenizer else None)


def _read_directory(directory: Path) -> Shards:
    indexes = {p.name[:-len(".idx")] for p in directory.glob("*.idx") if p.is_file()}
    data = {p.name[:-len(".bin")] for p in directory.glob("*.bin") if p.is_file()}
    if not indexes and not data:
        raise ValueError(f"directory {str(directory)!r} holds no shards (no .bin/.idx pairs, no *{MANIFEST_SUFFIX}): "
                         f"give a directory of shards written by {_MAKE_SHARDS}, a manifest or a dataset prefix")
    unfinished = sorted(name for name in indexes | data if _TEMPORARY.search(name))
    if unfinished or list(directory.glob(_RECORD)):
        # Reading what is there would train on part of the data without a sign.
        found = f"{unfinished[0]}.bin/.idx, a temporary" if unfinished else f"{next(directory.glob(_RECORD)).name}"
        raise ValueError(f"directory {str(directory)!r} holds shards preprocess has not finished ({found}) and no "
                         f"{MANIFEST_SUFFIX}: wait for preprocessing to finish (its manifest marks the end), or "
                         "finish it with --write-manifest")
    unpaired = sorted(indexes ^ data)
    if unpaired:
        name = unpaired[0]
        have, lack = (".idx", ".bin") if name in indexes else (".bin", ".idx")
        # preprocess renames .idx into place last: a .bin alone is a shard still being written.
        raise FileNotFoundError(f"shard {str(directory / name)!r} has a {have} but no {lack} ({len(unpaired)} "
                                "unpaired in that directory): wait for preprocessing to finish, or remove it")
    return Shards(str(directory), tuple(str(directory / name) for name in sorted(indexes)), None)


def shard_prefixes(path: str) -> list[str]:
    """The indexed datasets a dataset path reads: a prefix itself, or a sharded dataset's shards."""
    path = dataset_path(path)
    return list(read_shards(path).prefixes) if is_sharded(path) else [path]


def document_count(path: str) -> int:
    return sum(sequence_count(prefix) for prefix in shard_prefixes(path))


def check_tokenizer(shards: Shards, tokenizer_dir: str) -> None:
    """Shards tokenized with another vocabulary than the run's would train on the wrong token ids
    without a sign. The manifest names its tokenizer directory; where that directory is on this
    machine and is not the run's, their vocabularies must be the same (token -> id)."""
    made_with = _tokenizer_location(shards)
    run_with = Path(tokenizer_dir)
    if made_with is None or not run_with.is_dir() or made_with.resolve() == run_with.resolve():
        return
    theirs, ours = _vocabulary(str(made_with.resolve())), _vocabulary(str(run_with.resolve()))
    if theirs is not None and ours is not None and theirs != ours:
        raise ValueError(f"dataset {shards.path!r} was tokenized with {str(made_with)!r} ({len(theirs)} tokens), "
                         f"whose vocabulary is not the run's tokenizer {tokenizer_dir!r} ({len(ours)} tokens): give "
                         f"data.tokenizer_dir={made_with}, or tokenize the data again with --tokenizer {tokenizer_dir}")


def _tokenizer_location(shards: Shards) -> Path | None:
    """The manifest's tokenizer directory (relative to the manifest, or absolute); None where it is
    not on this machine (data made elsewhere: nothing to compare)."""
    if shards.tokenizer is None:
        return None
    location = Path(shards.path).parent / shards.tokenizer
    return location if location.is_dir() else None


@lru_cache(maxsize=8)
def _vocabulary(tokenizer_dir: str) -> dict[str, int] | None:
    """Token -> id of a Hugging Face tokenizer directory, added tokens included; None if it does not
    load (the data module's own tokenizer loading reports a bad run tokenizer)."""
    from transformers import AutoTokenizer

    try:
        return dict(AutoTokenizer.from_pretrained(tokenizer_dir, local_files_only=True).get_vocab())
    except (OSError, ValueError):
        return None
