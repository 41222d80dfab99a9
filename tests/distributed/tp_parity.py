"""Run under torchrun: one tensor-parallel group over all ranks (gloo), compared with transformers.

Every rank builds the same random HF model, loads its own shard into this project's model, then
1. runs forward and backward and checks its logits (gathered over TP) and its local gradients
   against the HF reference;
2. checks its `sharded_state_dict`: every piece is the right slice of the canonical (HF-layout)
   tensor, and across ranks each slice has exactly one primary replica (the one that saves).
Rank 0 prints a JSON summary and saves the logits so the test can compare layouts.
"""

import argparse
import json
import sys
import warnings

import torch
import torch.distributed as dist

warnings.filterwarnings("ignore")


def sharded_tensors(sharded_state_dict):
    """The ShardedTensors of a sharded state dict, with factories expanded as a save would."""
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory

    for value in sharded_state_dict.values():
        if isinstance(value, ShardedTensorFactory):
            built = value.build_fn(value.key, value.data, value.replica_id, None)
            yield from (built.values() if isinstance(built, dict) else built)
        elif isinstance(value, ShardedTensor):
            yield value


def check_sharded_state_dict(model, canonical):
    """Assert each ShardedTensor holds its slice of the canonical tensor; return (key, offset, primary)."""
    pieces = []
    for st in sharded_tensors(model.sharded_state_dict()):
        key, offset = st.key, st.global_offset[st.prepend_axis_num:]
        if st.prepend_axis_num:  # layers stacked along a prepended axis
            key = key.replace("decoder.layers.", f"decoder.layers.{st.global_offset[0]}.")
        expected = canonical[key]
        shape = st.global_shape[st.prepend_axis_num:]
        if key.startswith(("embedding.", "output_layer.")):  # vocabulary padded for TP
            assert shape[0] >= expected.shape[0] and shape[1:] == expected.shape[1:], key
            rows = slice(offset[0], min(offset[0] + st.local_shape[0], expected.shape[0]))
            torch.testing.assert_close(st.data[: max(rows.stop - rows.start, 0)], expected[rows], rtol=0, atol=0)
        else:
            assert tuple(shape) == tuple(expected.shape), (key, shape, expected.shape)
            index = tuple(slice(o, o + n) for o, n in zip(offset, st.local_shape))
            torch.testing.assert_close(st.data, expected[index], rtol=0, atol=0, msg=key)
        replica = st.replica_id if isinstance(st.replica_id, tuple) else (st.replica_id,)
        pieces.append((st.key, tuple(st.global_offset), all(r == 0 for r in replica)))
    return pieces


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--sequence-parallel", action="store_true")
    parser.add_argument("--config", default="{}", help="JSON overrides of the random HF config")
    parser.add_argument("--seq-len", type=int, default=24)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    from megatron.core import parallel_state

    from falcon_h1.compat import cpu
    from falcon_h1.convert.mapping import hf_to_canonical
    from falcon_h1.parity import build_from_hf, compare_with_hf, make_hf_model, random_tokens

    cpu.enable()
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=world)
    cpu.model_parallel_manual_seed(1234)
    hf = make_hf_model(7, **json.loads(args.config))
    model = build_from_hf(hf, tp_rank=rank, tp_size=world, sequence_parallel=args.sequence_parallel)
    tokens = random_tokens(hf.config, 2, args.seq_len, seed=3)
    report = compare_with_hf(hf, model, tokens, tp_rank=rank, tp_size=world)
    pieces = check_sharded_state_dict(model, hf_to_canonical(dict(hf.state_dict()), model.config))
    with torch.no_grad():
        logits = model(tokens, runtime_gather_output=True)[..., : hf.config.vocab_size]

    summaries, all_pieces = [None] * world, [None] * world
    dist.all_gather_object(summaries, {"logits_error": report.logits_error, "grad_error": report.max_grad_error,
                                       "worst_grad": report.worst_grad})
    dist.all_gather_object(all_pieces, pieces)
    if rank == 0:
        primaries = {}
        for key, offset, primary in (p for rank_pieces in all_pieces for p in rank_pieces):
            primaries[(key, offset)] = primaries.get((key, offset), 0) + primary
        not_once = {k: n for k, n in primaries.items() if n != 1}
        assert not not_once, f"slices without exactly one primary replica: {not_once}"
        torch.save({"logits": logits, "summaries": summaries}, args.out)
        print(json.dumps({"ranks": summaries, "sharded_slices": len(primaries)}))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
