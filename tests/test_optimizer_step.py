"""The optimizer step's passes over the weights and gradients, and what each must keep:

- the NaN/Inf check rides on the step's gradient norm: no pass of its own in backward, and a NaN
  or Inf in any rank's gradient still stops the step (every rank it reaches) before any update;
- the main weights reach the bf16 model weights in one launch, bit for bit as Megatron's copies;
- the Triton AdamW (falcon_h1/kernels/adamw.py), run here by Triton's interpreter, steps as
  torch's AdamW does and writes the bf16 model weights in the same pass, leaving the gradients;
- on a GPU (`pytest -m gpu`): the kernel against torch's fused CUDA AdamW, and the optimizer-step
  benchmark's comparison of today's path and the Triton one, at the tiny preset.
"""

import json
import subprocess
import sys

import pytest
import torch

from tests.conftest import REPO, torchrun


def _inner(optimizer):
    """The one Megatron optimizer inside what build_optimizer returns (chained or not)."""
    (inner,) = getattr(optimizer, "chained_optimizers", [optimizer])
    return inner


def _tiny_ddp(module, **ddp):
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.transformer import TransformerConfig

    config = TransformerConfig(num_layers=1, hidden_size=4, num_attention_heads=1, calculate_per_token_loss=True,
                               bf16=next(module.parameters()).dtype == torch.bfloat16)
    return config, DistributedDataParallel(config, DistributedDataParallelConfig(bucket_size=0, **ddp), module)


# ---------------------------------------------------------------- the NaN/Inf check on the gradient norm

def test_left_to_the_gradient_norm_the_check_takes_no_bucket_norms_and_a_nan_stops_the_step(single_rank):
    """Once the check is left to the gradient norm, backward queues no bucket norms; a NaN in a
    gradient makes the norm NaN, and the step raises naming the parameter, before any weight
    changes. Clean gradients step."""
    from megatron.core.distributed import finalize_model_grads

    from falcon_h1.training.optim import build_optimizer, falcon_h1_optimizer_config
    from falcon_h1.training.step import DeferredGradCheck, OptimizerStep

    module = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))
    config, ddp = _tiny_ddp(module, use_distributed_optimizer=True, check_for_nan_in_grad=True)
    check = DeferredGradCheck([ddp])
    optimizer = build_optimizer(falcon_h1_optimizer_config(lr=1e-2), [ddp], config)
    scaling = OptimizerStep(optimizer, check)  # leaves the check to the gradient norm
    for poisoned in (False, True):
        before = [p.detach().clone() for p in module.parameters()]
        ddp.zero_grad_buffer()
        ddp(torch.randn(5, 4)).square().sum().backward()
        if poisoned:
            module[1].weight.main_grad[0, 0] = float("nan")
        finalize_model_grads([ddp], None)
        assert check.pending == []  # no bucket norm was taken
        scaling.record_tokens(torch.tensor(5))
        if poisoned:
            with pytest.raises(RuntimeError, match=r"in the gradients \(gradient norm nan\).*module\.1\.weight"):
                scaling.step()
            assert all(torch.equal(a, b) for a, b in zip(before, module.parameters()))
        else:
            successful, norm, _ = scaling.step()
            assert successful and norm > 0
            assert not all(torch.equal(a, b) for a, b in zip(before, module.parameters()))


def test_a_gradient_the_norm_leaves_out_is_checked_apart(single_rank):
    """A parameter Megatron's norm does not count on this rank (here marked shared, as a tied
    embedding's copy on the last stage is; TP copies on TP ranks > 0 likewise) is checked by a
    norm of its own: an Inf there stops the step although the gradient norm is finite."""
    from megatron.core.distributed import finalize_model_grads

    from falcon_h1.training.optim import build_optimizer, falcon_h1_optimizer_config
    from falcon_h1.training.step import DeferredGradCheck, OptimizerStep, params_left_out_of_the_norm

    module = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))
    module[1].bias.shared = True
    config, ddp = _tiny_ddp(module, use_distributed_optimizer=True, check_for_nan_in_grad=True)
    check = DeferredGradCheck([ddp])
    optimizer = build_optimizer(falcon_h1_optimizer_config(lr=1e-2), [ddp], config)
    scaling = OptimizerStep(optimizer, check)
    ddp.zero_grad_buffer()
    ddp(torch.randn(5, 4)).square().sum().backward()
    module[1].bias.main_grad[0] = float("inf")
    finalize_model_grads([ddp], None)
    scaling.record_tokens(torch.tensor(5))
    with pytest.raises(RuntimeError, match=r"counts on another rank: inf\).*module\.1\.bias"):
        scaling.step()
    assert [p.shape for p in params_left_out_of_the_norm(optimizer)] == [module[1].bias.shape]


