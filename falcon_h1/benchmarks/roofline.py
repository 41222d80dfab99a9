"""The component roofline of a training step: the best measured kernel time of each component, summed.

For a model config and a micro-batch it times, on this GPU, forward+backward of every component
the step cannot do without, each alone with the fastest implementation available here, launched
from a CUDA graph (the kernels' GPU time, without the CPU's launch gaps, which a step with
cuda_graph_impl="local" also avoids):

- gemm:      every linear layer (fused in-projection, out-projection, MLP fc1/fc2, output layer):
             the forward GEMM and the two backward GEMMs (input and weight gradients), cuBLAS;
- attention: causal GQA attention, the fastest of torch's SDPA backends;
- ssd_scan:  the fastest SSD implementation of benchmarks/kernels.py;
- conv1d:    causal conv1d + SiLU, the fastest of benchmarks/kernels.py (these two by the summed
             durations of their kernels where a graph cannot capture them);
- norms:     the two RMSNorms of each layer and the final one (torch's or the project's Triton
             kernel, the faster), and the Mamba gated RMSNorm;
- loss:      cross-entropy over the vocabulary, forward and backward (torch's on float32 logits or
             the project's fused kernel, the faster);
- optimizer: one fused AdamW update of every parameter (float32 main weights), timed on a slice
             and scaled, since it is memory bound.

Everything else a step runs (elementwise multipliers and gates, RoPE, residual adds, copies,
launch gaps) is overhead over this sum: `bench` reports step time / roofline.
One GPU, no model parallelism: a micro-batch of `micro_batch x seq_length` tokens, times the
number of micro-batches per step.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from falcon_h1.benchmarks.kernels import bench_conv, bench_ssd, mamba_shape_of
from falcon_h1.benchmarks.timing import cuda_median_ms, graphed_median_ms


def kernel_ms(fn, repeats: int = 20) -> float:
    """GPU time of `fn` replayed from a CUDA graph; launched eagerly if it cannot be captured."""
    ms = graphed_median_ms(fn, repeats)
    return ms if ms is not None else cuda_median_ms(fn, repeats)


def _best_forward_backward_ms(rows: list[dict]) -> tuple[float, str]:
    def ms(row):
        return row["forward_backward_graphed_ms"] or row["forward_backward_kernels_ms"]
    best = min(rows, key=ms)
    return ms(best), best["implementation"]


def _linear_ms(tokens: int, d_in: int, d_out: int) -> float:
    x = torch.randn(tokens, d_in, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(d_out, d_in, device="cuda", dtype=torch.bfloat16)
    g = torch.randn(tokens, d_out, device="cuda", dtype=torch.bfloat16)

    def fwd_bwd():
        x @ w.t()  # forward
        g @ w  # input gradient
        g.t() @ x  # weight gradient

    return kernel_ms(fwd_bwd)


def _attention_ms(batch: int, seq: int, heads: int, kv_heads: int, head_dim: int) -> tuple[float, str]:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    q = torch.randn(batch, heads, seq, head_dim, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    k = torch.randn(batch, kv_heads, seq, head_dim, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    v = torch.randn_like(k, requires_grad=True)
    grad = torch.randn_like(q)
    best = (float("inf"), "none")
    for backend in (SDPBackend.FLASH_ATTENTION, SDPBackend.CUDNN_ATTENTION, SDPBackend.EFFICIENT_ATTENTION):
        def step():
            with sdpa_kernel([backend]):
                F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=kv_heads != heads).backward(grad)
        try:
            ms = kernel_ms(step)
        except RuntimeError:  # backend unavailable for this shape or card
            continue
        best = min(best, (ms, backend.name.lower()))
    return best


def _rms_norm_ms(tokens: int, width: int) -> float:
    """The faster of torch's rms_norm and the project's Triton RMSNorm."""
    from falcon_h1.kernels.rms_norm import rms_norm

    x = torch.randn(tokens, width, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    w = torch.ones(width, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    grad = torch.randn_like(x)
    return min(kernel_ms(lambda: F.rms_norm(x, (width,), w, 1e-5).backward(grad)),
               kernel_ms(lambda: rms_norm(x, w, 1e-5).backward(grad)))


def _gated_norm_ms(tokens: int, width: int, group_size: int) -> float:
    from falcon_h1.kernels import gated_rms_norm

    y = torch.randn(tokens, width, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    z = torch.randn_like(y, requires_grad=True)
    w = torch.ones(width, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    grad = torch.randn_like(y)
    return kernel_ms(lambda: gated_rms_norm(y, z, w, eps=1e-5, group_size=group_size,
                                                 norm_before_gate=False).backward(grad))


def _loss_ms(tokens: int, vocab: int) -> float:
    """The faster of torch's cross-entropy (float32 logits) and the project's fused one."""
    from falcon_h1.kernels.cross_entropy import vocab_parallel_cross_entropy

    logits = torch.randn(tokens, vocab, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    labels = torch.randint(0, vocab, (tokens,), device="cuda")
    torch_ms = kernel_ms(lambda: F.cross_entropy(logits.float(), labels).backward(), repeats=10)
    scratch = torch.empty_like(logits, requires_grad=True)  # the fused backward overwrites its logits

    def fused():
        scratch.detach().copy_(logits.detach())
        torch.autograd.grad(vocab_parallel_cross_entropy(scratch, labels, 1.0, vocab).sum(), scratch)

    copy_ms = kernel_ms(lambda: scratch.detach().copy_(logits.detach()), repeats=10)
    return min(torch_ms, kernel_ms(fused, repeats=10) - copy_ms)


def _optimizer_ms(num_params: int, slice_elements: int = 2 ** 27) -> float:
    n = min(num_params, slice_elements)
    param = torch.zeros(n, device="cuda", requires_grad=True)
    param.grad = torch.randn(n, device="cuda")
    model_copy = torch.empty(n, device="cuda", dtype=torch.bfloat16)
    optimizer = torch.optim.AdamW([param], lr=1e-4, fused=True)

    def update():
        optimizer.step()
        model_copy.copy_(param.detach())  # the bf16 model weights follow the float32 main weights

    return cuda_median_ms(update, repeats=10) * num_params / n


def component_roofline(config, micro_batch: int, seq_length: int, micro_batches: int = 1) -> dict:
    """Milliseconds per training step of each component (see the module docstring) and their sum."""
    from falcon_h1.model.layout import mixer_layout
    from falcon_h1.model.param_count import parameter_count

    layout = mixer_layout(config, 1, 0)
    tokens, L = micro_batch * seq_length, config.num_layers
    h, ffn = config.hidden_size, config.ffn_hidden_size
    per_micro = {}
    per_micro["gemm"] = L * (_linear_ms(tokens, h, layout.in_proj_rows) + _linear_ms(tokens, layout.out_proj_cols, h)
                             + _linear_ms(tokens, h, 2 * ffn) + _linear_ms(tokens, ffn, h)) \
        + _linear_ms(tokens, h, config.vocab_size)
    attention_backend = None
    if layout.attention_heads:
        ms, attention_backend = _attention_ms(micro_batch, seq_length, layout.attention_heads, layout.kv_heads,
                                              layout.head_dim)
        per_micro["attention"] = L * ms
    ssd_impl = conv_impl = None
    norms = (2 * L + 1) * _rms_norm_ms(tokens, h)
    if layout.mamba_heads:
        shape = mamba_shape_of(config)
        ms, ssd_impl = _best_forward_backward_ms(bench_ssd(shape, micro_batch, seq_length, check=False, repeats=10))
        per_micro["ssd_scan"] = L * ms
        ms, conv_impl = _best_forward_backward_ms(bench_conv(shape, micro_batch, seq_length, check=False, repeats=10))
        per_micro["conv1d"] = L * ms
        if config.mamba_rms_norm:
            norms += L * _gated_norm_ms(tokens, config.d_ssm, config.d_ssm // config.mamba_num_groups)
    per_micro["norms"] = norms
    per_micro["loss"] = _loss_ms(tokens, config.vocab_size)
    parts = {name: ms * micro_batches for name, ms in per_micro.items()}
    parts["optimizer"] = _optimizer_ms(parameter_count(config, padded_vocab=True)["total"])
    torch.cuda.empty_cache()
    return dict(parts_ms=parts, total_ms=sum(parts.values()),
                implementations=dict(attention=attention_backend, ssd_scan=ssd_impl, conv1d=conv_impl))
