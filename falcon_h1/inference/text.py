"""Generate text from a checkpoint: its model, its tokenizer, a list of prompts.

    from falcon_h1.inference.text import generate_from_checkpoint
    completions = generate_from_checkpoint("runs/tiny/checkpoints/step=0000300", ["def main("], 40)

One process (one GPU, or the CPU), whatever layout wrote the checkpoint; bfloat16 on GPU.
"""

import json
from pathlib import Path

import torch

from falcon_h1.inference.generate import generate


def load_for_generation(checkpoint: str | Path, device: str | None = None):
    """(model, tokenizer) of a checkpoint, ready on `device` (default: cuda if present). Call inside
    falcon_h1.single_process.single_process_megatron()."""
    from falcon_h1.data.preprocess import load_tokenizer
    from falcon_h1.model.lora import LoRA, apply_lora, merge_lora
    from falcon_h1.model.model import FalconH1Model
    from falcon_h1.training import checkpoint_io

    path = checkpoint_io.check_loadable(checkpoint)
    tokenizer_dir = checkpoint_io.tokenizer_path(path)
    if not tokenizer_dir.is_dir():
        raise checkpoint_io.CheckpointError(f"checkpoint {path} carries no tokenizer ({tokenizer_dir}); "
                                            "generate from token ids with falcon_h1.inference.generate instead")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    config = checkpoint_io.checkpoint_model_config(path, use_cpu_initialization=True)
    model = FalconH1Model(config)
    scheme = checkpoint_io.lora_of(path)
    if scheme is not None:  # LoRA adapters: loaded with their base, then folded into it
        apply_lora(model, LoRA.from_dict(scheme))
    checkpoint_io.load_model_weights([model], path)
    if scheme is not None:
        merge_lora(model)
    model = model.to(device)
    if device.startswith("cuda"):
        model = model.to(torch.bfloat16)
    return model.eval(), load_tokenizer(tokenizer_dir)


def stop_token_ids(checkpoint: str | Path, config, tokenizer) -> int | list[int] | None:
    """The eos id(s) generation stops at, those transformers' generate stops at on the checkpoint's
    Hugging Face export: its generation_config.json's if it carries one (an imported model), else
    its config.json's, which export makes the tokenizer's."""
    from falcon_h1.convert.hf_export import special_token_ids
    from falcon_h1.training import checkpoint_io

    path = checkpoint_io.check_loadable(checkpoint)
    defaults = checkpoint_io.tokenizer_path(path) / "generation_config.json"
    eos = json.loads(defaults.read_text()).get("eos_token_id") if defaults.is_file() else None
    return eos if eos is not None else special_token_ids(config, tokenizer, f"checkpoint {path}")[0]["eos_token_id"]


def generate_tokens_from_checkpoint(checkpoint: str | Path, prompts: list[str], max_new_tokens: int = 64,
                                    temperature: float = 0.0, top_p: float = 1.0, seed: int | None = None,
                                    device: str | None = None):
    """(the token ids generated after each prompt, ending with eos where it stopped there; the
    tokenizer that decodes them)."""
    from falcon_h1.single_process import single_process_megatron

    with single_process_megatron():
        model, tokenizer = load_for_generation(checkpoint, device)
        ids = [tokenizer(p, add_special_tokens=False)["input_ids"] or [tokenizer.eos_token_id] for p in prompts]
        tokens = generate(model, ids, max_new_tokens, temperature=temperature, top_p=top_p,
                          eos_token_id=stop_token_ids(checkpoint, model.config, tokenizer),
                          seed=seed)
    return tokens, tokenizer


def generate_from_checkpoint(checkpoint: str | Path, prompts: list[str], max_new_tokens: int = 64,
                             temperature: float = 0.0, top_p: float = 1.0, seed: int | None = None,
                             device: str | None = None) -> list[str]:
    """The completion of each prompt (text after the prompt), stopping where transformers would on
    the checkpoint's export (stop_token_ids)."""
    tokens, tokenizer = generate_tokens_from_checkpoint(checkpoint, prompts, max_new_tokens, temperature, top_p, seed,
                                                        device)
    return [tokenizer.decode(t, skip_special_tokens=True) for t in tokens]
