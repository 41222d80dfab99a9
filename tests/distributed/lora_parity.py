"""Run under torchrun (gloo): a LoRA model at TP = world size from TP=1 checkpoints.

Builds the model from the adapter checkpoint's config, applies its LoRA, loads base and adapters
at this layout, runs the given tokens forward and backward (the loss of tests/test_lora.py), saves
the logits gathered over TP (rank 0) and then the adapter gradients, written in place of the
adapter values, as an adapter checkpoint: its canonical layout makes them comparable with TP=1.
"""

import argparse
import json
import sys
import warnings
from pathlib import Path

warnings.filterwarnings("ignore")
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # for tests.test_lora


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--adapters", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--grads-to", required=True)
    parser.add_argument("--tokens", required=True, help="token ids as a JSON list of lists")
    parser.add_argument("--sequence-parallel", action="store_true")
    args = parser.parse_args()
    import torch
    import torch.distributed as dist
    from megatron.core import parallel_state

    from falcon_h1.compat import cpu
    from falcon_h1.model.lora import LoRA, apply_lora
    from falcon_h1.model.model import FalconH1Model
    from falcon_h1.parity import finish_tensor_parallel_grads
    from falcon_h1.training import checkpoint_io
    from tests.test_lora import projected_loss

    dist.init_process_group("gloo")
    tp = dist.get_world_size()
    cpu.enable()
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=tp)
    cpu.model_parallel_manual_seed(1)
    config = checkpoint_io.checkpoint_model_config(
        args.adapters, tensor_model_parallel_size=tp, sequence_parallel=args.sequence_parallel,
        use_cpu_initialization=True, kernel_backend="torch")
    model = FalconH1Model(config)
    apply_lora(model, LoRA.from_dict(checkpoint_io.lora_of(args.adapters)))
    checkpoint_io.load_model_weights([model], args.adapters)
    tokens = torch.tensor(json.loads(args.tokens))
    logits = model(tokens, runtime_gather_output=True)
    projected_loss(logits).backward()
    finish_tensor_parallel_grads(model)
    if dist.get_rank() == 0:
        torch.save(logits.detach(), args.out)
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.copy_(param.grad)
    hf_config, run_info = checkpoint_io.read_context(args.adapters)
    checkpoint_io.save_model([model], args.grads_to, hf_config, run_info, part=checkpoint_io.ADAPTERS)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
