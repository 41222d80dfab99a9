"""Content checksums of checkpoints: written with every checkpoint, verified before one is read.

A checkpoint's `checksums.json` lists each of its files (the weights shards, Megatron's metadata,
the context) with its size and xxh3-128 digest. The shards, which are nearly all of a checkpoint's
bytes, are hashed while Megatron's writer streams them out: the writer leaves each digest beside
its shard and the manifest collects them, so a save reads nothing back. Files written by other
writers (the small ones, an import's shards) are hashed when the manifest is made.

Sizes are checked before any work (a missing or truncated file); digests when a checkpoint is
loaded, each rank hashing a share of the files (a flipped byte).
"""

from __future__ import annotations

import builtins
import json
import os
from pathlib import Path

import xxhash

MANIFEST = "checksums.json"
ALGORITHM = "xxh3_128"
# Left beside a shard by the writer, {"size": ..., "digest": ...}; folded into the manifest.
_STREAMED_SUFFIX = ".xxh3"
_SHARD_SUFFIX = ".distcp"
_WRITE_ERROR_SUFFIX = ".write-error"
_READ_CHUNK = 16 << 20


def file_digest(path: str | os.PathLike) -> str:
    hasher = xxhash.xxh3_128()
    buffer = bytearray(_READ_CHUNK)
    view = memoryview(buffer)
    with open(path, "rb", buffering=0) as file:
        while size := file.readinto(buffer):
            hasher.update(view[:size])
    return hasher.hexdigest()


class _HashingShard:
    """A shard file open for writing that hashes what goes through it and, once closed without an
    error, leaves {"size", "digest"} beside itself. Megatron's writer only writes it sequentially."""

    def __init__(self, path, mode: str):
        self._file = builtins.open(path, mode)
        self._path = os.fspath(path)
        self._hasher = xxhash.xxh3_128()
        self._size = 0
        self._write_error: OSError | None = None

    def write(self, data) -> int:
        view = memoryview(data).cast("B")
        try:
            written = self._file.write(view)
        except OSError as error:
            self._write_error = error  # torch's zip writer reports it as a bare "unexpected pos"
            raise
        self._hasher.update(view[:written])
        self._size += written
        return written

    def __getattr__(self, name):  # tell, flush, fileno, ...
        return getattr(self._file, name)

    def __enter__(self):
        return self

    def __exit__(self, error_type, error, traceback) -> None:
        try:
            self._file.close()
        except OSError:
            if error_type is None:
                raise
        if self._write_error is not None:
            self._leave_write_error()
            if error is not self._write_error:
                raise self._write_error from error
        if error_type is None:
            Path(self._path + _STREAMED_SUFFIX).write_text(
                json.dumps({"size": self._size, "digest": self._hasher.hexdigest()}))

    def _leave_write_error(self) -> None:
        """Say why the write failed beside the shard: Megatron's writer passes on only the error's
        type. The shard is emptied first, which also frees the space a full disk needs for this."""
        try:
            os.truncate(self._path, 0)
            Path(self._path + _WRITE_ERROR_SUFFIX).write_text(str(self._write_error))
        except OSError:
            pass


def write_errors(directory: str | os.PathLike) -> list[str]:
    """Why shard writes under `directory` failed, as the writers left it."""
    return [p.read_text() for p in sorted(Path(directory).rglob("*" + _WRITE_ERROR_SUFFIX))]


def _open_hashing_shards(file, mode="r", *args, **kwargs):
    if mode == "wb" and not args and not kwargs and os.fspath(file).endswith(_SHARD_SUFFIX):
        return _HashingShard(file, mode)
    return builtins.open(file, mode, *args, **kwargs)


def hash_shards_as_written() -> None:
    """Make Megatron's torch_dist writer hash the shards it writes. It opens each shard with the
    name `open` of its module (in the training process, its writer threads, or the forked
    background writer of an async save); this gives that name a hashing file. If a Megatron
    version opens shards some other way, the manifest hashes them instead (slower, still right)."""
    from falcon_h1.compat.megatron import open_checkpoint_shards_with

    open_checkpoint_shards_with(_open_hashing_shards)


def write_manifest(checkpoint: str | os.PathLike) -> Path:
    """Once every file of `checkpoint` is written (rank 0): its checksums.json, made durable."""
    checkpoint = Path(checkpoint)
    files, streamed = {}, []
    for path in sorted(p for p in checkpoint.rglob("*") if p.is_file()):
        name = path.relative_to(checkpoint).as_posix()
        if name.endswith(_STREAMED_SUFFIX):
            streamed.append(path)
        elif name != MANIFEST:
            size = path.stat().st_size
            files[name] = {"size": size, "digest": _streamed_digest(path, size) or file_digest(path)}
    for path in streamed:  # folded into the manifest
        path.unlink()
    manifest = checkpoint / MANIFEST
    staging = manifest.with_name(MANIFEST + ".tmp")
    with open(staging, "w") as file:
        json.dump({"algorithm": ALGORITHM, "files": files}, file, indent=1, sort_keys=True)
        file.flush()
        os.fsync(file.fileno())
    os.replace(staging, manifest)
    return manifest


def _streamed_digest(path: Path, size: int) -> str | None:
    try:
        streamed = json.loads(Path(str(path) + _STREAMED_SUFFIX).read_text())
    except (OSError, ValueError):
        return None
    return streamed["digest"] if streamed.get("size") == size else None


def read_manifest(checkpoint: str | os.PathLike) -> dict[str, dict] | None:
    """{file: {"size", "digest"}} of a checkpoint; None for one written without checksums. A
    ValueError saying why if the manifest cannot be read."""
    path = Path(checkpoint) / MANIFEST
    if not path.exists():
        return None
    try:
        manifest = json.loads(path.read_text())
        files = manifest["files"]
        algorithm = manifest["algorithm"]
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise ValueError(f"{MANIFEST} cannot be read ({error})") from error
    if algorithm != ALGORITHM:
        raise ValueError(f"{MANIFEST} uses {algorithm!r}, which this version does not know ({ALGORITHM!r})")
    return files


def size_problems(checkpoint: str | os.PathLike, files: dict[str, dict]) -> list[str]:
    """What is missing or of the wrong size, cheaply (no file is read)."""
    problems = []
    for name, entry in files.items():
        path = Path(checkpoint) / name
        if not path.is_file():
            problems.append(f"{name} is missing")
        elif (size := path.stat().st_size) != entry["size"]:
            problems.append(f"{name} has {size:,} bytes, {entry['size']:,} were written")
    return problems


def digest_problems(checkpoint: str | os.PathLike, files: dict[str, dict], rank: int = 0,
                    world_size: int = 1) -> list[str]:
    """The files of this rank's share whose content differs from what was written. Shares are
    balanced by size: files in decreasing size, dealt to the ranks in turn."""
    by_size = sorted(files, key=lambda name: (-files[name]["size"], name))
    problems = []
    for name in by_size[rank::world_size]:
        if file_digest(Path(checkpoint) / name) != files[name]["digest"]:
            problems.append(f"{name} does not match the checksum written with it (its content changed)")
    return problems
