"""A falcon_h1 checkpoint (from any TP/PP/CP layout) -> a Hugging Face Falcon-H1 directory.

    export_hf_checkpoint("runs/x/checkpoints/step=0002000", "exports/my-falcon-h1")

The output loads with `FalconH1ForCausalLM.from_pretrained` (and vLLM etc.): config.json,
safetensors shards named like transformers' with their index, the tokenizer files the checkpoint
carries. The vocabulary is the model's own: TP padding rows are dropped. Each HF tensor is
assembled from its canonical pieces and streamed into its shard, so memory stays near the size of
the largest tensor.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch

from falcon_h1.convert.dist_checkpoint import VOCAB_KEYS, CheckpointWeights
from falcon_h1.convert.mapping import links
from falcon_h1.convert.output import Progress, staged_output
from falcon_h1.convert.safetensors_io import PlannedTensor, parse_size, write_hf_weights
from falcon_h1.model.config import config_from_hf, config_to_hf
from falcon_h1.training import checkpoint_io
from falcon_h1.training.checkpoint_io import CheckpointError


def export_hf_checkpoint(checkpoint: str | os.PathLike, output: str | os.PathLike, dtype: torch.dtype | None = None,
                         max_shard_size: int | str = "5GB", overwrite: bool = False, progress: bool = True) -> Path:
    """Write the model of `checkpoint` as a Hugging Face directory at `output`.

    dtype: of the exported tensors (default: as stored, e.g. bfloat16 after bf16 training).
    LoRA adapters (a LoRA run's checkpoint) are first merged into their base checkpoint.
    Returns the output directory."""
    path = checkpoint_io.check_loadable(checkpoint)
    if checkpoint_io.lora_of(path) is not None:
        from falcon_h1.convert.merge_lora import merge_lora_checkpoint

        output = Path(output)
        output.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix=f".{output.name}.merged-", dir=output.parent) as scratch:
            merged = merge_lora_checkpoint(path, Path(scratch) / "checkpoint")
            return export_hf_checkpoint(merged, output, dtype, max_shard_size, overwrite, progress)
    hf_config, _ = checkpoint_io.read_context(path)
    try:
        config = config_from_hf(hf_config)
    except (ValueError, TypeError, KeyError) as error:
        raise CheckpointError(f"checkpoint {path}: its context/config.json is not a Falcon-H1 config "
                              f"({error})") from error
    weights = CheckpointWeights(path / checkpoint_io.WEIGHTS_DIR)

    planned, cache = [], {}
    for link in links(config):
        pieces = []
        for key in link.canonical:
            info = weights.info(key)
            if info is None:
                raise CheckpointError(f"checkpoint {path} lacks tensor {key}; it holds another model than its "
                                      "context/config.json describes, or is damaged")
            shape, stored = info
            if key in VOCAB_KEYS:
                if shape[0] < config.vocab_size:
                    raise CheckpointError(f"checkpoint {path}: {key} has {shape[0]} rows, fewer than the "
                                          f"vocabulary of {config.vocab_size}")
                shape = (config.vocab_size, *shape[1:])
            pieces.append(torch.empty(shape, dtype=stored, device="meta"))
        out_dtype = dtype or pieces[0].dtype
        for i, (name, meta) in enumerate(zip(link.hf, link.to_hf(pieces))):
            produce = _producer(link, i, weights, config, cache, out_dtype)
            planned.append(PlannedTensor(name, tuple(meta.shape), out_dtype, produce))

    meter = Progress(f"export {path.name}", sum(t.nbytes for t in planned), len(planned), progress)
    with staged_output(output, overwrite) as staging:
        write_hf_weights(staging, planned, parse_size(max_shard_size), meter)
        out_config = dict(config_to_hf(config), dtype=str(planned[0].dtype).removeprefix("torch."))
        (staging / "config.json").write_text(json.dumps(out_config, indent=2, sort_keys=True) + "\n")
        tokenizer = checkpoint_io.tokenizer_path(path)
        if tokenizer.is_dir():
            for file in tokenizer.iterdir():
                if file.is_file():
                    shutil.copy2(file, staging / file.name)
    meter.finish()
    return Path(output)


def _producer(link, index, weights, config, cache, dtype):
    """The HF tensor `link.hf[index]`, built from its canonical pieces when the writer needs it;
    the pieces of the last link are kept so its other HF tensors (MLP gate, up) reuse them."""

    def produce() -> torch.Tensor:
        if cache.get("link") is not link:
            pieces = [weights.read(key, rows=config.vocab_size if key in VOCAB_KEYS else None)
                      for key in link.canonical]
            cache.update(link=link, tensors=link.to_hf(pieces))
        return cache["tensors"][index].to(dtype).contiguous()

    return produce
