"""The convergence comparison (recipes/convergence.py) as CI can run it: the code corpus made from a
small folder of real packages, then the recipe's three variants for a few steps on the CPU, with
the summary's table and plot. On a GPU the same commands train the full-size runs (docs/recipes.md)."""

import json
import os
import shutil
import subprocess
import sys
import sysconfig

import pytest

from falcon_h1.model.config import FalconH1Config
from falcon_h1.model.param_count import parameter_count
from recipes import convergence
from tests.conftest import REPO, falcon_h1_cli

STDLIB_PACKAGES = ("json", "email", "http", "logging", "urllib", "xml", "importlib", "concurrent", "sqlite3",
                   "unittest", "asyncio", "tomllib", "zoneinfo", "wsgiref", "xmlrpc")


def test_the_three_models_have_the_same_size_and_differ_in_the_mixer():
    configs = {variant: FalconH1Config(**convergence.variant_fields(variant)) for variant in convergence.VARIANTS}
    sizes = {variant: parameter_count(config)["total"] for variant, config in configs.items()}
    assert 290e6 < sizes["hybrid"] < 300e6
    assert all(abs(size / sizes["hybrid"] - 1) < 0.01 for size in sizes.values()), sizes
    heads = {variant: (c.num_attention_heads, c.mamba_num_heads) for variant, c in configs.items()}
    assert heads == {"hybrid": (8, 24), "attention": (16, 0), "mamba": (0, 32)}
    assert {c.num_layers for c in configs.values()} == {18} and {c.hidden_size for c in configs.values()} == {1024}


def test_one_variant_is_a_factory_of_the_command_line(tmp_path):
    done = falcon_h1_cli("pretrain", "--factory", "convergence(variant=mamba,corpus=data/site_packages)",
                         "trainer.max_steps=5", "--dryrun", tmp_path=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "mamba_num_heads=32" in done.stdout and "num_attention_heads=0" in done.stdout
    assert "corpus='data/site_packages'" in done.stdout and "max_steps=5" in done.stdout


def test_loss_at_equal_time_interpolates_between_validations():
    points = [(0, 0, 0.0, 10.0), (25, 100, 10.0, 6.0), (50, 200, 20.0, 5.0)]
    assert convergence.loss_at(points, 15.0) == pytest.approx(5.5)
    assert convergence.loss_at(points, 20.0) == 5.0
    with pytest.raises(ValueError, match="outside"):
        convergence.loss_at(points, 21.0)


def test_a_spike_that_recovers_and_a_run_that_does_not_end_lowest():
    falling = [(s, 0, 0.0, 10.0 - 0.1 * s) for s in range(40)]
    spiked = [(s, t, sec, loss + (2.0 if s == 20 else 0.0)) for s, t, sec, loss in falling]
    assert convergence.spikes(falling) == {"largest_spike": pytest.approx(-0.55), "ends_lowest": True}
    assert convergence.spikes(falling[:5]) == {"largest_spike": 0.0, "ends_lowest": None}  # too short to tell
    assert convergence.spikes(spiked) == {"largest_spike": pytest.approx(1.45), "ends_lowest": True}
    rising = [(s, 0, 0.0, 5.0 + 0.1 * s) for s in range(40)]
    assert not convergence.spikes(rising)["ends_lowest"]


def test_the_recipe_and_the_corpus_builder_run_end_to_end_on_cpu(tmp_path):
    site = tmp_path / "site-packages"
    for name in STDLIB_PACKAGES:
        shutil.copytree(os.path.join(sysconfig.get_paths()["stdlib"], name), site / name,
                        ignore=shutil.ignore_patterns("test", "tests", "__pycache__"))
    env = dict(os.environ, NEMORUN_HOME=str(tmp_path / "nemorun"), PYTHONWARNINGS="ignore")
    corpus = subprocess.run(
        [sys.executable, "-m", "falcon_h1.data.code_corpus", "--root", site, "--output", tmp_path / "corpus",
         "--vocab-size", "4096", "--validation-share", "0.1", "--test-share", "0.1", "--workers", "2"],
        capture_output=True, text=True, cwd=REPO, env=env, timeout=600)
    assert corpus.returncode == 0, corpus.stdout[-3000:] + corpus.stderr[-3000:]
    done = subprocess.run(
        [sys.executable, "-m", "recipes.convergence", "--corpus", tmp_path / "corpus", "--dir", tmp_path / "runs",
         "--max-steps", "4", "--num-layers", "1", "--seq-length", "64", "--global-batch-size", "2",
         "--micro-batch-size", "1"], capture_output=True, text=True, cwd=REPO, env=env, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]

    summary = json.loads((tmp_path / "runs" / "convergence.json").read_text())
    rows = {row["variant"]: row for row in summary["rows"]}
    assert list(rows) == ["hybrid", "attention", "mamba"]
    for variant, row in rows.items():
        assert row["steps"] == 4 and row["tokens"] == 4 * 2 * 64 and row["tokens_per_sec_per_gpu"] > 0
        val = convergence.read_run(tmp_path / "runs" / variant)["val"]
        assert [p[0] for p in val] == [0, 4] and val[1][3] < val[0][3], (variant, val)  # it learns
        assert row["val_loss_at_equal_time"] >= row["final_val_loss"] - 1e-9
    assert summary["equal_time_s"] == min(row["train_seconds"] for row in rows.values())
    table = (tmp_path / "runs" / "convergence.md").read_text()
    assert table.count("\n") == 5 and "| Mamba-2 only (32 heads) | 79.6M |" in table
    assert (tmp_path / "runs" / "convergence.png").stat().st_size > 20_000


def test_a_missing_corpus_is_named_with_the_command_that_makes_it(tmp_path):
    done = subprocess.run([sys.executable, "-m", "recipes.convergence", "--corpus", tmp_path / "nothing"],
                          capture_output=True, text=True, cwd=REPO, timeout=300)
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.strip().splitlines() == [
        f"error: --corpus {tmp_path / 'nothing'}: no corpus.json there; make it first with `python -m "
        f"falcon_h1.data.code_corpus --root SITE_PACKAGES --output {tmp_path / 'nothing'}`"]
