"""The bench's pure-attention row: a Megatron Core GPTModel of the preset's parameter count.

The GPT has the preset's layers, width, vocabulary and GQA groups, hidden_size / head_dim attention
heads, RoPE, RMSNorm and a SwiGLU MLP widened to the hybrid's parameter count
(presets.attention_only_fields). It is Megatron's own model and layer spec (local spec), with one
change: the attention core is torch SDPA (flash attention on GPU), the same core our mixer uses,
because the local spec's unfused softmax attention would be no fair baseline and Transformer
Engine is not a dependency. It trains with the same machinery as ours: bf16 params
(Float16Module), Megatron DDP with fp32 gradient reduction, the distributed optimizer and
Megatron's forward-backward schedule, timed the same way (median step after warm-up).
"""

from __future__ import annotations

import torch

from falcon_h1.benchmarks.timing import median_time


def gpt_model(preset: str, seq_length: int, on_gpu: bool):
    """(GPTModel, its TransformerConfig, the FalconH1Config of the same pure-attention shape)."""
    import torch.nn.functional as F
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer import TransformerConfig

    from falcon_h1.kernels.attention import SDPAttention
    from falcon_h1.model.config import FalconH1Config
    from falcon_h1.model.presets import attention_only_fields

    fields = FalconH1Config(**attention_only_fields(preset))
    config = TransformerConfig(
        num_layers=fields.num_layers, hidden_size=fields.hidden_size, num_attention_heads=fields.num_attention_heads,
        num_query_groups=fields.num_query_groups, kv_channels=fields.kv_channels,
        ffn_hidden_size=fields.ffn_hidden_size, gated_linear_unit=True, activation_func=F.silu,
        normalization="RMSNorm", layernorm_epsilon=fields.layernorm_epsilon, add_bias_linear=False,
        hidden_dropout=0.0, attention_dropout=0.0, bf16=on_gpu, params_dtype=torch.bfloat16 if on_gpu else torch.float32,
        use_cpu_initialization=not on_gpu, calculate_per_token_loss=True)
    spec = get_gpt_layer_local_spec(normalization="RMSNorm")
    spec.submodules.self_attention.submodules.core_attention = SDPAttention
    model = GPTModel(config, spec, vocab_size=fields.padded_vocab_size, max_sequence_length=seq_length,
                     position_embedding_type="rope", rotary_base=int(fields.rotary_base),
                     share_embeddings_and_output_weights=fields.share_embeddings_and_output_weights)
    return model, config, fields


def bench_gpt_step(preset: str, seq_length: int, micro_batch_size: int, steps: int, warmup: int,
                   gemm_tflops: float | None) -> dict:
    """One row (stack "megatron_gpt"); call inside a Megatron parallel state of one rank."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.pipeline_parallel import get_forward_backward_func
    from megatron.core.transformer.module import Float16Module

    from falcon_h1.compat import cpu
    from falcon_h1.training.flops import training_flops_per_step

    on_gpu = torch.cuda.is_available()
    cpu.model_parallel_manual_seed(1234)  # Megatron initialises weights from its RNG tracker
    model, config, fields = gpt_model(preset, seq_length, on_gpu)
    params = sum(p.numel() for p in model.parameters())
    if on_gpu:
        model.cuda()
        model = Float16Module(config, model)
    model = DistributedDataParallel(config, DistributedDataParallelConfig(
        grad_reduce_in_fp32=True, use_distributed_optimizer=True, bucket_size=None if on_gpu else 0), model)
    optimizer = get_megatron_optimizer(OptimizerConfig(
        optimizer="adam", lr=1e-5, bf16=on_gpu, params_dtype=torch.bfloat16 if on_gpu else torch.float32,
        use_distributed_optimizer=True, clip_grad=1.0), [model])
    device = torch.device("cuda" if on_gpu else "cpu")
    tokens = torch.randint(0, fields.padded_vocab_size, (micro_batch_size, seq_length), device=device)
    positions = torch.arange(seq_length, device=device).expand(micro_batch_size, -1)

    def forward_step(data_iterator, model):
        next(data_iterator)
        losses = model(tokens, positions, None, labels=tokens)

        def loss_func(output):
            total = output.float().sum()
            return total, torch.tensor(output.numel(), device=device, dtype=torch.int), {"lm loss": total.detach()}
        return losses, loss_func

    schedule = get_forward_backward_func()
    if on_gpu:
        torch.cuda.reset_peak_memory_stats()  # this stack's own peak, not the earlier rows'

    def step():
        model.zero_grad_buffer()
        optimizer.zero_grad()
        schedule(forward_step_func=forward_step, data_iterator=iter([None]), model=[model], num_microbatches=1,
                 seq_length=seq_length, micro_batch_size=micro_batch_size, forward_only=False)
        optimizer.step()

    try:
        step_time = median_time(step, steps, warmup)
    except torch.OutOfMemoryError:
        return dict(stack="megatron_gpt", parameters=params, seq_length=seq_length,
                    global_batch_size=micro_batch_size, error="out of memory")
    # Model FLOPs as for ours (docs/flops.md): the same count on the equal pure-attention config.
    token_count = micro_batch_size * seq_length
    tflops = training_flops_per_step(fields, micro_batch_size, seq_length) / step_time / 1e12
    return dict(stack="megatron_gpt", parameters=params, seq_length=seq_length, global_batch_size=micro_batch_size,
                step_time_s=step_time, tokens_per_sec_per_gpu=token_count / step_time, model_tflops_per_gpu=tflops,
                mfu=tflops / gemm_tflops if gemm_tflops else None,
                peak_memory_gib=torch.cuda.max_memory_allocated() / 2 ** 30 if on_gpu else None)

