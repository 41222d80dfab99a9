"""The tasks a user runs, as plain functions: what recipes configure and the CLI launches.

    pretrain(model, data, trainer, resume)   train from scratch or continue a run
    finetune(model, data, trainer, resume)   train starting from a checkpoint's weights
    import_ckpt(source, output)              Hugging Face Falcon-H1 directory -> checkpoint
    export_ckpt(checkpoint, output)          checkpoint -> Hugging Face directory (LoRA adapters merged)
    merge_lora(checkpoint, output)           LoRA adapter checkpoint -> full checkpoint
    generate_text(checkpoint, prompts)       continue text prompts with a checkpoint
    evaluate(checkpoint, data)               validation loss / perplexity of a checkpoint
    bench(preset, seq_lengths, layout)       time the training step: tokens/s, TFLOP/s, MFU, memory

Each takes built objects (a FalconH1Module, a data module, a Trainer, an AutoResume), so the same
call works from a fiddle recipe (`run.Partial(pretrain, model=..., ...)`), the command line
(`falcon-h1 pretrain --factory tiny`, or `nemo falcon pretrain ...`: each is a nemo-run entrypoint
of the namespace "falcon") and a notebook.
"""

from pathlib import Path

import nemo_run as run
import pytorch_lightning as pl

from falcon_h1.run_context import FalconRunContext
from falcon_h1.training.checkpoint import AutoResume
from falcon_h1.training.pretrain import TrainingResult
from falcon_h1.training.pretrain import pretrain as _train


@run.cli.entrypoint(namespace="falcon", run_ctx_cls=FalconRunContext,
                    help="Pretrain a Falcon-H1 model (a recipe: --factory NAME)")
def pretrain(model: pl.LightningModule, data: pl.LightningDataModule, trainer: pl.Trainer,
             resume: AutoResume | None = None) -> TrainingResult:
    """Pretrain `model` on `data`; continues from the run's latest complete checkpoint if there
    is one (resume=AutoResume(resume_if_exists=False) to start over)."""
    return _train(model, data, trainer, resume)


@run.cli.entrypoint(namespace="falcon", run_ctx_cls=FalconRunContext,
                    help="Fine-tune from a checkpoint (a recipe: --factory NAME)")
def finetune(model: pl.LightningModule, data: pl.LightningDataModule, trainer: pl.Trainer,
             resume: AutoResume) -> TrainingResult:
    """Train `model` starting from the weights of `resume.restore_weights_from` (a checkpoint of
    ours or one made by `import_ckpt`); a fine-tuning run that was interrupted continues from its
    own latest checkpoint instead. With `model.peft` (LoRA) only adapters train and checkpoints
    hold only them; SFT data without a tokenizer_dir takes the checkpoint's tokenizer."""
    if resume is None or not (resume.restore_weights_from or resume.resume_from_path):
        raise ValueError("finetune needs the checkpoint to start from: resume=AutoResume(restore_weights_from=PATH) "
                         "(on the command line: resume.restore_weights_from=PATH)")
    if hasattr(data, "tokenizer_dir") and data.tokenizer_dir is None and resume.restore_weights_from:
        from falcon_h1.training.checkpoint_io import tokenizer_path

        # SFT data is tokenized with the tokenizer of the model being fine-tuned.
        tokenizer = tokenizer_path(resume.restore_weights_from)
        if not tokenizer.is_dir():
            raise ValueError(f"{resume.restore_weights_from} carries no tokenizer ({tokenizer}); set data.tokenizer_dir")
        data.tokenizer_dir = str(tokenizer)
    return _train(model, data, trainer, resume)


@run.cli.entrypoint(name="import", namespace="falcon", enable_executor=False,
                    help="Hugging Face Falcon-H1 directory -> checkpoint: source=DIR output=DIR")
def import_ckpt(source: str, output: str, overwrite: bool = False, dtype: str | None = None) -> Path:
    """Convert a local Hugging Face Falcon-H1 directory into a checkpoint (docs/conversion.md)."""
    import torch

    from falcon_h1.convert.hf_import import import_hf_checkpoint

    return import_hf_checkpoint(source, output, dtype=getattr(torch, dtype) if dtype else None, overwrite=overwrite)


@run.cli.entrypoint(name="export", namespace="falcon", enable_executor=False,
                    help="Checkpoint -> Hugging Face Falcon-H1 directory: checkpoint=DIR output=DIR")