@pytest.mark.parametrize("tp", [1, 2])
def test_a_nan_in_one_ranks_gradient_stops_every_rank_it_reaches(tp):
    """Two ranks (gloo). DP=2: a NaN or Inf in either rank's gradient reaches the other through the
    reduction and the summed norm, so both stop (the bucket check stopped only the rank that
    held it). TP=2: a NaN in TP rank 1's rows of a split weight stops both; an Inf in TP rank 1's
    copy of a replicated weight, which the norm counts on rank 0 only, stops rank 1, as the bucket
    check did. Backward takes no bucket norms; a rank that stops has not changed its weights."""
    proc = torchrun("tests/distributed/nan_grad_check.py", 2, "--tp", str(tp))
    results = json.loads(proc.stdout.split("RESULTS", 1)[1])
    expected_stops = {1: {"clean": [], "nan in rank 1's split gradient": [0, 1],
                          "inf in rank 0's replicated gradient": [0, 1]},
                      2: {"clean": [], "nan in rank 1's split gradient": [0, 1],
                          "inf in rank 1's copy of the replicated gradient": [1]}}[tp]
    assert set(results) == set(expected_stops)
    for case, ranks in results.items():
        stopped = [rank for rank, outcome in enumerate(ranks) if outcome["error"] is not None]
        assert stopped == expected_stops[case], (case, ranks)
        for rank, outcome in enumerate(ranks):
            assert not outcome["bucket_norms_taken"]
            assert outcome["weights_changed"] == (rank not in stopped), (case, rank, outcome)
            if outcome["error"]:
                assert f"rank {rank}: NaN or Inf in the gradients" in outcome["error"]


# ---------------------------------------------------------------- main weights to model weights

@pytest.mark.parametrize("distributed", [True, False])
def test_main_weights_reach_the_model_in_one_launch_as_megatrons_copies_would(single_rank, distributed):
    """The distributed optimizer's main-weight shards (or the mixed-precision optimizer's main
    weights) cast into the bf16 model weights by one torch._foreach_copy_: the same bits as
    Megatron's copy_ per parameter, for values that round up, down and to even."""
    from falcon_h1.training.optim import build_optimizer, falcon_h1_optimizer_config, main_to_model_copies

    torch.manual_seed(0)
    module = torch.nn.Linear(40, 30).to(torch.bfloat16)
    config, ddp = _tiny_ddp(module, use_distributed_optimizer=distributed, grad_reduce_in_fp32=True)
    optimizer = _inner(build_optimizer(falcon_h1_optimizer_config(use_distributed_optimizer=distributed), [ddp],
                                       config, triton_adamw=False))
    copies = main_to_model_copies(optimizer)
    assert len(copies) == 2 and all(model.dtype == torch.bfloat16 for model in copies.values())
    for main in copies:
        main.data.copy_(torch.randn(main.shape) * 3)
        # A tie that rounds down to even, one that rounds up to even, and one below the halfway point.
        main.data.view(-1)[:3] = torch.tensor([1 + 2 ** -8, 1 + 3 * 2 ** -8, 1 + 2 ** -9])
    optimizer._copy_main_params_to_model_params()
    ours = [p.detach().clone() for p in module.parameters()]
    for p in module.parameters():
        p.data.zero_()
    type(optimizer)._copy_main_params_to_model_params(optimizer)  # Megatron's own, one copy_ each
    for got, want in zip(ours, module.parameters()):
        assert torch.equal(got.view(torch.int16), want.detach().view(torch.int16))
    assert sorted(p.view(-1)[0].item() for p in ours) == [1.0, 1.0]
    assert {tuple(p.view(-1)[:3].tolist()) for p in ours} == {(1.0, 1 + 2 ** -6, 1.0)}


