"""How the mixer's fused projections are laid out on each tensor-parallel rank.

The in-projection produces, per rank, the rows [q | k | v | z | x | B | C | dt]; the
out-projection reads the columns [attention output | SSM output]. Each row block ("segment")
is a slice of one canonical tensor: the Hugging Face q_proj / k_proj / v_proj weights and the
z / x / B / C / dt blocks of mamba.in_proj. Checkpoints store the canonical tensors, so they
do not depend on the tensor-parallel size.

Splitting rules for TP size T:
- Mamba heads (z, x, dt and their A_log / D / dt_bias / norm channels) are split evenly: T must
  divide mamba_num_heads.
- SSM groups (B, C): split when T divides the group count, otherwise each group is replicated on
  the T / groups consecutive ranks whose heads read it.
- Attention heads are split over gcd(heads, T) "attention shards". When T does not divide the head
  count, each shard is replicated on T / shards ranks and those replicas split the head_dim of the
  out-projection input between them, so the output GEMM stays exact and even.
- KV heads follow the attention shards like SSM groups follow ranks: split or replicated.

Replicated rows must stay identical: their gradients are summed over the replicas
(see `falcon_h1.model.tensor_parallel`).

Context parallelism (CP size c) does not change which parameters a rank holds; it changes what
the cores compute. Each CP rank trades its chunk of the sequence for 1/c of its TP rank's heads
(`context_parallel_layout`): query heads and Mamba heads (z, x, dt) are split; KV heads and SSM
groups are split when c divides their count, otherwise every CP rank gathers them all and keeps
the one its heads read.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace


ATTENTION_BLOCKS = ("q", "k", "v")
SSM_BLOCKS = ("z", "x", "B", "C", "dt")


def _divisors(n: int) -> str:
    return ", ".join(str(d) for d in range(1, n + 1) if n % d == 0)


@dataclass(frozen=True)
class Segment:
    """Rows [offset, offset + rows) of a canonical tensor with `canonical_rows` rows, held by
    `replicas` consecutive ranks of which this rank is number `replica_index`."""

    name: str
    rows: int
    canonical_rows: int
    offset: int
    replicas: int = 1
    replica_index: int = 0

    @property
    def chunk(self) -> tuple[int, int]:
        """(index, count) of this rank's rows as an even chunking of the canonical rows."""
        return self.offset // self.rows, self.canonical_rows // self.rows


@dataclass(frozen=True)
class MixerLayout:
    tp_size: int
    tp_rank: int
    head_dim: int
    attention_heads: int  # query heads computed on this rank
    kv_heads: int  # key/value heads on this rank
    attention_replicas: int  # ranks computing the same query heads
    attention_replica_index: int
    mamba_heads: int
    mamba_head_dim: int
    ssm_groups: int  # SSM groups on this rank (1 when replicated)
    state_dim: int
    in_proj: tuple[Segment, ...]  # row blocks of the fused in-projection, in order
    conv: tuple[Segment, ...]  # channel blocks of the conv1d: x, B, C
    mamba_head_offset: int  # first local Mamba head, in canonical head numbering
    ssm_group_replicas: int  # ranks sharing this rank's SSM group (> 1: group statistics span ranks)

    @property
    def in_proj_rows(self) -> int:
        return sum(s.rows for s in self.in_proj)

    @property
    def attention_segments(self) -> tuple[Segment, ...]:
        return tuple(s for s in self.in_proj if s.name in ATTENTION_BLOCKS)

    @property
    def ssm_segments(self) -> tuple[Segment, ...]:
        return tuple(s for s in self.in_proj if s.name in SSM_BLOCKS)

    @property
    def attention_rows(self) -> int:
        """In-projection rows of the attention stream (they come first)."""
        return sum(s.rows for s in self.attention_segments)

    @property
    def attention_out_cols(self) -> int:
        """Attention columns of the out-projection input on this rank."""
        return self.attention_heads * self.head_dim // self.attention_replicas

    @property
    def attention_out_dims(self) -> slice:
        """The part of each local head's output this rank feeds to the out-projection."""
        width = self.head_dim // self.attention_replicas
        return slice(self.attention_replica_index * width, (self.attention_replica_index + 1) * width)

    @property
    def d_ssm(self) -> int:
        return self.mamba_heads * self.mamba_head_dim

    @property
    def out_proj_cols(self) -> int:
        return self.attention_out_cols + self.d_ssm

    def segment(self, name: str) -> Segment:
        return next(s for s in self.in_proj if s.name == name)


