"""Generate text from a checkpoint: its model, its tokenizer, a list of prompts.

    from falcon_h1.inference.text import generate_from_checkpoint
    completions = generate_from_checkpoint("runs/tiny/checkpoints/step=0000300", ["def main("], 40)

One process (one GPU, or the CPU), whatever layout wrote the checkpoint; bfloat16 on GPU.
"""

from pathlib import Path

import torch

from falcon_h1.inference.generate import generate


def load_for_generation(checkpoint: str | Path, device: str | None = None):
    """(model, tokenizer) of a checkpoint, ready on `device` (default: cuda if present). Call inside
    falcon_h1.convert.dist_checkpoint.single_process_megatron()."""
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


def generate_from_checkpoint(checkpoint: str | Path, prompts: list[str], max_new_tokens: int = 64,
                             temperature: float = 0.0, top_p: float = 1.0, seed: int | None = None,
                             device: str | None = None) -> list[str]:
    """The completion of each prompt (text after the prompt), stopping at the tokenizer's EOS."""
    from falcon_h1.convert.dist_checkpoint import single_process_megatron

    with single_process_megatron():
        model, tokenizer = load_for_generation(checkpoint, device)
        ids = [tokenizer(p, add_special_tokens=False)["input_ids"] or [tokenizer.eos_token_id] for p in prompts]
        tokens = generate(model, ids, max_new_tokens, temperature=temperature, top_p=top_p,
                          eos_token_id=tokenizer.eos_token_id, seed=seed)
    return [tokenizer.decode(t, skip_special_tokens=True) for t in tokens]
