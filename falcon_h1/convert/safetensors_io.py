"""Hugging Face checkpoint files, one tensor at a time.

Reading parses each safetensors header and reads a tensor's bytes with plain file reads (no
mmap), so host memory holds one tensor, not the shard. Writing lays out a shard's header from
the tensors' shapes and dtypes up front and then streams each tensor's bytes, so a shard is never
held in memory either. The format: an 8-byte little-endian header length, a JSON header mapping
names to {dtype, shape, data_offsets} (plus "__metadata__"), padded to 8 bytes, then the data.
"""

from __future__ import annotations

import json
import math
import os
import struct
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import torch

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"

DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
DTYPE_NAMES = {dtype: name for name, dtype in DTYPES.items()}


class HFCheckpointError(ValueError):
    """A Hugging Face checkpoint directory that cannot be converted (says which file and why)."""


@dataclass(frozen=True)
class TensorEntry:
    file: Path
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int  # absolute byte offsets in the file
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start


def read_header(path: Path) -> dict[str, TensorEntry]:
    """The tensors of one safetensors file, checked against the file's size (a truncated or
    damaged file fails here, before anything reads its data)."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise HFCheckpointError(f"{path} is not a safetensors file (only {size} bytes)")
        (length,) = struct.unpack("<Q", head)
        if length > size - 8 or length > 100 * 2**20:
            raise HFCheckpointError(f"{path} is truncated or not a safetensors file "
                                    f"(header of {length} bytes in a file of {size})")
        try:
            header = json.loads(f.read(length))
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise HFCheckpointError(f"{path}: unreadable safetensors header ({error})") from error
    data_start = 8 + length
    entries = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if info.get("dtype") not in DTYPES:
            raise HFCheckpointError(f"{path}: tensor {name} has unsupported dtype {info.get('dtype')!r}")
        begin, end = info["data_offsets"]
        shape = tuple(info["shape"])
        expected = math.prod(shape) * DTYPES[info["dtype"]].itemsize
        if end - begin != expected:
            raise HFCheckpointError(f"{path}: tensor {name} holds {end - begin} bytes, its shape {shape} "
                                    f"needs {expected}; the file is damaged")
        if data_start + end > size:
            raise HFCheckpointError(
                f"{path} is truncated: tensor {name} ends at byte {data_start + end}, the file has {size} "
                "bytes; download or copy the file again")
        entries[name] = TensorEntry(path, DTYPES[info["dtype"]], shape, data_start + begin, data_start + end)
    return entries


def read_tensor(entry: TensorEntry) -> torch.Tensor:
    buffer = torch.empty(entry.nbytes, dtype=torch.uint8)
    with open(entry.file, "rb") as f:
        f.seek(entry.start)
        if f.readinto(memoryview(buffer.numpy())) != entry.nbytes:
            raise HFCheckpointError(f"{entry.file}: short read; the file changed or is truncated")
    return buffer.view(entry.dtype).reshape(entry.shape)


class HFWeights:
    """The tensors of a Hugging Face checkpoint directory (a single model.safetensors or shards
    listed by model.safetensors.index.json), read lazily."""

    def __init__(self, directory: str | os.PathLike):
        self.directory = Path(directory)
        index = self.directory / INDEX_NAME
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError) as error:
                raise HFCheckpointError(f"{index} is not a safetensors index ({error})") from error
            files = sorted(set(weight_map.values()))
        elif (self.directory / SINGLE_NAME).is_file():
            weight_map, files = None, [SINGLE_NAME]
        else:
            other = sorted(p.name for p in self.directory.glob("*.bin")) + sorted(
                p.name for p in self.directory.glob("*.safetensors"))
            hint = (f" (found {', '.join(other[:3])}: re-save with transformers' save_pretrained, which "
                    "writes safetensors)") if other else ""
            raise HFCheckpointError(f"{self.directory} holds no {SINGLE_NAME} or {INDEX_NAME}{hint}")
        self.entries: dict[str, TensorEntry] = {}
        for name in files:
            path = self.directory / name
            if not path.is_file():
                raise HFCheckpointError(f"{path} is listed in {INDEX_NAME} but missing; the download is incomplete")
            self.entries.update(read_header(path))
        if weight_map is not None:
            missing = sorted(set(weight_map) - set(self.entries))
            if missing:
                raise HFCheckpointError(f"{INDEX_NAME} lists tensors its shards do not hold: {missing[:5]}")

    def __getitem__(self, name: str) -> torch.Tensor:
        return read_tensor(self.entries[name])


def parse_size(size: int | str) -> int:
    """'5GB', '500MB', '2GiB' or a byte count -> bytes."""
    if isinstance(size, int):
        return size
    text = size.strip().upper()
    units = {"GIB": 2**30, "MIB": 2**20, "KIB": 2**10, "GB": 10**9, "MB": 10**6, "KB": 10**3, "B": 1}
    for unit, factor in units.items():
        if text.endswith(unit):
            return int(float(text[: -len(unit)]) * factor)
    return int(text)


@dataclass(frozen=True)
class PlannedTensor:
    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    produce: Callable[[], torch.Tensor]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


def plan_shards(tensors: Iterable[PlannedTensor], max_shard_bytes: int) -> list[list[PlannedTensor]]:
    """Consecutive tensors grouped into shards of at most max_shard_bytes (a larger tensor gets
    a shard of its own), like transformers' save_pretrained."""
    shards, current, size = [], [], 0
    for tensor in tensors:
        if current and size + tensor.nbytes > max_shard_bytes:
            shards.append(current)
            current, size = [], 0
        current.append(tensor)
        size += tensor.nbytes
    if current:
        shards.append(current)
    return shards


def write_shard(path: Path, tensors: list[PlannedTensor], on_tensor: Callable[[int], None] | None = None) -> None:
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for t in tensors:
        header[t.name] = {"dtype": DTYPE_NAMES[t.dtype], "shape": list(t.shape),
                          "data_offsets": [offset, offset + t.nbytes]}
        offset += t.nbytes
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(encoded)))
        f.write(encoded)
        for t in tensors:
            value = t.produce()
            if tuple(value.shape) != t.shape or value.dtype != t.dtype:
                raise RuntimeError(f"{t.name}: produced {tuple(value.shape)} {value.dtype}, "
                                   f"planned {t.shape} {t.dtype}")
            f.write(memoryview(value.contiguous().reshape(-1).view(torch.uint8).numpy()))
            if on_tensor is not None:
                on_tensor(t.nbytes)
        f.flush()
        os.fsync(f.fileno())


def write_hf_weights(directory: Path, tensors: list[PlannedTensor], max_shard_bytes: int,
                     on_tensor: Callable[[int], None] | None = None) -> list[str]:
    """Shards named like transformers' (model-00001-of-00003.safetensors) plus the index, or a
    single model.safetensors when everything fits in one shard. Returns the file names."""
    shards = plan_shards(tensors, max_shard_bytes)
    if len(shards) == 1:
        write_shard(directory / SINGLE_NAME, shards[0], on_tensor)
        return [SINGLE_NAME]
    names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    weight_map = {}
    for name, shard in zip(names, shards):
        write_shard(directory / name, shard, on_tensor)
        weight_map.update({t.name: name for t in shard})
    index = {"metadata": {"total_size": sum(t.nbytes for t in tensors)}, "weight_map": weight_map}
    (directory / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
    return names + [INDEX_NAME]