def _split_or_replicate(count: int, shards: int, shard: int) -> tuple[int, int, int, int]:
    """(local count, local offset, replicas, replica index) of `count` items over `shards` shards."""
    if count % shards == 0:
        local = count // shards
        return local, shard * local, 1, 0
    replicas = shards // count
    return 1, shard // replicas, replicas, shard % replicas


def check_tensor_parallel(config, tp_size: int) -> None:
    """Raise ValueError naming the problem and the fix if `tp_size` cannot shard this model."""
    T = tp_size
    heads, kv, hd = config.num_attention_heads, config.num_query_groups, config.kv_channels
    mh, groups = config.mamba_num_heads, config.mamba_num_groups
    if mh and mh % T:
        raise ValueError(
            f"mamba_num_heads={mh} cannot be split over tensor_model_parallel_size={T}: each rank "
            f"must hold whole Mamba heads. Use a TP size that divides {mh} ({_divisors(mh)})."
        )
    if mh and groups % T and T % groups:
        raise ValueError(
            f"mamba_num_groups={groups} and tensor_model_parallel_size={T}: one must divide the "
            f"other so that SSM groups are either split or replicated across ranks."
        )
    if heads:
        shards = math.gcd(heads, T)
        replicas = T // shards
        if kv % shards and shards % kv:
            raise ValueError(
                f"num_query_groups={kv} (KV heads) cannot follow num_attention_heads={heads} over "
                f"tensor_model_parallel_size={T}: the {shards} attention shards need a KV-head count "
                f"they divide or that divides them. Use a TP size that divides {heads} "
                f"({_divisors(heads)})."
            )
        if hd % replicas:
            raise ValueError(
                f"num_attention_heads={heads} over tensor_model_parallel_size={T} replicates each "
                f"head on {replicas} ranks, which then split head_dim={hd}; {hd} is not divisible "
                f"by {replicas}. Use a TP size that divides {heads} ({_divisors(heads)})."
            )
    if config.ffn_hidden_size % T:
        raise ValueError(
            f"ffn_hidden_size={config.ffn_hidden_size} is not divisible by "
            f"tensor_model_parallel_size={T}; use a TP size that divides it."
        )


def mixer_layout(config, tp_size: int, tp_rank: int) -> MixerLayout:
    """The fused-projection layout of `config` on rank `tp_rank` of `tp_size`."""
    check_tensor_parallel(config, tp_size)
    heads, kv, hd = config.num_attention_heads, config.num_query_groups, config.kv_channels
    mh, mhd = config.mamba_num_heads, config.mamba_head_dim
    groups, state = config.mamba_num_groups, config.mamba_state_dim

    segments: list[Segment] = []
    attn_heads = kv_local = 0
    attn_replicas, attn_copy = 1, 0
    if heads:
        shards = math.gcd(heads, tp_size)
        attn_replicas = tp_size // shards
        shard, attn_copy = divmod(tp_rank, attn_replicas)
        attn_heads = heads // shards
        kv_local, kv_offset, kv_shard_replicas, kv_shard_index = _split_or_replicate(kv, shards, shard)
        kv_replicas = kv_shard_replicas * attn_replicas
        kv_index = kv_shard_index * attn_replicas + attn_copy
        segments += [
            Segment("q", attn_heads * hd, heads * hd, shard * attn_heads * hd, attn_replicas, attn_copy),
            Segment("k", kv_local * hd, kv * hd, kv_offset * hd, kv_replicas, kv_index),
            Segment("v", kv_local * hd, kv * hd, kv_offset * hd, kv_replicas, kv_index),
        ]

    conv: tuple[Segment, ...] = ()
    m_local = m_offset = g_local = 0
    g_replicas = 1
    if mh:
        m_local = mh // tp_size
        m_offset = tp_rank * m_local
        d_local, d_ssm = m_local * mhd, mh * mhd
        g_local, g_offset, g_replicas, g_index = _split_or_replicate(groups, tp_size, tp_rank)
        gn = g_local * state
        B = Segment("B", gn, groups * state, g_offset * state, g_replicas, g_index)
        C = Segment("C", gn, groups * state, g_offset * state, g_replicas, g_index)
        x = Segment("x", d_local, d_ssm, m_offset * mhd)
        segments += [Segment("z", d_local, d_ssm, m_offset * mhd), x, B, C,
                     Segment("dt", m_local, mh, m_offset)]
        conv = (x, B, C)

    return MixerLayout(
        tp_size=tp_size, tp_rank=tp_rank, head_dim=hd, attention_heads=attn_heads,
        kv_heads=kv_local, attention_replicas=attn_replicas, attention_replica_index=attn_copy,
        mamba_heads=m_local, mamba_head_dim=mhd, ssm_groups=g_local, state_dim=state,
        in_proj=tuple(segments), conv=conv, mamba_head_offset=m_offset, ssm_group_replicas=g_replicas,
    )