def test_on_cpu_or_when_turned_off_torchs_fused_adamw_steps(single_rank):
    from falcon_h1.training.optim import TritonAdamW, build_optimizer, falcon_h1_optimizer_config

    module = torch.nn.Linear(4, 3).to(torch.bfloat16)
    config, ddp = _tiny_ddp(module, use_distributed_optimizer=True, grad_reduce_in_fp32=True)
    optimizer = _inner(build_optimizer(falcon_h1_optimizer_config(), [ddp], config))
    assert TritonAdamW.applies_to(optimizer)  # it would, on CUDA
    assert "step" not in vars(optimizer.optimizer)  # torch's own step: the parameters are on the CPU


# ---------------------------------------------------------------- the Triton AdamW, interpreted

KERNEL_AGAINST_TORCH = r"""
import json, torch
from falcon_h1.kernels.adamw import MultiTensorAdamW

torch.manual_seed(0)
results = []
# Sizes within one block, across several, and a partial last block; one set of tensors 16-byte
# aligned, one of views one element into larger tensors (the kernel's unaligned path).
for offset in (0, 1):
    sizes = [5, 4096, 2 * 4096 + 17, 300]
    def tensors(scale=1.0):
        return [(torch.randn(n + offset) * scale)[offset:] for n in sizes]
    for weight_decay, scale in ((0.1, 7.0), (0.0, None)):
        weights = tensors()
        reference = [w.clone().requires_grad_() for w in weights]
        exp_avgs, exp_avg_sqs = [t.zero_() for t in tensors()], [t.zero_() for t in tensors()]
        models = [torch.empty(n, dtype=torch.bfloat16) for n in sizes]
        steps = [torch.zeros((), dtype=torch.float32) for _ in sizes]
        torch_adamw = torch.optim.AdamW(reference, lr=1e-2, betas=(0.9, 0.95), eps=1e-8, weight_decay=weight_decay,
                                        foreach=False)
        kernel = MultiTensorAdamW()
        grads_unchanged = True
        for step in range(4):
            grads = tensors(5.0)
            before = [g.clone() for g in grads]
            kernel.step(weights, grads, exp_avgs, exp_avg_sqs, steps, models, lr=1e-2, beta1=0.9, beta2=0.95,
                        weight_decay=weight_decay, eps=1e-8,
                        grad_scale=torch.tensor(scale) if scale is not None else None)
            grads_unchanged &= all(torch.equal(g, b) for g, b in zip(grads, before))
            for r, g in zip(reference, grads):
                r.grad = g / scale if scale is not None else g.clone()
            torch_adamw.step()

        def rel(a, b):
            return ((a - b).abs().max() / b.abs().max()).item()

        for i, r in enumerate(reference):
            state = torch_adamw.state[r]
            results.append(dict(offset=offset, weight_decay=weight_decay, size=sizes[i],
                                weight=rel(weights[i], r.detach()), exp_avg=rel(exp_avgs[i], state["exp_avg"]),
                                exp_avg_sq=rel(exp_avg_sqs[i], state["exp_avg_sq"]),
                                model_is_rounded_weight=torch.equal(models[i].view(torch.int16),
                                                                    weights[i].to(torch.bfloat16).view(torch.int16)),
                                steps=steps[i].item(), grads_unchanged=grads_unchanged))
print("RESULTS", json.dumps(results))
"""


def test_the_kernel_steps_as_torchs_adamw_and_writes_the_rounded_weight():
    """Four steps of several tensors (within a block, over blocks, a partial block; aligned or not;
    with weight decay and a grad_scale, and without either), against torch.optim.AdamW on the
    same tensors with the gradients divided beforehand: weights and moments within 1e-6 of the
    largest element (torch's fused CUDA arithmetic, float32 betas, against the CPU loop's), the
    bf16 model weight exactly the float32 weight rounded to nearest even, the gradients left as
    they were, each step counted."""
    from tests.test_triton_kernels_interpreted import interpreted

    results = interpreted(KERNEL_AGAINST_TORCH)
    assert len(results) == 16
    for case in results:
        assert max(case["weight"], case["exp_avg"], case["exp_avg_sq"]) < 1e-6, case
        assert case["model_is_rounded_weight"] and case["grads_unchanged"] and case["steps"] == 4.0, case


