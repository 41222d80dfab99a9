"""Generation speed with the hybrid cache: prefill and decode tokens/s on one GPU.

    python -m falcon_h1.benchmarks.decode --preset 0.5b --batch-sizes 1 8 32 --prompt-len 512 --new-tokens 256

A randomly initialized model of the preset's shape in bf16 generates greedily from random prompts
of one length (no EOS, so every row decodes all tokens), timed with CUDA synchronisation, median
of repeats after a warm-up: the prefill (every prompt through the model, filling the attention KV
and Mamba conv/SSM states) and the decode (each step one token per row against the cache).
decode tokens/s = batch x (new tokens - 1) / decode time. With --hf, transformers'
FalconH1ForCausalLM of the same shape (random weights) runs `generate` (its own cache) on the
same prompts for comparison; it reports whether it ran its Mamba kernel path (hf_step.py).
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings

from falcon_h1.benchmarks.timing import median_time


def measure(run_prefill, run_generate, batch: int, new_tokens: int, repeats: int) -> dict:
    """Median prefill and full-generation times -> prefill and decode rates."""
    total = median_time(run_generate, repeats, warmup=1)  # warm-up: kernel compilation and autotuning
    prefill = median_time(run_prefill, repeats)
    decode = max(total - prefill, 1e-9)
    return dict(prefill_s=prefill, decode_s=decode, total_s=total,
                decode_tokens_per_s=batch * (new_tokens - 1) / decode,
                decode_ms_per_step=1e3 * decode / (new_tokens - 1))


def ours(preset: str, batch: int, prompt_len: int, new_tokens: int, repeats: int, seed: int) -> dict:
    import torch

    from falcon_h1.inference.generate import generate
    from falcon_h1.model.model import FalconH1Model
    from falcon_h1.model.presets import preset_config

    config = preset_config(preset, params_dtype=torch.bfloat16, bf16=True)
    model = FalconH1Model(config).cuda().eval()
    prompts = torch.randint(0, config.vocab_size, (batch, prompt_len),
                            generator=torch.Generator().manual_seed(seed)).tolist()
    row = measure(lambda: generate(model, prompts, 1), lambda: generate(model, prompts, new_tokens),
                  batch, new_tokens, repeats)
    return row


def transformers_generate(preset: str, batch: int, prompt_len: int, new_tokens: int, repeats: int, seed: int) -> dict:
    import torch

    from falcon_h1.benchmarks.hf_step import transformers_modeling
    from falcon_h1.model.config import config_to_hf
    from falcon_h1.model.presets import preset_config

    module, mamba_path = transformers_modeling()
    config = module.FalconH1Config(**config_to_hf(preset_config(preset)))
    with torch.device("cuda"):
        model = module.FalconH1ForCausalLM(config).to(torch.bfloat16).eval()
    ids = torch.randint(0, config.vocab_size, (batch, prompt_len), generator=torch.Generator().manual_seed(seed)).cuda()

    def run(n):
        with torch.no_grad():
            model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                           do_sample=False, pad_token_id=0)

    row = measure(lambda: run(1), lambda: run(new_tokens), batch, new_tokens, repeats)
    row["mamba_path"] = mamba_path
    return row


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m falcon_h1.benchmarks.decode", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="0.5b", help="model shape (falcon_h1.model.presets), default 0.5b")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--prompt-len", type=int, default=512)
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--hf", action="store_true", help="also time transformers' generate")
    parser.add_argument("--json", help="write the rows here")
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore")
    import torch

    from falcon_h1.single_process import single_process_megatron

    if not torch.cuda.is_available():
        parser.error("the decode benchmark needs a GPU")
    rows = []
    with single_process_megatron():
        from megatron.core import tensor_parallel

        tensor_parallel.model_parallel_cuda_manual_seed(1234)  # Megatron's GPU weight init draws from it
        for batch in args.batch_sizes:
            runners = [("falcon_h1", ours)] + ([("transformers", transformers_generate)] if args.hf else [])
            for name, runner in runners:
                row = dict(stack=name, preset=args.preset, batch=batch, prompt_len=args.prompt_len,
                           new_tokens=args.new_tokens, device=torch.cuda.get_device_name())
                try:
                    row.update(runner(args.preset, batch, args.prompt_len, args.new_tokens, args.repeats, seed=batch))
                except Exception as error:  # the reference failing must not hide our numbers
                    if name == "falcon_h1":
                        raise
                    print(f"{name:12s} batch {batch:3d}: failed: {error!r}", flush=True)
                    rows.append(dict(row, error=repr(error)))
                    continue
                finally:
                    torch.cuda.empty_cache()  # the runner's model is gone
                rows.append(row)
                print(f"{name:12s} batch {batch:3d}: prefill {row['prefill_s'] * 1e3:8.1f} ms, decode "
                      f"{row['decode_ms_per_step']:6.2f} ms/step = {row['decode_tokens_per_s']:9.1f} tokens/s"
                      + (f" (Mamba path: {row['mamba_path']})" if "mamba_path" in row else ""), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