def export_ckpt(checkpoint: str, output: str, overwrite: bool = False, dtype: str | None = None,
                max_shard_size: str = "5GB") -> Path:
    """Write a checkpoint as a Hugging Face Falcon-H1 directory (docs/conversion.md)."""
    import torch

    from falcon_h1.convert.hf_export import export_hf_checkpoint

    return export_hf_checkpoint(checkpoint, output, dtype=getattr(torch, dtype) if dtype else None,
                                max_shard_size=max_shard_size, overwrite=overwrite)


@run.cli.entrypoint(name="merge-lora", namespace="falcon", enable_executor=False,
                    help="LoRA adapter checkpoint + its base -> full checkpoint: checkpoint=DIR output=DIR")
def merge_lora(checkpoint: str, output: str, overwrite: bool = False, dtype: str | None = None) -> Path:
    """Fold a LoRA run's adapters into the base checkpoint they were trained on (docs/fine_tuning.md)."""
    import torch

    from falcon_h1.convert.merge_lora import merge_lora_checkpoint

    return merge_lora_checkpoint(checkpoint, output, overwrite=overwrite, dtype=getattr(torch, dtype) if dtype else None)


@run.cli.entrypoint(name="generate", namespace="falcon", enable_executor=False,
                    help="Continue text prompts with a checkpoint: checkpoint=DIR prompts='[\"...\"]' max_new_tokens=N")
def generate_text(checkpoint: str, prompts: list[str], max_new_tokens: int = 64, temperature: float = 0.0,
                  top_p: float = 1.0, seed: int | None = None) -> list[str]:
    """Greedy (temperature 0) or sampled continuations of `prompts` by the checkpoint's model, with
    its tokenizer; prints each prompt and its completion."""
    from falcon_h1.inference.text import generate_from_checkpoint

    completions = generate_from_checkpoint(checkpoint, prompts, max_new_tokens, temperature, top_p, seed)
    for prompt, completion in zip(prompts, completions):
        print(f"--- prompt: {prompt!r}\n{prompt}{completion}")
    return completions


@run.cli.entrypoint(name="evaluate", namespace="falcon", enable_executor=False,
                    help="Validation loss and perplexity of a checkpoint: checkpoint=DIR data=FILE.jsonl|PREFIX")
def evaluate(checkpoint: str, data: str, seq_length: int = 2048, batch_size: int = 4,
             max_rows: int | None = None) -> dict:
    """Mean loss per token and perplexity of the checkpoint's model on `data` (SFT or text jsonl,
    or a Megatron indexed dataset prefix), documents packed into rows of `seq_length`."""
    from falcon_h1.inference.evaluate import evaluate_checkpoint

    result = evaluate_checkpoint(checkpoint, data, seq_length, batch_size, max_rows)
    print(f"loss {result['loss']:.4f} | perplexity {result['perplexity']:.3f} | "
          f"{result['tokens']} tokens in {result['rows']} rows")
    return result


@run.cli.entrypoint(namespace="falcon", run_ctx_cls=FalconRunContext,
                    help="Time the training step of a preset: preset=1.5b seq_lengths=[4096,8192] output=bench.json")
def bench(preset: str = "1.5b", seq_lengths: list[int] | None = None, micro_batch_size: int = 1,
          micro_batches: int = 1, tensor_parallel: int = 1, pipeline_parallel: int = 1, context_parallel: int = 1,
          sequence_parallel: bool = False, steps: int = 10, warmup: int = 3, compare: bool = True,
          recompute: list[str] | None = None, cuda_graphs: bool = False, profile: bool = False,
          output: str = "bench.json") -> list[dict]:
    """Median training step (forward, backward, optimizer) of `preset` at each sequence length
    (default 4096 and 8192) and parallel layout: tokens/s, model TFLOP/s and MFU per GPU, peak
    memory; on one GPU also the component roofline and (compare=True) transformers' FalconH1 and a
    same-size Megatron GPT. `recompute`: what backward recomputes, "core_attn" and/or
    "ssd_scan", or "full" (whole layers); `cuda_graphs`: replay each layer's forward and backward from CUDA graphs
    (cuda_graph_impl="local", GPUs only); `profile`: print where one step's time goes. A table on
    stdout and the rows in `output` (falcon_h1/benchmarks/step.py). Multi-GPU layouts: add
    `run.executor=local run.executor.ntasks_per_node=N`."""
    from falcon_h1.benchmarks.step import recompute_overrides, run_bench

    return run_bench(preset, seq_lengths, micro_batch_size, micro_batches, tensor_parallel, pipeline_parallel,
                     context_parallel, sequence_parallel, steps, warmup, output, compare, profile,
                     **recompute_overrides(recompute or []),
                     **({"cuda_graph_impl": "local"} if cuda_graphs else {}))
