"""Run under torchrun: context parallelism computes what the same model computes without it.

World = TP x CP ranks (gloo), TP chosen per case. Each rank first builds the model at CP=1 (with
the same TP; the other ranks are data-parallel replicas) and runs the whole sequence, then rebuilds
it at CP=cp from the same weights and runs its contiguous chunk of the sequence. It compares the per-token loss
(chunks gathered over CP) and every parameter gradient (summed over CP first, as Megatron's DDP
reduces over DP x CP). Several cases run in one launch; rank 0 prints every rank's relative
errors per case as JSON. With --device cuda (one GPU a rank, NCCL) it runs the GPU kernels.
"""

import argparse
import json
import os
import sys
import warnings

import torch
import torch.distributed as dist

warnings.filterwarnings("ignore")

# A small Falcon-H1 with every µP multiplier away from 1; each case's "config" overrides it.
BASE = dict(
    num_layers=2, hidden_size=64, ffn_hidden_size=96, vocab_size=200, num_attention_heads=4,
    num_query_groups=2, kv_channels=16, mamba_num_heads=4, mamba_head_dim=16, mamba_state_dim=16,
    mamba_num_groups=1, mamba_chunk_size=8, embedding_multiplier=1.3, lm_head_multiplier=0.7,
    key_multiplier=1.2, attention_in_multiplier=0.9, attention_out_multiplier=1.1, ssm_in_multiplier=0.8,
    ssm_out_multiplier=1.25, ssm_multipliers=(0.9, 1.1, 0.7, 1.3, 1.2), mlp_multipliers=(1.1, 0.9),
)


def build(config_overrides, tp, cp, sequence_parallel, device, weights=None):
    """Initialise TP x CP parallel state and build the model (random weights, or `weights`)."""
    from megatron.core import parallel_state

    from falcon_h1.compat import cpu
    from falcon_h1.model.config import FalconH1Config
    from falcon_h1.model.model import FalconH1Model
    from falcon_h1.model.specs import local_layer_spec
    from falcon_h1.parity import randomize_parameters

    parallel_state.initialize_model_parallel(tensor_model_parallel_size=tp, context_parallel_size=cp)
    cpu.model_parallel_manual_seed(1234)
    config = FalconH1Config(**{**BASE, **config_overrides}, tensor_model_parallel_size=tp,
                            context_parallel_size=cp, sequence_parallel=sequence_parallel,
                            use_cpu_initialization=True, kernel_backend="torch" if device == "cpu" else "auto")
    model = FalconH1Model(config, local_layer_spec()).to(device)
    if weights is None:
        # The same draw on every rank: TP replicas agree, and heads within a rank all differ.
        randomize_parameters(model, seed=11)
    else:
        model.load_state_dict(weights)
    return model


def loss_and_grads(model, tokens, labels):
    """Per-token loss [b, s_local] and every gradient after the TP reductions Megatron does."""
    from falcon_h1.parity import finish_tensor_parallel_grads

    loss = model(tokens, labels=labels)
    loss.sum().backward()
    finish_tensor_parallel_grads(model)
    return loss.detach(), {name: p.grad for name, p in model.named_parameters()}


def compare(case, seq_len, device):
    """Relative errors of the CP run against the CP=1 run of one case, on this rank."""
    from megatron.core import parallel_state

    from falcon_h1.parity import relative_error

    overrides, sequence_parallel = case.get("config", {}), case.get("sequence_parallel", False)
    tp = case.get("tp", 1)
    cp = dist.get_world_size() // tp
    gen = torch.Generator().manual_seed(5)
    tokens = torch.randint(1, BASE["vocab_size"], (2, seq_len + 1), generator=gen).to(device)
    tokens, labels = tokens[:, :-1], tokens[:, 1:]

    reference = build(overrides, tp, 1, sequence_parallel, device)
    expected_loss, expected_grads = loss_and_grads(reference, tokens, labels)
    weights = reference.state_dict()
    parallel_state.destroy_model_parallel()

    model = build(overrides, tp, cp, sequence_parallel, device, weights)
    cp_group, cp_rank = parallel_state.get_context_parallel_group(), parallel_state.get_context_parallel_rank()
    chunk = slice(cp_rank * seq_len // cp, (cp_rank + 1) * seq_len // cp)
    loss, grads = loss_and_grads(model, tokens[:, chunk], labels[:, chunk])
    chunks = [torch.empty_like(loss) for _ in range(cp)]
    dist.all_gather(chunks, loss, group=cp_group)
    for grad in grads.values():
        dist.all_reduce(grad, group=cp_group)
    parallel_state.destroy_model_parallel()

    grad_errors = {name: relative_error(grad, expected_grads[name]) for name, grad in grads.items()}
    return {"loss_error": relative_error(torch.cat(chunks, dim=1), expected_loss),
            "grad_error": max(grad_errors.values()), "worst_grad": max(grad_errors, key=grad_errors.get),
            "params": len(grad_errors)}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--cases", required=True,
                        help='JSON {name: {"config": overrides of BASE, "tp": int, "sequence_parallel": bool}}')
    parser.add_argument("--seq-len", type=int, default=32)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    args = parser.parse_args()

    if args.device == "cuda":
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    dist.init_process_group("gloo" if args.device == "cpu" else "nccl")
    from falcon_h1.compat import cpu

    cpu.enable()
    results = {}
    for name, case in json.loads(args.cases).items():
        per_rank = [None] * dist.get_world_size()
        dist.all_gather_object(per_rank, compare(case, args.seq_len, args.device))
        results[name] = per_rank
    if dist.get_rank() == 0:
        print(json.dumps(results))
    dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
