"""Two ranks (torchrun, gloo): which ranks stop when one rank's gradient holds a NaN or Inf, with the
NaN/Inf check left to the optimizer step's gradient norm (training/step.py, check_gradient_norm).

    --tp 1: two data-parallel ranks, the distributed optimizer's reduce-scatter between them;
    --tp 2: two tensor-parallel ranks, one parameter split between them (`split`) and one
            replicated on both (`replicated`, like a norm weight), counted on TP rank 0 only.

Each case poisons one element of one rank's gradient before the gradients are finalized, then
steps OptimizerStep. Prints RESULTS: per case, per rank, the error (or None), whether backward
took bucket norms, and whether the weights changed.
"""

import argparse
import json
import warnings

warnings.filterwarnings("ignore")

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

CASES = {
    1: [("clean", None, None, None), ("nan in rank 1's split gradient", 1, "split", float("nan")),
        ("inf in rank 0's replicated gradient", 0, "replicated", float("inf"))],
    2: [("clean", None, None, None), ("nan in rank 1's split gradient", 1, "split", float("nan")),
        ("inf in rank 1's copy of the replicated gradient", 1, "replicated", float("inf"))],
}


class Tiny(torch.nn.Module):
    def __init__(self):
        super().__init__()
        from megatron.core.tensor_parallel import set_tensor_model_parallel_attributes

        self.split = torch.nn.Parameter(torch.randn(6, 4))  # this rank's rows of a TP-split weight
        set_tensor_model_parallel_attributes(self.split, True, 0, 1)
        self.replicated = torch.nn.Parameter(torch.randn(4))  # the same on every TP rank

    def forward(self, x):
        return (x @ self.split.t()).square().sum() + (x * self.replicated).sum()


def run_case(tp: int, poisoned_rank, name, value) -> dict:
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
    from megatron.core.transformer import TransformerConfig

    from falcon_h1.training.optim import build_optimizer, falcon_h1_optimizer_config
    from falcon_h1.training.step import DeferredGradCheck, OptimizerStep

    rank = dist.get_rank()
    config = TransformerConfig(num_layers=1, hidden_size=4, num_attention_heads=2, calculate_per_token_loss=True,
                               tensor_model_parallel_size=tp)
    torch.manual_seed(0)
    module = Tiny()
    ddp = DistributedDataParallel(config, DistributedDataParallelConfig(
        use_distributed_optimizer=True, check_for_nan_in_grad=True, bucket_size=0), module)
    ddp.broadcast_params()
    check = DeferredGradCheck([ddp])
    optimizer = build_optimizer(falcon_h1_optimizer_config(lr=1e-2), [ddp], config)
    scaling = OptimizerStep(optimizer, check)  # leaves the check to the gradient norm
    before = [p.detach().clone() for p in module.parameters()]
    torch.manual_seed(1 + rank)  # each rank its own batch
    ddp.zero_grad_buffer()
    ddp(torch.randn(3, 4)).backward()
    if rank == poisoned_rank:
        getattr(module, name).main_grad.view(-1)[0] = value
    finalize_model_grads([ddp], None)  # the data-parallel reduce-scatter
    bucket_norms_taken = bool(check.pending)
    scaling.record_tokens(torch.tensor(3))
    try:
        scaling.step()
        error = None
    except RuntimeError as e:
        error = str(e)
    changed = not all(torch.equal(a, b) for a, b in zip(before, module.parameters()))
    check.remove()
    return dict(error=error, bucket_norms_taken=bucket_norms_taken, weights_changed=changed)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--tp", type=int, required=True)
    args = parser.parse_args()
    dist.init_process_group("gloo")
    from megatron.core import parallel_state

    from falcon_h1.compat import cpu

    cpu.enable()
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=args.tp)
    cpu.model_parallel_manual_seed(0)
    results = {case: run_case(args.tp, rank, name, value) for case, rank, name, value in CASES[args.tp]}
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, results)
    if dist.get_rank() == 0:
        print("RESULTS", json.dumps({case: [ranks[case] for ranks in gathered] for case in results}))
    parallel_state.destroy_model_parallel()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
