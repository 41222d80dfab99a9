"""Context parallelism (DeepSpeed-Ulysses style) gives the result of the same model without it.

tests/distributed/cp_parity.py builds each model at CP=1 and at CP=2 from the same weights on CPU
ranks (gloo), runs the whole sequence and each rank's contiguous chunk, and compares in float32:
per-token loss and every parameter gradient (summed over CP) within 1e-5 relative error.
"""

import json
import math

import pytest

from falcon_h1.model.config import FalconH1Config
from falcon_h1.model.layout import context_parallel_layout, mixer_layout
from falcon_h1.model.presets import PRESETS, preset_config

from .conftest import torchrun

TOLERANCE = 1e-5

# At CP=2 with the base model (4 query heads, 2 KV heads, 4 Mamba heads, 1 SSM group):
CASES = {
    # KV heads split over CP ranks; the one SSM group all-gathered.
    "2kv_split": {},
    # One KV head: all-gathered and shared by both ranks' query heads; every bias on.
    "1kv_gathered_biases": {"config": {"num_query_groups": 1, "attention_bias": True, "mamba_proj_bias": True,
                                       "projectors_bias": True, "add_bias_linear": True}},
    # One SSM group with gated RMSNorm: the group's statistics are summed over CP ranks.
    "1group_spread_norm": {"config": {"mamba_rms_norm": True, "mamba_norm_before_gate": False}},
    # Two SSM groups: split, each rank normalises a whole group.
    "2groups_split_norm": {"config": {"mamba_num_groups": 2, "mamba_rms_norm": True}},
    "pure_attention": {"config": {"mamba_num_heads": 0}},
    "pure_ssm": {"config": {"num_attention_heads": 0, "num_query_groups": 0}},
}
# On 4 ranks. TP=2 x CP=2: per TP rank 2 query heads, 1 KV head (gathered over CP), 2 Mamba heads
# and the one SSM group replicated over TP, so the gated norm's statistics span TP x CP.
# TP=1 x CP=4: 2 KV heads and 2 SSM groups for 4 ranks: gathered, ranks 0-1 keep the first, 2-3 the
# second; each group's norm statistics are summed over its two ranks.
FOUR_RANK_CASES = {
    "tp2_cp2_sp": {"tp": 2, "sequence_parallel": True, "config": {"mamba_rms_norm": True}},
    "tp2_cp2": {"tp": 2, "config": {"mamba_rms_norm": True}},
    "cp4_2kv_2groups_norm": {"config": {"mamba_num_groups": 2, "mamba_rms_norm": True}},
}


def _run(nproc, cases):
    proc = torchrun("tests/distributed/cp_parity.py", nproc, "--cases", json.dumps(cases))
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def cp2_results():
    return _run(2, CASES)


@pytest.mark.parametrize("case", sorted(CASES))
def test_cp2_matches_cp1(cp2_results, case):
    ranks = cp2_results[case]
    assert len(ranks) == 2
    for rank in ranks:
        assert rank["loss_error"] <= TOLERANCE and rank["grad_error"] <= TOLERANCE, (case, rank)


@pytest.mark.slow
def test_tp2_x_cp2_with_and_without_sequence_parallel_and_cp4_match_cp1():
    results = _run(4, FOUR_RANK_CASES)
    assert set(results) == set(FOUR_RANK_CASES)
    for case, ranks in results.items():
        assert len(ranks) == 4
        for rank in ranks:
            assert rank["loss_error"] <= TOLERANCE and rank["grad_error"] <= TOLERANCE, (case, rank)


SMALL = dict(num_layers=1, hidden_size=64, ffn_hidden_size=128, num_attention_heads=4, num_query_groups=2,
             kv_channels=16, mamba_num_heads=8, mamba_head_dim=8, mamba_state_dim=16)


