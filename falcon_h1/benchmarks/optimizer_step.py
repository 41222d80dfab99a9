"""One optimizer step of a Falcon-H1 model on one GPU: today's path against the Triton AdamW.

    python -m falcon_h1.benchmarks.optimizer_step --preset 1.5b [--repeats 20] [--json out.json]

Builds the model as training does (bf16 weights, Megatron DDP with float32 gradient buckets, the
distributed optimizer, DP=1), fills the gradients with random values, and times with CUDA events
the median of --repeats calls after --warmup, the gradients (and for the AdamW alone the grad
scale) set again before each call, outside the timing:

- "bucket norms": the norm of every gradient bucket that the NaN/Inf check took during backward
  (pass (a); gone now that the check rides on the optimizer step's gradient norm);
- "gradient norm": Megatron's gradient norm and its host sync (pass (c), in every path);
- per path, "adamw + copy" (Megatron's step_with_ready_grads: the AdamW, the main-to-model copy,
  the parameter sync, a no-op at DP=1) and "step" (OptimizerStep.step: norm, sync, clip, both):
    today:        torch's fused AdamW, writing the gradient back, then Megatron's copy_ per weight;
    foreach copy: torch's fused AdamW, then one torch._foreach_copy_ (build_optimizer(triton_adamw=False));
    triton:       the Triton AdamW, writing the bf16 weights in its pass (the default on CUDA).

GB/s counts the bytes a path must move per parameter (bucket norms and gradient norm 4 each;
torch's AdamW with a grad_scale 32, the copy 6; the Triton AdamW 30) over the measured time.
Last, one step of "today" and of "triton" from the same state: how far apart their main weights,
moments and bf16 weights are.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys

import torch

BYTES_PER_PARAM = {"bucket norms": 4, "gradient norm": 4, "today: adamw + copy": 38, "today: step": 42,
                   "foreach copy: adamw + copy": 38, "foreach copy: step": 42, "triton: adamw + copy": 30,
                   "triton: step": 34}


def event_median_ms(fn, prepare, repeats: int, warmup: int) -> float:
    """Median GPU milliseconds of fn() between two CUDA events, prepare() run (untimed) before each."""
    times = []
    for i in range(warmup + repeats):
        prepare()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        if i >= warmup:
            times.append(start.elapsed_time(end))
    return statistics.median(times)


def build_model(preset: str):
    """The preset's model, bf16, in Megatron DDP as MegatronStrategy wraps it on a GPU."""
    import torch.distributed as dist
    from megatron.core import parallel_state
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.transformer.module import Float16Module

    from falcon_h1.compat.cpu import model_parallel_manual_seed
    from falcon_h1.model.model import FalconH1Model
    from falcon_h1.model.presets import preset_config

    dist.init_process_group("nccl", store=dist.HashStore(), rank=0, world_size=1,
                            device_id=torch.device("cuda", torch.cuda.current_device()))
    parallel_state.initialize_model_parallel()
    model_parallel_manual_seed(0)
    config = preset_config(preset, bf16=True, params_dtype=torch.bfloat16, pipeline_dtype=torch.bfloat16,
                           calculate_per_token_loss=True)
    model = FalconH1Model(config).cuda()
    ddp_config = DistributedDataParallelConfig(grad_reduce_in_fp32=True, overlap_grad_reduce=True,
                                               overlap_param_gather=False, use_distributed_optimizer=True,
                                               check_for_nan_in_grad=True)
    ddp = DistributedDataParallel(config=config, ddp_config=ddp_config, module=Float16Module(config, model))
    return config, ddp


def build_step(ddp, config, triton_adamw: bool, megatron_copy: bool = False):
    """Megatron's optimizer as build_optimizer makes it, and the OptimizerStep that steps it;
    `megatron_copy` puts back Megatron's copy_ per weight (today's path)."""
    from falcon_h1.training.step import OptimizerStep
    from falcon_h1.training.optim import build_optimizer, falcon_h1_optimizer_config

    optimizer = build_optimizer(falcon_h1_optimizer_config(lr=3e-4), [ddp], config, triton_adamw=triton_adamw)
    inners = getattr(optimizer, "chained_optimizers", [optimizer])
    if megatron_copy:
        for inner in inners:
            del inner._copy_main_params_to_model_params  # the class's method again
    return optimizer, inners, OptimizerStep(optimizer)


def optimizer_state(inners) -> tuple[list, list, list]:
    """(main weights, exp_avg, exp_avg_sq) of every parameter, in the optimizers' order."""
    mains = [p for inner in inners for group in inner.optimizer.param_groups for p in group["params"]]
    states = [inner.optimizer.state for inner in inners for group in inner.optimizer.param_groups
              for _ in group["params"]]
    return mains, [s[p]["exp_avg"] for s, p in zip(states, mains)], [s[p]["exp_avg_sq"] for s, p in zip(states, mains)]