MEGATRON_STEP = r"""
import json, torch
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
from megatron.core.transformer import TransformerConfig
from falcon_h1.single_process import single_process_megatron
from falcon_h1.training.step import OptimizerStep
from falcon_h1.training.optim import (TritonAdamW, build_optimizer, copy_main_params_in_one_launch,
                                      falcon_h1_optimizer_config, main_to_model_copies)

single_process_megatron(seed=1234)
config = TransformerConfig(num_layers=1, hidden_size=4, num_attention_heads=1, calculate_per_token_loss=True,
                           bf16=True, params_dtype=torch.bfloat16)
runs = {}
for triton in (False, True):
    torch.manual_seed(0)
    module = torch.nn.Sequential(torch.nn.Linear(100, 90), torch.nn.Linear(90, 7)).to(torch.bfloat16)
    ddp = DistributedDataParallel(config, DistributedDataParallelConfig(
        use_distributed_optimizer=True, grad_reduce_in_fp32=True, bucket_size=0), module)
    optimizer = build_optimizer(falcon_h1_optimizer_config(lr=1e-2), [ddp], config)
    (inner,) = getattr(optimizer, "chained_optimizers", [optimizer])
    if triton:  # what build_optimizer does on CUDA
        assert TritonAdamW.applies_to(inner)
        copies = main_to_model_copies(inner)
        copy_main_params_in_one_launch(inner, copies, TritonAdamW(inner, copies))
    scaling = OptimizerStep(optimizer)
    norms, grads_after = [], []
    for step, size in enumerate((30.0, 30.0, 0.01)):  # clipped twice, then not
        generator = torch.Generator().manual_seed(step)
        for param in module.parameters():
            param.main_grad.copy_(torch.randn(param.shape, generator=generator) * size)
        sums = [p.main_grad.clone() for p in module.parameters()]
        finalize_model_grads([ddp], None)
        scaling.record_tokens(torch.tensor(7))
        successful, norm, _ = scaling.step()
        assert successful
        norms.append(norm)
        grads_after.append(all(torch.equal(p.main_grad, s) for p, s in zip(module.parameters(), sums)))
    mains = [p for group in optimizer.optimizer.param_groups for p in group["params"]]
    state = optimizer.optimizer.state
    runs[triton] = dict(norms=norms, grads_left_as_sums=grads_after, mains=[m.detach().clone() for m in mains],
                        exp_avgs=[state[m]["exp_avg"].clone() for m in mains],
                        exp_avg_sqs=[state[m]["exp_avg_sq"].clone() for m in mains],
                        steps=[state[m]["step"].item() for m in mains],
                        models=[p.detach().clone() for p in module.parameters()],
                        model_order=[copies[m] for m in mains] if triton else None)

def rel(a, b):
    return max(((x - y).abs().max() / y.abs().max()).item() for x, y in zip(a, b))

torch_run, triton_run = runs[False], runs[True]
print("RESULTS", json.dumps(dict(
    norms=[torch_run["norms"], triton_run["norms"]],
    grads_left_as_sums=[torch_run["grads_left_as_sums"], triton_run["grads_left_as_sums"]],
    mains=rel(triton_run["mains"], torch_run["mains"]), exp_avgs=rel(triton_run["exp_avgs"], torch_run["exp_avgs"]),
    exp_avg_sqs=rel(triton_run["exp_avg_sqs"], torch_run["exp_avg_sqs"]),
    steps=[torch_run["steps"], triton_run["steps"]],
    models_are_rounded_mains=all(torch.equal(model.view(torch.int16), main.to(torch.bfloat16).view(torch.int16))
                                 for model, main in zip(triton_run["model_order"], triton_run["mains"])),
    models_against_torch_path=rel([m.float() for m in triton_run["models"]], [m.float() for m in torch_run["models"]]),
)))
"""


def test_megatrons_step_with_the_triton_adamw_matches_torchs_fused_adamw():
    """Megatron's distributed optimizer over a bf16 model, stepped by OptimizerStep three times
    (clipped, clipped, not), once with torch's fused AdamW and its copy, once with TritonAdamW
    (interpreted): the same gradient norms; main weights and moments within 1e-6; the bf16 model
    weights are the main weights rounded, with nothing left for the copy to do; the step counts
    in torch's state; the gradients stay summed over tokens (torch's kernel divides them)."""
    from tests.test_triton_kernels_interpreted import interpreted

    results = interpreted(MEGATRON_STEP)
    torch_norms, triton_norms = results["norms"]
    assert triton_norms == torch_norms
    assert results["grads_left_as_sums"] == [[False, False, False], [True, True, True]]
    assert max(results["mains"], results["exp_avgs"], results["exp_avg_sqs"]) < 1e-6, results
    assert results["steps"] == [[3.0] * 4, [3.0] * 4]
    assert results["models_are_rounded_mains"]
    assert results["models_against_torch_path"] < 1e-2  # a bf16 step at most, where the mains straddle a rounding