@pytest.mark.parametrize("overrides, message", [
    (dict(context_parallel_size=8), r"context_parallel_size=8 does not divide the 4 query heads .* 1, 2, 4\."),
    (dict(context_parallel_size=2, tensor_model_parallel_size=4),
     r"does not divide the 1 query heads per tensor-parallel rank \(TP=4\).* work at TP=4: 1\."),
    (dict(num_attention_heads=0, mamba_num_heads=6, context_parallel_size=4), "the 6 Mamba heads"),
    (dict(num_attention_heads=6, num_query_groups=2, mamba_num_heads=6, context_parallel_size=3),
     "context_parallel_size=3 and the 2 KV heads per tensor-parallel rank .*: one must divide the other"),
])
def test_context_parallel_sizes_that_cannot_share_out_the_heads_are_refused(overrides, message):
    with pytest.raises(ValueError, match=message):
        FalconH1Config(**{**SMALL, **overrides})


def test_what_each_cp_rank_gathers_and_computes():
    config = FalconH1Config(**SMALL, mamba_num_groups=1, context_parallel_size=2)
    cp = context_parallel_layout(config, mixer_layout(config, 1, 0), 2, 1)
    assert cp.gathered == {"B", "C"}
    assert cp.rows == {"q": slice(32, 64), "k": slice(16, 32), "v": slice(16, 32), "z": slice(32, 64),
                       "x": slice(32, 64), "B": slice(0, 16), "C": slice(0, 16), "dt": slice(4, 8)}
    core = cp.core
    assert (core.attention_heads, core.kv_heads, core.mamba_heads, core.ssm_groups) == (2, 1, 4, 1)
    assert core.ssm_group_replicas == 2 and core.mamba_head_offset == 4


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_released_shape_computes_each_head_once_with_the_kv_heads_and_groups_it_reads(name):
    """Over all TP x CP ranks of every layout (TP, CP up to 8) where CP divides the query heads and
    the Mamba heads of a TP rank, each query head (per attention replica) and each Mamba head is
    computed exactly once, and each rank holds exactly the KV heads and SSM groups its heads read.
    Every other layout is refused."""
    checked = []
    for tp in (1, 2, 4, 8):
        per_tp_rank = mixer_layout(preset_config(name, tensor_model_parallel_size=tp), tp, 0)
        for cp in (2, 4, 8):
            if per_tp_rank.attention_heads % cp or per_tp_rank.mamba_heads % cp:
                with pytest.raises(ValueError, match="each CP rank computes whole heads"):
                    preset_config(name, tensor_model_parallel_size=tp, context_parallel_size=cp)
                continue
            config = preset_config(name, tensor_model_parallel_size=tp, context_parallel_size=cp)
            checked.append((tp, cp))
            q_per_kv = config.num_attention_heads // config.num_query_groups
            heads_per_group = config.mamba_num_heads // config.mamba_num_groups
            computed = {}
            for tp_rank in range(tp):
                layout = mixer_layout(config, tp, tp_rank)
                for cp_rank in range(cp):
                    core = context_parallel_layout(config, layout, cp, cp_rank).core
                    q_heads = _units(core.segment("q"), config.kv_channels)
                    mamba_heads = _units(core.segment("dt"), 1)
                    for head in [("q", h, layout.attention_replica_index) for h in q_heads] + \
                                [("mamba", h, 0) for h in mamba_heads]:
                        computed[head] = computed.get(head, 0) + 1
                    kv_heads = sorted({h // q_per_kv for h in q_heads})
                    assert _units(core.segment("k"), config.kv_channels) == kv_heads
                    groups = sorted({h // heads_per_group for h in mamba_heads})
                    assert _units(core.segment("B"), config.mamba_state_dim) == groups
            replicas = tp // math.gcd(config.num_attention_heads, tp)
            assert len(computed) == config.num_attention_heads * replicas + config.mamba_num_heads, (tp, cp)
            assert set(computed.values()) == {1}, (tp, cp)
    assert (1, 2) in checked  # every released shape has an even number of query and Mamba heads


def _units(segment, unit: int) -> list[int]:
    """The canonical heads (or groups) of `unit` rows each that a segment holds."""
    return list(range(segment.offset // unit, (segment.offset + segment.rows) // unit))
