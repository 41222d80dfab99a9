"""Megatron's gradient-accumulation fusion through falcon_h1/kernels/wgrad_fusion.py gives the
gradients of the unfused path.

On CPU the drop-in runs with float32 operands (a plain addmm_: torch's float32-output addmm from
bf16 operands is CUDA-only; tests/gpu/test_gpu_wgrad_fusion.py checks that one). What is checked
here is the wiring: Megatron's fused backward, DDP's main_grad and grad_added_to_main_grad, the µP
row-scaled in-projection and fc1 (one GEMM per run of equal scale), the tied output layer (zeros
placeholder), over two micro-batches. Tolerance, float32: 1e-5 relative error per parameter.
"""

import pytest
import torch

from falcon_h1.kernels import wgrad_fusion
from falcon_h1.parity import relative_error

# µP multipliers all different, so the in-projection's rows fall into one run per block, and fc1's into two.
MULTIPLIERS = dict(key_multiplier=0.5, attention_in_multiplier=1.25, attention_out_multiplier=0.75,
                   ssm_in_multiplier=1.5, ssm_multipliers=(0.3, 0.4, 0.6, 0.7, 0.8), mlp_multipliers=(0.9, 0.6))
FUSED_WEIGHTS = ("in_proj.weight", "out_proj.weight", "linear_fc1.weight", "linear_fc2.weight",
                 "embedding.word_embeddings.weight")  # the last is the tied output layer's weight


@pytest.fixture
def fusion_installed(monkeypatch):
    """wgrad_fusion installed in Megatron for this test only."""
    from megatron.core.tensor_parallel import layers

    monkeypatch.setattr(layers, "_grad_accum_fusion_available", layers._grad_accum_fusion_available)
    monkeypatch.setattr(layers, "fused_weight_gradient_mlp_cuda",
                        getattr(layers, "fused_weight_gradient_mlp_cuda", None), raising=False)
    assert wgrad_fusion.install() and wgrad_fusion.installed()


def main_grads_after_two_micro_batches(fused: bool, device: str = "cpu", bf16: bool = False):
    """{name: main_grad} and {name: grad_added_to_main_grad} of a 2-layer tiny Falcon-H1 with µP
    multipliers and tied embeddings under Megatron DDP (float32 gradient buffers), after forward
    and backward of two micro-batches; the weights are the same whatever `fused`."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.transformer.module import Float16Module

    from falcon_h1.compat import cpu
    from falcon_h1.model.model import FalconH1Model
    from falcon_h1.model.presets import preset_config

    cpu.model_parallel_manual_seed(7)
    config = preset_config("tiny", num_layers=2, use_cpu_initialization=True, kernel_backend="torch",
                           gradient_accumulation_fusion=fused, bf16=bf16,
                           params_dtype=torch.bfloat16 if bf16 else torch.float32, **MULTIPLIERS)
    assert config.share_embeddings_and_output_weights
    model = FalconH1Model(config).to(device)
    if bf16:
        model = Float16Module(config, model)
    ddp = DistributedDataParallel(config, DistributedDataParallelConfig(grad_reduce_in_fp32=True, bucket_size=0),
                                  model)
    generator = torch.Generator().manual_seed(3)
    for _ in range(2):
        tokens = torch.randint(1, config.vocab_size, (2, 33), generator=generator).to(device)
        loss = ddp(tokens[:, :-1], labels=tokens[:, 1:])
        loss.float().sum().backward()
    params = dict(model.named_parameters())
    return ({name: p.main_grad.clone() for name, p in params.items()},
            {name: p.grad_added_to_main_grad for name, p in params.items()})


def test_wgrad_gemm_accumulates_each_run_of_rows_times_its_scale_in_place():
    generator = torch.Generator().manual_seed(0)
    x, grad_output = torch.randn(50, 8, generator=generator), torch.randn(50, 6, generator=generator)
    main_grad = torch.randn(6, 8, generator=generator)
    row_scale = torch.tensor([0.5, 0.5, 2.0, 2.0, 2.0, 0.25])
    runs = wgrad_fusion.scale_runs(row_scale)
    assert runs == ((0, 2, 0.5), (2, 5, 2.0), (5, 6, 0.25))
    want = main_grad.double() + row_scale.double()[:, None] * (grad_output.double().t() @ x.double())
    storage = main_grad.data_ptr()
    wgrad_fusion.wgrad_gemm_accum_fp32(x, grad_output, wgrad_fusion.row_scaled_main_grad(main_grad, runs))
    assert main_grad.data_ptr() == storage
    assert relative_error(main_grad, want) < 1e-6
    wgrad_fusion.wgrad_gemm_accum_fp32(x, grad_output, main_grad)  # no runs: the plain product
    assert relative_error(main_grad, want + grad_output.double().t() @ x.double()) < 1e-6


def test_megatron_refuses_the_fusion_until_installed_and_then_builds(single_rank, fusion_installed):
    from megatron.core.tensor_parallel import ColumnParallelLinear, layers
    from megatron.core.transformer import TransformerConfig

    config = TransformerConfig(num_layers=1, hidden_size=8, num_attention_heads=1, gradient_accumulation_fusion=True,
                               use_cpu_initialization=True)
    linear = ColumnParallelLinear(8, 4, config=config, init_method=torch.nn.init.zeros_, bias=False)
    assert linear.gradient_accumulation_fusion and layers.fused_weight_gradient_mlp_cuda is wgrad_fusion


def test_fused_main_grads_match_the_unfused_path(single_rank, fusion_installed):
    unfused, unfused_flags = main_grads_after_two_micro_batches(fused=False)
    fused, fused_flags = main_grads_after_two_micro_batches(fused=True)
    assert fused.keys() == unfused.keys()
    for name in fused:
        assert relative_error(fused[name], unfused[name]) < 1e-5, name
        assert unfused[name].norm() > 0, name
    # The fused path ran where expected: Megatron (or _ScaleRows) marked those weights as accumulated.
    fused_names = {name for name, added in fused_flags.items() if added}
    assert fused_names == {n for n in fused if n.endswith(FUSED_WEIGHTS)} and len(fused_names) == 4 * 2 + 1
    assert not any(unfused_flags.values())
