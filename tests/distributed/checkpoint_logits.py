"""Logits of a checkpoint's model at the TP size of this launch (torchrun, gloo, or one process).

Builds the model from the checkpoint's own config, loads its weights at this layout (the
checkpoint may have been written at another), runs fixed token ids and saves the full-vocabulary
logits (gathered over TP) from rank 0 to --out. With --save-to, also writes the loaded weights as
a new weights-only checkpoint at this layout.
"""

import argparse
import os
import warnings

warnings.filterwarnings("ignore")


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--save-to")
    args = parser.parse_args()
    import torch
    import torch.distributed as dist
    from megatron.core import parallel_state

    from falcon_h1.compat import cpu
    from falcon_h1.model.model import FalconH1Model
    from falcon_h1.training.checkpoint_io import checkpoint_model_config, load_model_weights

    if "RANK" not in os.environ:
        os.environ.update(RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT="29517")
    dist.init_process_group("gloo")
    tp = dist.get_world_size()
    cpu.enable()
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=tp)
    cpu.model_parallel_manual_seed(1)
    config = checkpoint_model_config(args.checkpoint, tensor_model_parallel_size=tp, kernel_backend="torch")
    model = FalconH1Model(config).eval()
    load_model_weights([model], args.checkpoint)
    tokens = torch.randint(0, config.vocab_size, (2, 48), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = model(tokens, runtime_gather_output=True)
    if dist.get_rank() == 0:
        torch.save(logits, args.out)
    if args.save_to:
        save_weights(model, args.checkpoint, args.save_to)
    dist.barrier()
    dist.destroy_process_group()


def save_weights(model, source, target):
    from falcon_h1.training import checkpoint_io

    hf_config, run_info = checkpoint_io.read_context(source)
    tokenizer = checkpoint_io.tokenizer_path(source)
    checkpoint_io.save_model([model], target, hf_config, run_info, str(tokenizer) if tokenizer.is_dir() else None)


if __name__ == "__main__":
    main()
