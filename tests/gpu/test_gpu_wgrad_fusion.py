"""The fused weight-gradient GEMM (falcon_h1/kernels/wgrad_fusion.py) on CUDA, bf16 operands into
a float32 main_grad: torch's addmm with out_dtype=float32, in place.

Tolerances (relative norm error): the GEMM alone, against float64, 1e-5 (float32 accumulation over
4096 tokens; the unfused path, its product rounded to bf16, is ~1e-3 off and must be 10x worse);
bf16 main_grad (wgrad_gemm_accum_fp16) 1e-2. The bf16 model under Megatron DDP, fused against
unfused, every parameter's main_grad within 1e-2 (the unfused one rounds each micro-batch's weight
gradient to bf16; everything else is the same computation).
"""

import pytest
import torch

from falcon_h1.kernels import wgrad_fusion
from falcon_h1.parity import relative_error
from tests.test_wgrad_fusion import FUSED_WEIGHTS, fusion_installed, main_grads_after_two_micro_batches  # noqa: F401

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def _operands(tokens=4096, rows=1536, cols=1024, seed=0):
    generator = torch.Generator(device="cuda").manual_seed(seed)
    x = torch.randn(tokens, cols, device="cuda", generator=generator).bfloat16()
    grad_output = torch.randn(tokens, rows, device="cuda", generator=generator).bfloat16()
    main_grad = torch.randn(rows, cols, device="cuda", generator=generator)
    return x, grad_output, main_grad


def _kernel_names(fn, warm_up) -> list[str]:
    """The CUDA kernels `fn()` launches, after `warm_up()` (cuBLAS's first-call set-up)."""
    warm_up()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as profile:
        fn()
        torch.cuda.synchronize()
    return [e.name for e in profile.events() if e.device_type == torch.autograd.DeviceType.CUDA]


def test_bf16_wgrad_accumulates_in_float32_in_place_with_one_gemm():
    x, grad_output, main_grad = _operands()
    product = grad_output.double().t() @ x.double()
    want = main_grad.double() + product
    unfused = main_grad + (grad_output.t() @ x).float()  # Megatron's bf16 wgrad, then DDP's add
    storage = main_grad.data_ptr()
    kernels = _kernel_names(lambda: wgrad_fusion.wgrad_gemm_accum_fp32(x, grad_output, main_grad),
                            lambda: wgrad_fusion.wgrad_gemm_accum_fp32(x, grad_output, main_grad.clone()))
    assert main_grad.data_ptr() == storage and main_grad.dtype == torch.float32
    error = relative_error(main_grad, want)
    assert error < 1e-5 and error * 10 < relative_error(unfused, want), (error, relative_error(unfused, want))
    # cuBLAS's GEMM (and its split-K reduction, if it picks one); no torch kernel: no temporary, no add.
    assert kernels and not any("at::native" in name for name in kernels), kernels


def test_row_scaled_runs_are_gemms_with_alpha_on_column_slices():
    x, grad_output, main_grad = _operands(rows=1032)
    row_scale = torch.cat([torch.full((n,), s) for n, s in ((512, 1.25), (256, 0.375), (8, 2.0), (256, 0.5))])
    want = main_grad.double() + row_scale.double()[:, None].cuda() * (grad_output.double().t() @ x.double())
    runs = wgrad_fusion.scale_runs(row_scale)
    assert len(runs) == 4
    kernels = _kernel_names(
        lambda: wgrad_fusion.wgrad_gemm_accum_fp32(x, grad_output, wgrad_fusion.row_scaled_main_grad(main_grad, runs)),
        lambda: wgrad_fusion.wgrad_gemm_accum_fp32(x, grad_output,
                                                   wgrad_fusion.row_scaled_main_grad(main_grad.clone(), runs)))
    assert relative_error(main_grad, want) < 1e-5
    assert not any("at::native" in name for name in kernels), kernels  # strided slices: no copies


def test_bf16_main_grad_accumulates_in_its_dtype():
    x, grad_output, main_grad = _operands()
    main_grad = main_grad.bfloat16()
    want = main_grad.double() + grad_output.double().t() @ x.double()
    wgrad_fusion.wgrad_gemm_accum_fp16(x, grad_output, main_grad)
    assert main_grad.dtype == torch.bfloat16 and relative_error(main_grad, want) < 1e-2


def test_bf16_model_main_grads_match_the_unfused_path(single_rank, fusion_installed):  # noqa: F811
    unfused, unfused_flags = main_grads_after_two_micro_batches(fused=False, device="cuda", bf16=True)
    fused, fused_flags = main_grads_after_two_micro_batches(fused=True, device="cuda", bf16=True)
    for name in fused:
        assert fused[name].dtype == torch.float32
        assert relative_error(fused[name], unfused[name]) < 1e-2, name
    fused_names = {name for name, added in fused_flags.items() if added}
    assert fused_names == {n for n in fused if n.endswith(FUSED_WEIGHTS)} and not any(unfused_flags.values())
