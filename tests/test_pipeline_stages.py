"""A model split into two pipeline stages (pre_process / post_process flags) computes the
single-stage result: tests/distributed/pp_parity.py on 2 CPU ranks, against transformers.
Tolerances as in test_hf_parity.py: logits 1e-5, every gradient 1e-4 (relative)."""

import json

import pytest

from .conftest import torchrun


@pytest.mark.slow
@pytest.mark.parametrize("config", [{}, {"tie_word_embeddings": True}], ids=["untied", "tied"])
def test_two_stage_pipeline_matches_transformers(config):
    proc = torchrun("tests/distributed/pp_parity.py", 2, "--config", json.dumps(config))
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["logits_error"] <= 1e-5
    first, last = summary["stages"]
    assert first["grad_error"] <= 1e-4 and last["grad_error"] <= 1e-4, summary
    assert first["params"] > 0 and last["params"] > 0