def compare(ours: list, theirs: list) -> dict:
    """Largest |difference| over the tensor's largest |value| (float32 rounding: about 1e-7), and
    the fraction of elements with the same bits."""
    worst, same, total = 0.0, 0, 0
    for a, b in zip(ours, theirs):
        worst = max(worst, ((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-30)).item())
        same += (a == b).sum().item()
        total += a.numel()
    return dict(max_rel=worst, same_bits=same / max(total, 1))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="1.5b")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--tokens", type=int, default=8 * 4096, help="the token count the gradients are summed over")
    parser.add_argument("--json", help="write the rows and the agreement here")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("this benchmark needs a CUDA GPU", file=sys.stderr)
        return 2

    from falcon_h1.training.optim import TritonAdamW, copy_main_params_in_one_launch, main_to_model_copies

    config, ddp = build_model(args.preset)
    params = sum(p.numel() for p in ddp.parameters())
    grads = [buffer.grad_data for buffer in ddp.buffers]
    torch.manual_seed(0)
    saved_grads = [g.normal_().clone() for g in grads]
    saved_weights = [buffer.param_data.clone() for buffer in ddp.buffers]
    tokens = torch.tensor(args.tokens, device="cuda")

    def restore_grads():
        for g, saved in zip(grads, saved_grads):
            g.copy_(saved)

    def timed(fn, prepare=restore_grads):
        return event_median_ms(fn, prepare, args.repeats, args.warmup)

    rows = {}
    buckets = [b for group in list(ddp.bucket_groups) + list(ddp.expert_parallel_bucket_groups) for b in group.buckets]
    rows["bucket norms"] = timed(lambda: torch.stack([b.grad_data.norm(p=2) for b in buckets]))

    torch_optimizer, torch_inners, torch_scaling = build_step(ddp, config, triton_adamw=False, megatron_copy=True)
    triton_optimizer, triton_inners, triton_scaling = build_step(ddp, config, triton_adamw=True)
    adamws = [getattr(inner.optimizer.step, "__self__", None) for inner in triton_inners]
    if not all(isinstance(adamw, TritonAdamW) for adamw in adamws):
        print("the Triton AdamW does not apply to this optimizer", file=sys.stderr)
        return 1

    def full_step(scaling):
        def step():
            scaling.record_tokens(tokens.clone())
            successful, _, _ = scaling.step()
            assert successful
        return step

    # One step of each path from the same state (fresh optimizers: the model's weights, zero moments).
    full_step(torch_scaling)()
    reference = [[t.clone() for t in ts] for ts in optimizer_state(torch_inners)]
    reference_weights = [buffer.param_data.clone() for buffer in ddp.buffers]
    for buffer, saved in zip(ddp.buffers, saved_weights):
        buffer.param_data.copy_(saved)
    restore_grads()
    full_step(triton_scaling)()
    mains, exp_avgs, exp_avg_sqs = optimizer_state(triton_inners)
    agreement = {f"{name}_{key}": value for name, ours, theirs in (("main", mains, reference[0]),
                                                                   ("exp_avg", exp_avgs, reference[1]),
                                                                   ("exp_avg_sq", exp_avg_sqs, reference[2]))
                 for key, value in compare(ours, theirs).items()}
    agreement["triton_model_is_rounded_main"] = all(
        torch.equal(model.view(torch.int16), main.to(torch.bfloat16).view(torch.int16))
        for adamw in adamws for main, model in adamw.models.items())
    agreement["model_same_bits_as_today"] = compare([b.param_data for b in ddp.buffers], reference_weights)["same_bits"]
    del reference, reference_weights, saved_weights
    restore_grads()

    rows["gradient norm"] = timed(triton_optimizer.get_grad_norm)
    for name, optimizer, inners, scaling in (("today", torch_optimizer, torch_inners, torch_scaling),
                                             ("foreach copy", torch_optimizer, torch_inners, torch_scaling),
                                             ("triton", triton_optimizer, triton_inners, triton_scaling)):
        if name == "foreach copy":  # the same optimizer with the one-launch copy build_optimizer installs
            for inner in inners:
                copy_main_params_in_one_launch(inner, main_to_model_copies(inner))
        rows[f"{name}: adamw + copy"] = timed(optimizer.step_with_ready_grads)
        rows[f"{name}: step"] = timed(full_step(scaling))

    card = torch.cuda.get_device_name()
    print(f"{args.preset}: {params / 1e9:.3f}e9 parameters, {card}, median of {args.repeats} (CUDA events)")
    print(f"{'pass':<28} {'ms':>8} {'B/param':>8} {'GB/s':>8}")
    table = []
    for name, ms in rows.items():
        gb_per_s = BYTES_PER_PARAM[name] * params / ms / 1e6
        table.append(dict(name=name, ms=ms, bytes_per_param=BYTES_PER_PARAM[name], gb_per_s=gb_per_s))
        print(f"{name:<28} {ms:8.2f} {BYTES_PER_PARAM[name]:8d} {gb_per_s:8.0f}")
    before = rows["bucket norms"] + rows["today: step"]
    print(f"today (bucket norms in backward + step) {before:.2f} ms -> triton step {rows['triton: step']:.2f} ms")
    print("after one step from the same state, triton against today: " + json.dumps(agreement))
    if args.json:
        with open(args.json, "w") as out:
            json.dump(dict(preset=args.preset, parameters=params, card=card, repeats=args.repeats, rows=table,
                           agreement=agreement), out, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
