"""A falcon_h1 checkpoint (from any TP/PP/CP layout) -> a Hugging Face Falcon-H1 directory.

    export_hf_checkpoint("runs/x/checkpoints/step=0002000", "exports/my-falcon-h1")

The output loads with `FalconH1ForCausalLM.from_pretrained` (and vLLM etc.): config.json,
safetensors shards named like transformers' with their index, the tokenizer files the checkpoint
carries. The vocabulary is the model's own: TP padding rows are dropped. Each HF tensor is
assembled from its canonical pieces and streamed into its shard, so memory stays near the size of
the largest tensor. config.json's bos/eos/pad token ids are those of the tokenizer the checkpoint
carries (where they differ, the export says what it changed): transformers' `generate` stops at
config.json's eos_token_id.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
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

SPECIAL_TOKENS = ("bos", "eos", "pad")
# Files that hold a tokenizer's vocabulary; a tokenizer directory without one (only a
# tokenizer_config.json, say) says nothing about token ids.
VOCABULARY_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt")


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
    checkpoint_io.verify_checksums(path)
    hf_config, _ = checkpoint_io.read_context(path)
    try:
        config = config_from_hf(hf_config)
    except (ValueError, TypeError, KeyError) as error:
        raise CheckpointError(f"checkpoint {path}: its context/config.json is not a Falcon-H1 config "
                              f"({error})") from error
    token_ids = {}
    tokenizer = checkpoint_tokenizer(path)
    if tokenizer is not None:
        token_ids, changes = special_token_ids(config, tokenizer, f"checkpoint {path}")
        if changes:
            print(f"export: config.json {', '.join(changes)} to match the checkpoint's tokenizer", file=sys.stderr)
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
        out_config = dict(config_to_hf(config), dtype=str(planned[0].dtype).removeprefix("torch."), **token_ids)
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


def checkpoint_tokenizer(path: Path):
    """The Hugging Face tokenizer a checkpoint carries, or None if it carries no vocabulary."""
    directory = checkpoint_io.tokenizer_path(path)
    if not any((directory / name).is_file() for name in VOCABULARY_FILES):
        return None
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(directory), local_files_only=True)
    except (OSError, ValueError) as error:
        raise CheckpointError(f"checkpoint {path}: its tokenizer {directory} does not load ({error}); "
                              "its bos/eos/pad ids cannot be checked") from error


def special_token_ids(config, tokenizer, where: str) -> tuple[dict, list[str]]:
    """({"bos_token_id": ..., "eos_token_id": ..., "pad_token_id": ...}, what changed) for `config`
    with `tokenizer`: the tokenizer's id where it has the token (an eos list that holds it stays);
    where it has none, the config's id unless that is an ordinary token (then None, as no such
    token exists). A tokenizer id outside the vocabulary, or an eos list without the tokenizer's
    eos, cannot be decided: CheckpointError naming `where`."""
    ids, changes = {}, []
    for kind in SPECIAL_TOKENS:
        field = f"{kind}_token_id"
        ours, theirs = getattr(config, field), getattr(tokenizer, field)
        if theirs is not None and theirs >= config.vocab_size:
            raise CheckpointError(f"{where}: the tokenizer's {kind} token {getattr(tokenizer, f'{kind}_token')!r} "
                                  f"has id {theirs}, outside the model's vocabulary of {config.vocab_size}")
        if theirs is None:
            keep = ours is None or isinstance(ours, list) or ours in tokenizer.added_tokens_decoder
            new = ours if keep else None
        elif isinstance(ours, list):
            if theirs not in ours:
                raise CheckpointError(f"{where}: {field}={ours} does not hold the tokenizer's {kind} id {theirs}; "
                                      f"set {field} in its context/config.json or the tokenizer's {kind}_token")
            new = ours
        else:
            new = theirs
        if new != ours:
            changes.append(f"{field} {_named(tokenizer, ours)} -> {_named(tokenizer, new)}")
        ids[field] = new
    return ids, changes


def _named(tokenizer, token_id) -> str:
    """An id with its token, where it is one of the tokenizer's: "11 ('+')"."""
    if isinstance(token_id, int) and 0 <= token_id < len(tokenizer):
        return f"{token_id} ({tokenizer.convert_ids_to_tokens(token_id)!r})"
    return str(token_id)