def _context_parallel_problem(config, tp_size: int, cp_size: int) -> str | None:
    """Why `cp_size` cannot share out the heads of one TP rank, or None if it can."""
    layout = mixer_layout(config, tp_size, 0)  # every TP rank holds as many heads and groups
    per_rank = f"per tensor-parallel rank (TP={tp_size})"
    for count, what in ((layout.attention_heads, "query heads"), (layout.mamba_heads, "Mamba heads")):
        if count % cp_size:
            return (f"context_parallel_size={cp_size} does not divide the {count} {what} {per_rank}: "
                    f"each CP rank computes whole heads over the whole sequence.")
    for count, what in ((layout.kv_heads, "KV heads"), (layout.ssm_groups, "SSM groups")):
        if count and count % cp_size and cp_size % count:
            return (f"context_parallel_size={cp_size} and the {count} {what} {per_rank}: one must divide "
                    f"the other, so that the {what} are split over CP ranks or each CP rank's heads "
                    f"read exactly one of them.")
    return None


def check_context_parallel(config, tp_size: int, cp_size: int) -> None:
    """Raise ValueError naming the problem and the CP sizes that work if `cp_size` cannot share
    out the heads (call after check_tensor_parallel)."""
    problem = _context_parallel_problem(config, tp_size, cp_size)
    if problem:
        layout = mixer_layout(config, tp_size, 0)
        heads = math.gcd(layout.attention_heads, layout.mamba_heads)
        allowed = [c for c in range(1, heads + 1)
                   if heads % c == 0 and not _context_parallel_problem(config, tp_size, c)]
        raise ValueError(f"{problem} Context-parallel sizes that work at TP={tp_size}: "
                         f"{', '.join(map(str, allowed))}.")


@dataclass(frozen=True)
class ContextParallelLayout:
    """What CP rank `rank` of `size` computes after trading its chunk of the sequence for heads.

    `rows[name]`: the rows of this TP rank's in-projection segment `name` that this CP rank's
    cores read. Segments in `gathered` have fewer KV heads or SSM groups than CP ranks: they are
    all-gathered over the sequence and each rank keeps its rows; the others are split over the
    ranks with one all-to-all. `core` is the layout the attention and Mamba cores run with: this
    CP rank's heads over the whole sequence, its segments naming their canonical rows.
    """

    size: int
    rank: int
    rows: dict[str, slice]
    gathered: frozenset[str]
    core: MixerLayout


def context_parallel_layout(config, layout: MixerLayout, cp_size: int, cp_rank: int) -> ContextParallelLayout:
    """How the heads of one TP rank's `layout` of `config` are shared out over `cp_size` CP ranks."""
    check_context_parallel(config, layout.tp_size, cp_size)
    unit = dict(q=layout.head_dim, k=layout.head_dim, v=layout.head_dim, z=layout.mamba_head_dim,
                x=layout.mamba_head_dim, B=layout.state_dim, C=layout.state_dim, dt=1)
    rows, gathered, core = {}, set(), {}
    for seg in layout.in_proj:
        local, first, replicas, index = _split_or_replicate(seg.rows // unit[seg.name], cp_size, cp_rank)
        start, size = first * unit[seg.name], local * unit[seg.name]
        rows[seg.name] = slice(start, start + size)
        if replicas > 1:
            gathered.add(seg.name)
        core[seg.name] = Segment(seg.name, size, seg.canonical_rows, seg.offset + start,
                                 seg.replicas * replicas, seg.replica_index * replicas + index)

    def count(name: str) -> int:
        return core[name].rows // unit[name] if name in core else 0

    core_layout = replace(
        layout, attention_heads=count("q"), kv_heads=count("k"), mamba_heads=count("dt"),
        ssm_groups=count("B"), in_proj=tuple(core[s.name] for s in layout.in_proj),
        conv=tuple(core[s.name] for s in layout.conv),
        mamba_head_offset=layout.mamba_head_offset + (rows["dt"].start if "dt" in rows else 0),
        ssm_group_replicas=core["B"].replicas if "B" in core else 1,
    )
    return ContextParallelLayout(cp_size, cp_rank, rows, frozenset(gathered), core_layout)

