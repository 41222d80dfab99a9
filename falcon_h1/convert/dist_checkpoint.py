"""The `weights/` of a checkpoint (Megatron torch_dist), written and read one tensor at a time.

A checkpoint stores canonical tensors (mapping.py) under Megatron's sharded keys: per-layer
tensors are stacked on a leading layer axis (`decoder.layers.self_attention.A_log`, chunk at
offset (i, 0)), the vocabulary rows are padded for TP. Both directions avoid holding the model:

- writing builds the model as a skeleton on the meta device (no memory) to get exactly the keys,
  chunks and objects a training save at TP=1 writes, and hands torch.distributed.checkpoint a
  planner that produces each chunk's data only when the writer asks for it;
- reading asks torch.distributed.checkpoint for one canonical tensor (one layer's chunk of a
  stacked key) at a time, whatever layout wrote the checkpoint.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.metadata import ChunkStorageMetadata, TensorStorageMetadata
from torch.distributed.checkpoint.planner import LoadPlan, LoadPlanner, WriteItemType
from torch.distributed.checkpoint.planner_helpers import create_read_items_for_chunk_list

from falcon_h1.model.config import FalconH1Config

LAYERS_PREFIX = "decoder.layers."
VOCAB_KEYS = ("embedding.word_embeddings.weight", "output_layer.weight")


def sharded_key(canonical_key: str) -> tuple[str, int | None]:
    """Canonical key -> (checkpoint key, layer index on the stacked axis or None)."""
    if canonical_key.startswith(LAYERS_PREFIX):
        layer, rest = canonical_key[len(LAYERS_PREFIX):].split(".", 1)
        return LAYERS_PREFIX + rest, int(layer)
    return canonical_key, None


def _streaming_save_planner(chunk_data: Callable[[str, tuple, tuple, torch.dtype], torch.Tensor]):
    from megatron.core.dist_checkpointing.strategies.torch import MCoreSavePlanner

    class StreamingSavePlanner(MCoreSavePlanner):
        """Megatron's planner, but tensor data comes from `chunk_data` when the writer asks."""

        def create_local_plan(self):
            plan = super().create_local_plan()
            # Layer by layer: the chunks cut from one source tensor are written back to back.
            def order(item):
                offsets = item.tensor_data.chunk.offsets if item.tensor_data else ()
                layer = offsets[0] if item.index.fqn.startswith(LAYERS_PREFIX) and offsets else -1
                return (layer,)
            self.plan = dataclasses.replace(plan, items=sorted(plan.items, key=order))
            return self.plan

        def resolve_data(self, write_item):
            if write_item.type == WriteItemType.BYTE_IO:
                return super().resolve_data(write_item)
            chunk = write_item.tensor_data.chunk
            return chunk_data(write_item.index.fqn, tuple(chunk.offsets), tuple(chunk.sizes),
                              write_item.tensor_data.properties.dtype)

    return StreamingSavePlanner(flatten_state_dict=False, flatten_sharded_tensors=False)


def write_weights(directory: Path, config: FalconH1Config, canonical_tensor: Callable[[str], torch.Tensor],
                  dtype: torch.dtype, on_tensor: Callable[[int], None] | None = None) -> None:
    """Write a torch_dist weights directory holding the model `config` describes, each canonical
    tensor taken from `canonical_tensor(key)` when it is written. Call inside
    falcon_h1.single_process.single_process_megatron()."""
    from megatron.core.dist_checkpointing.core import CheckpointingConfig, save_config
    from megatron.core.dist_checkpointing.mapping import ShardedObject
    from megatron.core.dist_checkpointing.state_dict_utils import save_preprocess
    from megatron.core.dist_checkpointing.strategies.torch import (
        _replace_state_dict_keys_with_sharded_keys,
        mcore_to_pyt_state_dict,
    )

    from falcon_h1.model.model import FalconH1Model
    from falcon_h1.training.checkpoint_io import model_sharded_state_dict

    skeleton_config = dataclasses.replace(
        config, tensor_model_parallel_size=1, pipeline_model_parallel_size=1, context_parallel_size=1,
        sequence_parallel=False, use_cpu_initialization=True, perform_initialization=False, params_dtype=dtype)
    with torch.device("meta"):
        skeleton = FalconH1Model(skeleton_config)
    sharded, common = save_preprocess({"state_dict": model_sharded_state_dict([skeleton])}, False)
    sharded["common_state"] = ShardedObject("common_state", common, (1,), (0,), replica_id=0)
    sharded, _, _ = _replace_state_dict_keys_with_sharded_keys(sharded, False)
    state_dict = mcore_to_pyt_state_dict(sharded, False)

    def chunk_data(fqn, offsets, sizes, chunk_dtype):
        canonical = fqn
        if fqn.startswith(LAYERS_PREFIX):
            canonical = f"{LAYERS_PREFIX}{offsets[0]}.{fqn[len(LAYERS_PREFIX):]}"
            offsets, inner = offsets[1:], sizes[1:]
        else:
            inner = sizes
        tensor = canonical_tensor(canonical)
        if canonical in VOCAB_KEYS and tensor.shape[0] < offsets[0] + inner[0]:
            padded = tensor.new_zeros(offsets[0] + inner[0], *tensor.shape[1:])  # TP vocabulary padding
            padded[: tensor.shape[0]] = tensor
            tensor = padded
        index = tuple(slice(o, o + s) for o, s in zip(offsets, inner))
        data = tensor[index].reshape(sizes).to(chunk_dtype)
        if on_tensor is not None:
            on_tensor(data.numel() * data.element_size())
        return data

    directory.mkdir(parents=True, exist_ok=True)
    writer = dcp.FileSystemWriter(str(directory), single_file_per_rank=True, thread_count=1, sync_files=True)
    dcp.save(state_dict, storage_writer=writer, planner=_streaming_save_planner(chunk_data))
    save_config(CheckpointingConfig("torch_dist", 1), str(directory))


