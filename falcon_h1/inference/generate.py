"""Text generation with the hybrid cache: prefill each prompt, then decode the batch token by token.

    tokens = generate(model, [[1, 52, 9], [1, 7]], max_new_tokens=20)               # greedy
    tokens = generate(model, prompts, 20, temperature=0.8, top_p=0.95, seed=0)       # sampling

`model` is a FalconH1Model holding the whole network (one pipeline stage; TP works as in
training). Prompts may have different lengths: each is prefilled alone, so no token attends to
padding and no Mamba state sees any; decoding then advances every sequence at its own position.
"""

import torch

from falcon_h1.model.decode_cache import HybridCache


def sample_next(logits: torch.Tensor, temperature: float, top_p: float,
                generator: torch.Generator | None) -> torch.Tensor:
    """Next token per row from logits [b, vocab]: argmax at temperature 0, else a draw from the
    temperature-scaled distribution cut to its top-p nucleus."""
    if temperature <= 0.0:
        return logits.argmax(dim=-1)
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p < 1.0:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        outside = sorted_probs.cumsum(dim=-1) - sorted_probs > top_p  # keep the token crossing top_p
        sorted_probs = sorted_probs.masked_fill(outside, 0.0)
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_probs)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@torch.no_grad()
def generate(model, prompts: list[list[int]], max_new_tokens: int, temperature: float = 0.0, top_p: float = 1.0,
             eos_token_id: int | list[int] | None = None, seed: int | None = None) -> list[list[int]]:
    """The tokens generated after each prompt (without the prompt), at most `max_new_tokens`,
    stopping a row at `eos_token_id` (included; any of them if a list), as transformers' generate."""
    stops = set() if eos_token_id is None else {eos_token_id} if isinstance(eos_token_id, int) else set(eos_token_id)
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("generate needs at least one prompt, each of at least one token")
    vocab = model.config.vocab_size
    if any(not 0 <= t < vocab for p in prompts for t in p):
        raise ValueError(f"prompt token ids must be in [0, {vocab})")
    device = next(model.parameters()).device
    generator = torch.Generator(device=device).manual_seed(seed) if seed is not None else None
    was_training = model.training
    model.eval()
    cache = HybridCache(len(prompts), max(len(p) for p in prompts) + max_new_tokens, device)
    try:
        last = []
        for row, prompt in enumerate(prompts):
            cache.start_prefill(row)
            logits = model(torch.tensor([prompt], device=device), inference_context=cache)
            cache.advance(len(prompt))
            last.append(logits[0, -1, :vocab])
        tokens = sample_next(torch.stack(last), temperature, top_p, generator)
        outputs = [[int(t)] for t in tokens]
        finished = [out[-1] in stops for out in outputs]
        cache.start_decode()
        for _ in range(max_new_tokens - 1):
            if all(finished):
                break
            logits = model(tokens[:, None], inference_context=cache)
            cache.advance(1)
            tokens = sample_next(logits[:, -1, :vocab], temperature, top_p, generator)
            for row, token in enumerate(tokens.tolist()):
                if not finished[row]:
                    outputs[row].append(token)
                    finished[row] = token in stops
        return outputs
    finally:
        model.train(was_training)