# ---------------------------------------------------------------- on the GPU

@pytest.mark.gpu
@pytest.mark.parametrize("offset", [0, 1])
def test_the_kernel_against_torchs_fused_cuda_adamw(offset):
    """On the GPU, against torch.optim.AdamW(fused=True) given the same grad_scale, five steps of
    tensors from 1 to 3M elements (16-byte aligned, or all one element off: the kernel's vector and
    scalar paths): weights and moments within float32 rounding of torch's (printed: the share of
    elements with the very same bits), the bf16 weight the float32 weight rounded, the gradients
    untouched, the steps counted."""
    from falcon_h1.benchmarks.optimizer_step import compare
    from falcon_h1.kernels.adamw import MultiTensorAdamW

    torch.manual_seed(0)
    sizes = [1, 7, 4096, 4097, 65536 + 3, 1 << 20, 3 * (1 << 20) + 5]

    def tensors(scale=1.0):
        return [(torch.randn(n + offset, device="cuda") * scale)[offset:] for n in sizes]

    weights = tensors()
    reference = [w.clone().requires_grad_() for w in weights]
    exp_avgs, exp_avg_sqs = [t.zero_() for t in tensors()], [t.zero_() for t in tensors()]
    models = [torch.empty(n + offset, device="cuda", dtype=torch.bfloat16)[offset:] for n in sizes]
    steps = [torch.zeros((), device="cuda") for _ in sizes]
    torch_adamw = torch.optim.AdamW(reference, lr=3e-4, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1, fused=True)
    scale = torch.tensor(4096.0 / 0.37, device="cuda")
    torch_adamw.grad_scale = scale
    kernel = MultiTensorAdamW()
    for _ in range(5):
        grads = tensors(50.0)
        before = [g.clone() for g in grads]
        for r, g in zip(reference, grads):
            r.grad = g.clone()
        kernel.step(weights, grads, exp_avgs, exp_avg_sqs, steps, models, lr=3e-4, beta1=0.9, beta2=0.95,
                    weight_decay=0.1, eps=1e-8, grad_scale=scale)
        torch_adamw.step()
        assert all(torch.equal(g, b) for g, b in zip(grads, before))
    report = dict(weight=compare(weights, [r.detach() for r in reference]),
                  exp_avg=compare(exp_avgs, [torch_adamw.state[r]["exp_avg"] for r in reference]),
                  exp_avg_sq=compare(exp_avg_sqs, [torch_adamw.state[r]["exp_avg_sq"] for r in reference]))
    print(json.dumps(report))
    for name, result in report.items():
        assert result["max_rel"] < 1e-6, (name, report)
    for model, weight in zip(models, weights):
        assert torch.equal(model.view(torch.int16), weight.to(torch.bfloat16).view(torch.int16))
    assert all(s.item() == 5.0 for s in steps)


@pytest.mark.gpu
def test_the_benchmarks_comparison_of_the_two_paths_at_a_small_size(tmp_path):
    """falcon_h1.benchmarks.optimizer_step on the tiny preset: one step of today's path and of the
    Triton path from the same state agree (main weights and moments within float32 rounding, the
    bf16 weights the rounded main weights)."""
    out = tmp_path / "optimizer_step.json"
    subprocess.run([sys.executable, "-m", "falcon_h1.benchmarks.optimizer_step", "--preset", "tiny", "--repeats", "3",
                    "--json", str(out)], check=True, cwd=REPO, timeout=600)
    agreement = json.loads(out.read_text())["agreement"]
    worst = max(agreement["main_max_rel"], agreement["exp_avg_max_rel"], agreement["exp_avg_sq_max_rel"])
    assert worst < 1e-5, agreement
    assert agreement["triton_model_is_rounded_main"], agreement
