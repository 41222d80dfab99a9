"""Context parallelism, DeepSpeed-Ulysses style: the mixer's cores trade sequence shards for heads.

Each CP rank holds a contiguous chunk of the sequence (rank r: tokens [r s/c, (r+1) s/c)).
Everything position-wise (embedding, norms, MLP, the in- and out-projection GEMMs, the loss) runs
on that chunk. Attention and the Mamba scan need the whole sequence, so around them:

    in-projection [s/c, b, all heads of this TP rank]
      --all-to-all-->  [s, b, 1/c of the heads]   (segments with fewer KV heads / SSM groups than
                                                    CP ranks: all-gathered, each rank keeps its own)
    attention core, conv1d + SSD scan + gate/norm on the whole sequence
      --all-to-all-->  [s/c, b, all heads] --> out-projection

Which rows go where is decided by `layout.context_parallel_layout`. Megatron's autograd
collectives carry the gradients back: all-to-all backwards is the inverse all-to-all, and the
all-gather's backward reduce-scatters, summing the gradients of the ranks that read a gathered
KV head or SSM group.
"""

from __future__ import annotations

import torch
from megatron.core.tensor_parallel.mappings import (
    all_to_all,
    gather_from_sequence_parallel_region,
)

from falcon_h1.model.layout import ContextParallelLayout, Segment


def sequence_to_heads(proj: torch.Tensor, segments: tuple[Segment, ...], cp: ContextParallelLayout,
                      group) -> torch.Tensor:
    """proj [s/c, b, rows]: this rank's chunk of the sequence, the in-projection rows of its TP
    rank's heads in `segments` order -> [s, b, core rows]: the whole sequence, the rows of this CP
    rank's heads (`cp.core.in_proj` order)."""
    pieces = dict(zip([s.name for s in segments], proj.split([s.rows for s in segments], dim=-1)))
    exchanged = [name for name in pieces if name not in cp.gathered]
    # Slot j of the send buffer [c, s/c, b, rows/c] holds rank j's share of every split segment.
    send = torch.cat([pieces[name].unflatten(-1, (cp.size, -1)).movedim(-2, 0) for name in exchanged], dim=-1)
    # Slot i of what comes back is chunk i of the sequence, so the slots concatenate to [s, b, ...].
    received = all_to_all(group, send).flatten(0, 1)
    if not cp.gathered:
        return received  # the segments are already side by side in order
    parts = dict(zip(exchanged, received.split([cp.core.segment(name).rows for name in exchanged], dim=-1)))
    gathered = [name for name in pieces if name in cp.gathered]
    whole = gather_from_sequence_parallel_region(torch.cat([pieces[name] for name in gathered], dim=-1),
                                                 group=group)
    for name, rows in zip(gathered, whole.split([pieces[name].shape[-1] for name in gathered], dim=-1)):
        parts[name] = rows[..., cp.rows[name]]
    return torch.cat([parts[s.name] for s in segments], dim=-1)


def heads_to_sequence(out: torch.Tensor, widths: tuple[int, ...], group) -> torch.Tensor:
    """out [s, b, sum(widths)]: the whole sequence, the outputs of this CP rank's heads as streams
    of `widths` columns side by side -> [s/c, b, c * sum(widths)]: this rank's chunk of the
    sequence, every stream with the outputs of all heads in order (the out-projection's columns)."""
    cp_size = group.size()
    s, b, _ = out.shape
    # Slot j of the send buffer is chunk j of the sequence; slot i of what comes back holds rank i's heads.
    received = all_to_all(group, out.unflatten(0, (cp_size, s // cp_size))).permute(1, 2, 0, 3)
    streams = [part.reshape(s // cp_size, b, -1) for part in received.split(widths, dim=-1) if part.shape[-1]]
    return torch.cat(streams, dim=-1) if len(streams) > 1 else streams[0]