class _CachedMetadataReader(dcp.FileSystemReader):
    def read_metadata(self):
        if not hasattr(self, "_metadata"):
            self._metadata = super().read_metadata()
        return self._metadata


class _ChunkLoadPlanner(LoadPlanner):
    """Reads one chunk of one saved tensor into `dest`, from whichever saved chunks overlap it."""

    def __init__(self, key: str, offsets: tuple[int, ...], dest: torch.Tensor):
        self.key, self.offsets, self.dest = key, offsets, dest

    def set_up_planner(self, state_dict, metadata=None, is_coordinator=False):
        self.metadata = metadata

    def create_local_plan(self):
        saved = self.metadata.state_dict_metadata[self.key]
        wanted = ChunkStorageMetadata(offsets=torch.Size(self.offsets), sizes=self.dest.shape)
        return LoadPlan(create_read_items_for_chunk_list(self.key, saved, [wanted]))

    def create_global_plan(self, global_plan):
        return global_plan

    def finish_plan(self, central_plan):
        return central_plan

    def load_bytes(self, read_item, value):
        raise RuntimeError(f"unexpected object {read_item.dest_index.fqn} in a tensor read")

    def resolve_tensor(self, read_item):
        return self.dest[tuple(slice(o, o + n) for o, n in zip(read_item.dest_offsets, read_item.lengths))]

    def commit_tensor(self, read_item, tensor):
        pass


class CheckpointWeights:
    """Canonical tensors of a checkpoint's weights/ directory, read one at a time."""

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)
        self._reader = _CachedMetadataReader(str(self.directory))
        self.tensors: dict[str, TensorStorageMetadata] = {
            key: md for key, md in self._reader.read_metadata().state_dict_metadata.items()
            if isinstance(md, TensorStorageMetadata)}

    def info(self, canonical_key: str) -> tuple[tuple[int, ...], torch.dtype] | None:
        """(shape, dtype) of a canonical tensor, None if the checkpoint lacks it."""
        key, layer = sharded_key(canonical_key)
        md = self.tensors.get(key)
        if md is None or (layer is not None and layer >= md.size[0]):
            return None
        shape = tuple(md.size[1:]) if layer is not None else tuple(md.size)
        return shape, md.properties.dtype

    def read(self, canonical_key: str, rows: int | None = None) -> torch.Tensor:
        """The canonical tensor (its first `rows` rows only, e.g. without vocabulary padding)."""
        key, layer = sharded_key(canonical_key)
        shape, dtype = self.info(canonical_key)
        if rows is not None:
            shape = (rows, *shape[1:])
        if layer is None:
            dest, offsets = torch.empty(shape, dtype=dtype), (0,) * len(shape)
        else:
            dest, offsets = torch.empty((1, *shape), dtype=dtype), (layer,) + (0,) * len(shape)
        with warnings.catch_warnings():  # "assuming the intent is to load in a single process": it is
            warnings.simplefilter("ignore", UserWarning)
            dcp.load(state_dict={}, storage_reader=self._reader, planner=_ChunkLoadPlanner(key, offsets, dest),
                     no_dist=True)
        return dest[0] if layer is not None else dest
