"""Hugging Face Falcon-H1 directory -> a falcon_h1 checkpoint (weights-only, loadable at any layout).

    import_hf_checkpoint("tiiuae/Falcon-H1-1.5B-Base (a local download)", "ckpts/falcon-h1-1.5b")

The result holds `weights/` (torch_dist, canonical tensors, vocabulary padded for TP=1 and
re-padded on load for any TP) and `context/` (config.json in HF form, run.json, tokenizer/), and
is used with `AutoResume(restore_weights_from=...)` or `load_model_weights`. Everything is
checked before anything is written: config.json, the architecture, every tensor's presence,
shape and file integrity.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path

import torch

from falcon_h1.convert.dist_checkpoint import write_weights
from falcon_h1.convert.hf_modeling import hf_falcon_h1
from falcon_h1.convert.mapping import links
from falcon_h1.convert.output import Progress, staged_output
from falcon_h1.convert.safetensors_io import HFCheckpointError, HFWeights
from falcon_h1.model.config import FalconH1Config, config_from_hf, config_to_hf
from falcon_h1.single_process import single_process_megatron
from falcon_h1.training import checkpoint_io, checksums

# Files of an HF model directory that travel with the checkpoint (tokenizer, chat template,
# generation defaults); weights and config.json are converted instead.
CONTEXT_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                 "tokenizer.model", "vocab.json", "vocab.txt", "merges.txt", "chat_template.jinja",
                 "chat_template.json", "generation_config.json")


def read_hf_config(hf_dir: Path) -> tuple[dict, FalconH1Config]:
    path = hf_dir / "config.json"
    if not path.is_file():
        raise HFCheckpointError(f"{hf_dir} has no config.json: give the directory of a Hugging Face model "
                                "(as downloaded by `huggingface-cli download` or written by save_pretrained)")
    try:
        hf_config = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise HFCheckpointError(f"{path} is not valid JSON ({error})") from error
    architectures = hf_config.get("architectures") or []
    if hf_config.get("model_type") != "falcon_h1" or (architectures and "FalconH1ForCausalLM" not in architectures):
        raise HFCheckpointError(
            f"{path} describes model_type={hf_config.get('model_type')!r} architectures={architectures}, "
            "not a Falcon-H1 model (model_type 'falcon_h1', FalconH1ForCausalLM)")
    try:
        return hf_config, config_from_hf(hf_config)
    except (ValueError, TypeError, KeyError) as error:
        raise HFCheckpointError(f"{path}: {error}") from error


def expected_hf_shapes(hf_dir: Path) -> dict[str, tuple[int, ...]]:
    """Tensor names and shapes of the directory's FalconH1ForCausalLM per its config.json, from
    transformers itself (built on the meta device): the reference the weights are checked against."""
    module = hf_falcon_h1()
    try:
        config = module.FalconH1Config.from_pretrained(hf_dir)
    except Exception as error:  # transformers' own validation of config.json
        raise HFCheckpointError(f"{hf_dir / 'config.json'}: transformers rejects it ({error})") from error
    with torch.device("meta"):
        model = module.FalconH1ForCausalLM(config)
    shapes = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    if config.tie_word_embeddings:
        shapes.pop("lm_head.weight", None)
    return shapes


def check_weights(weights: HFWeights, expected: dict[str, tuple[int, ...]], hf_dir: Path) -> None:
    missing = sorted(set(expected) - set(weights.entries))
    if missing:
        raise HFCheckpointError(f"{hf_dir} lacks {len(missing)} tensors its config.json implies, e.g. {missing[:3]}; "
                                "the checkpoint is incomplete or its config.json belongs to another model")
    unexpected = sorted(set(weights.entries) - set(expected))
    if unexpected:
        raise HFCheckpointError(f"{hf_dir} holds {len(unexpected)} tensors a Falcon-H1 model with this config.json "
                                f"does not have, e.g. {unexpected[:3]}; it is another architecture or variant")
    for name, shape in expected.items():
        entry = weights.entries[name]
        if entry.shape != shape:
            raise HFCheckpointError(f"{entry.file.name}: tensor {name} has shape {entry.shape}, but config.json "
                                    f"implies {shape}; the weights and config.json do not belong together")


def import_hf_checkpoint(hf_dir: str | os.PathLike, output: str | os.PathLike, dtype: torch.dtype | None = None,
                         overwrite: bool = False, progress: bool = True) -> Path:
    """Convert a Hugging Face Falcon-H1 directory into a falcon_h1 checkpoint at `output`.

    dtype: of the stored weights (default: as in the HF files, e.g. bfloat16 for TII's releases).
    Returns the checkpoint directory."""
    hf_dir = Path(hf_dir)
    if not hf_dir.is_dir():
        raise HFCheckpointError(f"{hf_dir} is not a directory; give the local directory of a Hugging Face model")
    hf_config, config = read_hf_config(hf_dir)
    weights = HFWeights(hf_dir)
    check_weights(weights, expected_hf_shapes(hf_dir), hf_dir)
    dtype = dtype or weights.entries["model.embed_tokens.weight"].dtype

    sources = {}  # canonical key -> (link, index of its output)
    for link in links(config):
        sources.update({key: (link, i) for i, key in enumerate(link.canonical)})
    last: list = [None, None]  # the last link converted, and its canonical tensors

    def canonical_tensor(key: str) -> torch.Tensor:
        link, i = sources[key]
        if last[0] is not link:
            last[:] = [link, link.to_canonical([weights[name] for name in link.hf])]
        return last[1][i]

    total = sum(math.prod(e.shape) for e in weights.entries.values()) * dtype.itemsize
    meter = Progress(f"import {hf_dir.name}", total, None, progress)
    with staged_output(output, overwrite) as staging:
        with single_process_megatron():
            write_weights(staging / checkpoint_io.WEIGHTS_DIR, config, canonical_tensor, dtype, meter)
        run_info = {"weights_only": True, "global_step": 0, "consumed_samples": 0,
                    "imported_from": str(hf_dir.resolve()), "dtype": str(dtype).removeprefix("torch.")}
        checkpoint_io.write_context(staging, config_to_hf(config), run_info, tokenizer_dir=None)
        tokenizer = checkpoint_io.tokenizer_path(staging)
        for name in CONTEXT_FILES:
            if (hf_dir / name).is_file():
                tokenizer.mkdir(exist_ok=True)
                shutil.copy2(hf_dir / name, tokenizer / name)
        checksums.write_manifest(staging)
    meter.finish()
    return Path(output)
