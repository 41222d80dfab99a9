"""A sharded dataset read by Megatron as ONE indexed dataset: the shards' documents concatenated.

A Megatron blend of the shards would draw each sample from one shard and interleave shards by
weight; one low-level dataset instead gives exactly the samples (and the sample order) of the
unsharded dataset of the same documents in the same order: GPTDataset splits, shuffles and packs
documents by their index and length only. ShardedGPTDataset is Megatron's GPTDataset that builds
this view for a manifest or a directory of shards (falcon_h1.data.sharded) and reads a prefix as
GPTDataset does.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections import OrderedDict
from functools import cached_property

import numpy
import torch
from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig
from megatron.core.datasets.indexed_dataset import IndexedDataset

from falcon_h1.data.sharded import Shards, cache_prefix, is_sharded, read_shards

# Shards kept open per process (each holds an open .bin file and two memory maps): a corpus of
# thousands of shards would otherwise run into the open-file limit (often 1024) and, in every
# data-loader worker, into the kernel's memory-map limit. Reopening a shard is cheap (two mmaps).
OPEN_SHARDS = 256


class ShardedIndexedDataset(torch.utils.data.Dataset):
    """Shards read as one indexed dataset: sequence k is sequence k - starts[s] of the shard s
    holding it. Has what GPTDataset and its index building read of an IndexedDataset
    (sequence_lengths, get, path_prefix for the default cache directory) and len / [int]."""

    def __init__(self, shards: Shards, mmap: bool = True, open_shards: int = OPEN_SHARDS):
        self.shards = shards
        self.mmap = mmap
        self.open_shards = open_shards
        self.path_prefix = cache_prefix(shards.path)
        self._open: OrderedDict[int, IndexedDataset] = OrderedDict()
        lengths, dtypes = [], []
        for s in range(len(shards.prefixes)):
            shard = self._shard(s)
            # A copy: a shard's arrays are views of a memory map closed when it leaves _open.
            lengths.append(numpy.array(shard.sequence_lengths, dtype=numpy.int32))
            dtypes.append(shard.index.dtype)
        different = next((s for s, dtype in enumerate(dtypes) if dtype != dtypes[0]), None)
        if different is not None:
            raise ValueError(f"shards of {shards.path!r} hold different token types ({numpy.dtype(dtypes[0]).name} "
                             f"in {shards.prefixes[0]!r}, {numpy.dtype(dtypes[different]).name} in "
                             f"{shards.prefixes[different]!r}): they were made with different tokenizers; "
                             "tokenize them again with one")
        self.sequence_lengths = numpy.concatenate(lengths)
        self.starts = numpy.concatenate([[0], numpy.cumsum([len(x) for x in lengths])]).astype(numpy.int64)
        # What Megatron's index cache name must also hash: the same manifest rewritten with other
        # shards is another dataset.
        described = [[prefix, len(x), os.path.getsize(f"{prefix}.bin")] for prefix, x in zip(shards.prefixes, lengths)]
        self.identity = hashlib.md5(json.dumps(described).encode(), usedforsecurity=False).hexdigest()

    def __len__(self) -> int:
        return len(self.sequence_lengths)

    @cached_property
    def document_indices(self) -> numpy.ndarray:
        """IndexedDataset's document boundaries (GPTDataset does not read them: built on first use, as
        they take 8 bytes a document): each shard's after its leading 0, moved to its first sequence."""
        return numpy.concatenate([[0]] + [self._shard(s).document_indices[1:] + start
                                          for s, start in enumerate(self.starts[:-1])]).astype(numpy.int64)

    # Copies, not views of a shard's memory map: reading other shards may close this one, and
    # Megatron unmaps a deleted IndexedDataset even while views of it live (reading one then crashes).
    def __getitem__(self, idx: int) -> numpy.ndarray:
        shard, local = self._locate(idx)
        return numpy.array(self._shard(shard)[local])

    def get(self, idx: int, offset: int = 0, length: int | None = None) -> numpy.ndarray:
        shard, local = self._locate(idx)
        return numpy.array(self._shard(shard).get(local, offset, length))

    def _locate(self, idx) -> tuple[int, int]:
        if not isinstance(idx, (int, numpy.integer)):
            raise TypeError(f"a sharded dataset is indexed by one sequence number, not {type(idx).__name__}")
        idx = int(idx) + (len(self) if idx < 0 else 0)
        if not 0 <= idx < len(self):
            raise IndexError(f"sequence {idx} outside the {len(self)} sequences of {self.shards.path!r}")
        shard = int(numpy.searchsorted(self.starts, idx, side="right")) - 1
        return shard, idx - int(self.starts[shard])

    def _shard(self, s: int) -> IndexedDataset:
        """Shard s, opened on first use; the least recently used beyond open_shards is closed."""
        dataset = self._open.pop(s, None)
        if dataset is None:
            dataset = IndexedDataset(self.shards.prefixes[s], multimodal=False, mmap=self.mmap)
        self._open[s] = dataset
        if len(self._open) > self.open_shards:
            self._open.popitem(last=False)
        return dataset

    def __getstate__(self) -> dict:
        # Data-loader workers reopen what they read (open files and maps do not pickle).
        return {**self.__dict__, "_open": OrderedDict()}


class ShardedGPTDataset(GPTDataset):
    """Megatron's GPTDataset, reading a sharded dataset (manifest or directory) as one."""

    @staticmethod
    def build_low_level_dataset(dataset_path: str, config: GPTDatasetConfig):
        if is_sharded(dataset_path):
            return ShardedIndexedDataset(read_shards(dataset_path), mmap=config.mmap_bin_files)
        return GPTDataset.build_low_level_dataset(dataset_path, config)

    def _build_document_sample_shuffle_indices(self):
        # Megatron names the cached sample index by an MD5 of unique_identifiers (the dataset path and
        # the config), computed in MegatronDataset.__init__ just before GPTDataset.__init__ builds the
        # index here: add the shards' identity first, and hash again as Megatron does.
        if isinstance(self.dataset, ShardedIndexedDataset):
            self.unique_identifiers["shards"] = self.dataset.identity
            self.unique_description = json.dumps(self.unique_identifiers, indent=4,
                                                 default=lambda obj: obj.unique_identifiers)
            self.unique_description_hash = hashlib.md5(self.unique_description.encode("utf-8"),
                                                       usedforsecurity=False).hexdigest()
        return super()._build_document_sample_shuffle_indices()
