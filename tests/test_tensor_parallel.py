"""Tensor (and sequence) parallelism gives the single-device result.

Each case runs tests/distributed/tp_parity.py under torchrun on CPU (gloo). Tolerances, float32:
logits of every TP layout within 1e-5 relative error of transformers and of the TP=1 run; every
rank's local gradients within 1e-4 of the transformers gradients sliced to that rank (the bound
TP=1 itself meets, tests/test_hf_parity.py); checkpoint slices exactly equal to the canonical tensors.
"""

import json

import pytest
import torch

from falcon_h1.model.layout import mixer_layout
from falcon_h1.model.presets import PRESETS, preset_config

from .conftest import torchrun

# 1 SSM group and 2 KV heads: at TP=4 both are replicated; at TP=2 groups are.
BASE = {}
# 6 attention heads do not split over 4 ranks: heads are replicated and head_dim is split. Gated
# RMSNorm groups span ranks; every bias is on.
UNEVEN = {"num_attention_heads": 6, "mamba_rms_norm": True, "mamba_n_heads": 8, "mamba_d_head": 8,
          "attention_bias": True, "mamba_proj_bias": True, "projectors_bias": True, "mlp_bias": True}


def _run(tmp_path, tp, sequence_parallel, config):
    out = tmp_path / f"tp{tp}_{int(sequence_parallel)}.pt"
    args = ["--out", str(out), "--config", json.dumps(config)] + (["--sequence-parallel"] if sequence_parallel else [])
    proc = torchrun("tests/distributed/tp_parity.py", tp, *args)
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    return summary, torch.load(out)["logits"]


@pytest.mark.slow
@pytest.mark.parametrize("config", [BASE, UNEVEN], ids=["1group_2kv", "uneven_heads_biases"])
def test_tp2_and_tp4_with_and_without_sequence_parallel_match_tp1(tmp_path, config):
    reference, reference_logits = _run(tmp_path, 1, False, config)
    assert reference["ranks"][0]["logits_error"] <= 1e-5
    layouts = [(2, False), (2, True), (4, False), (4, True)]
    for tp, sp in layouts:
        summary, logits = _run(tmp_path, tp, sp, config)
        assert len(summary["ranks"]) == tp
        for rank in summary["ranks"]:
            assert rank["logits_error"] <= 1e-5, (tp, sp, rank)
            assert rank["grad_error"] <= 1e-4, (tp, sp, rank)
        assert (logits - reference_logits).norm() / reference_logits.norm() <= 1e-5, (tp, sp)


@pytest.mark.parametrize("name", sorted(PRESETS))
@pytest.mark.parametrize("tp", [2, 4])
def test_every_released_shape_has_a_complete_layout_at_tp_2_and_4(name, tp):
    """Across the ranks, each row of each canonical tensor is held, and held by exactly as many
    ranks as its segment says; the out-projection columns partition the canonical columns."""
    config = preset_config(name, tensor_model_parallel_size=tp)
    layouts = [mixer_layout(config, tp, rank) for rank in range(tp)]
    for name_ in ("q", "k", "v", "z", "x", "B", "C", "dt"):
        holders = {}
        for layout in layouts:
            seg = layout.segment(name_)
            for row in range(seg.offset, seg.offset + seg.rows):
                holders[row] = holders.get(row, 0) + 1
            canonical_rows, replicas = seg.canonical_rows, seg.replicas
        assert sorted(holders) == list(range(canonical_rows)), name_
        assert set(holders.values()) == {replicas}, name_
    attn_cols = sum(layout.attention_out_cols for layout in layouts)
    assert attn_cols == config.num_attention_heads * config.kv_channels
    assert sum(layout.d_ssm for layout in layouts) == config.d_ssm
