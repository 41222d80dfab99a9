"""LoRA adapters + their base checkpoint -> one full checkpoint (for export, serving, or more training).

A LoRA run saves its adapters alone, with the path of the base checkpoint in context/run.json.
Merging builds the model in one process on the CPU, loads the base weights and the adapters,
folds each adapter into its weight (W + alpha/r * B A, model/lora.py) and saves the result as an
ordinary weights-only checkpoint, stored in the base checkpoint's dtype. Peak memory is about the
model in float32 (4 bytes per parameter).

    python -m falcon_h1.convert merge-lora runs/sft/checkpoints/step=0000500 ckpts/merged
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from falcon_h1.convert.dist_checkpoint import CheckpointWeights
from falcon_h1.convert.output import staged_output
from falcon_h1.model.lora import LoRA, apply_lora, merge_lora
from falcon_h1.single_process import single_process_megatron
from falcon_h1.training import checkpoint_io
from falcon_h1.training.checkpoint_io import CheckpointError

DTYPE_PROBE_KEY = "embedding.word_embeddings.weight"


def merge_lora_checkpoint(adapters: str | os.PathLike, output: str | os.PathLike, overwrite: bool = False,
                          dtype: torch.dtype | None = None) -> Path:
    """Write adapter checkpoint `adapters` merged into its base as a full checkpoint at `output`.
    dtype: of the stored weights (default: the base checkpoint's)."""
    from falcon_h1.model.config import config_to_hf
    from falcon_h1.model.model import FalconH1Model

    path = checkpoint_io.check_loadable(adapters)
    scheme = checkpoint_io.lora_of(path)
    if scheme is None:
        raise CheckpointError(f"{path} is a full checkpoint, not LoRA adapters: there is nothing to merge; "
                              "export or fine-tune it directly")
    base = checkpoint_io.base_checkpoint_of(path)
    if dtype is None:
        info = CheckpointWeights(base / checkpoint_io.WEIGHTS_DIR).info(DTYPE_PROBE_KEY)
        dtype = info[1] if info else torch.float32
    _, run_info = checkpoint_io.read_context(path)
    with single_process_megatron():
        config = checkpoint_io.checkpoint_model_config(path, use_cpu_initialization=True, kernel_backend="torch")
        model = FalconH1Model(config)
        apply_lora(model, LoRA.from_dict(scheme))
        checkpoint_io.load_model_weights([model], path)
        merge_lora(model)
        model.to(dtype)
        tokenizer = checkpoint_io.tokenizer_path(path)
        info = {k: v for k, v in run_info.items() if k not in ("peft", "base_checkpoint")}
        info.update(merged_from=dict(adapters=str(path.resolve()), base=str(base), peft=scheme))
        with staged_output(output, overwrite) as staging:
            checkpoint_io.save_model([model], staging, config_to_hf(config), info,
                                     str(tokenizer) if tokenizer.is_dir() else None)
    return Path(output)
