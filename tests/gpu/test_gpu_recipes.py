"""Recipes through the falcon-h1 command line and the local executor on GPUs (2 needed).

The tiny and 0.5B pretraining recipes on 1 and 2 GPUs (0.5B with mock data, 4096-token sequences,
shortened to 20 steps), and the attention:Mamba ratio sweep at a reduced size on one GPU, 20 steps
per ratio (the sweep's figures in docs/recipes.md come from `python -m recipes.ratio_sweep` run
directly with 150 steps). Everything runs at the same time: the 1-GPU runs share GPU 0 one after
the other while the sweep has GPU 1, and the 2-GPU runs take GPUs 2 and 3 when there are 4, else
GPUs 0 and 1 beside the others (the models take a fraction of an H200; start-up dominates these
short runs, and their throughputs are recorded, not checked). Results go to $OUT (result JSON of
each run, the sweep's table, JSON and plot).

    bash tests/gpu/run.sh OUT tests/gpu/test_gpu_recipes.py
"""

import json
import os
import shutil
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from tests.gpu.conftest import run_once

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")]

OUT = Path(os.environ.get("OUT", tempfile.gettempdir()))
# FALCON_H1_GPU_RUNS lets a later call on the same machine reuse the runs that finished.
RUNS = Path(os.environ.get("FALCON_H1_GPU_RUNS") or tempfile.mkdtemp(prefix="falcon_h1_gpu_recipes_"))
RUNS.mkdir(parents=True, exist_ok=True)
SHORT_0P5B = ["trainer.max_steps=20", "trainer.val_check_interval=10", "trainer.limit_val_batches=2",
              "model.lr_schedule.warmup_steps=5", "data.global_batch_size=16"]
SHORT_TINY = ["trainer.max_steps=100", "model.lr_schedule.warmup_steps=10"]
SWEEP_STEPS = 20


def command(args: list[str], gpus: str, log: Path, done: Path) -> dict:
    return {"code": run_once(args, gpus, log, done, RUNS / "nemorun"), "log": log}


def recipe_run(factory: str, devices: int, overrides: list[str], gpus: str) -> dict:
    name = f"{factory}_{devices}gpu"
    args = [sys.executable, "-m", "falcon_h1.cli", "pretrain", "--factory", factory, *overrides,
            f"trainer.log_dir={RUNS / name}", f"trainer.devices={devices}", "-y", "run.executor=local",
            f"run.executor.ntasks_per_node={devices}"]
    return dict(command(args, gpus, RUNS / f"{name}.log", RUNS / name / "result.json"), name=name, dir=RUNS / name)


def sweep(gpus: str) -> dict:
    # An interrupted sweep goes on where it stopped when run again (finished ratios are kept).
    args = [sys.executable, "-m", "recipes.ratio_sweep", "--dir", str(RUNS / "sweep"), "--max-steps", str(SWEEP_STEPS),
            "--seq-length", "1024", "--global-batch-size", "32", "--micro-batch-size", "8"]
    return dict(command(args, gpus, RUNS / "sweep.log", RUNS / "sweep" / "ratio_sweep.json"), name="ratio_sweep",
                dir=RUNS / "sweep")


@pytest.fixture(scope="module")
def runs():
    def one_gpu_runs():
        return [recipe_run("tiny", 1, SHORT_TINY, "0"), recipe_run("falcon_h1_0p5b", 1, SHORT_0P5B, "0")]

    def swept():
        return [sweep("1")]

    def two_gpu_runs(gpus):  # side by side: the tiny model leaves the GPUs mostly idle
        with ThreadPoolExecutor(2) as pool:
            two = [pool.submit(recipe_run, "tiny", 2, SHORT_TINY, gpus),
                   pool.submit(recipe_run, "falcon_h1_0p5b", 2, SHORT_0P5B, gpus)]
            return [f.result() for f in two]

    with ThreadPoolExecutor(3) as pool:
        jobs = [pool.submit(one_gpu_runs), pool.submit(swept),
                pool.submit(two_gpu_runs, "2,3" if torch.cuda.device_count() >= 4 else "0,1")]
        results = {r["name"]: r for job in jobs for r in job.result()}
    for r in results.values():
        shutil.copy(r["log"], OUT / r["log"].name)
    return results


@pytest.mark.parametrize("name", ["tiny_1gpu", "tiny_2gpu", "falcon_h1_0p5b_1gpu", "falcon_h1_0p5b_2gpu"])
def test_recipe_trains_through_the_local_executor(runs, name):
    run = runs[name]
    assert run["code"] == 0, run["log"].read_text()[-5000:]
    result = json.loads((run["dir"] / "result.json").read_text())
    (OUT / f"{name}.json").write_text(json.dumps({**result, "device": torch.cuda.get_device_name()}, indent=2))
    print(name, json.dumps(result))
    assert result["global_step"] == (100 if name.startswith("tiny") else 20)
    assert result["val_loss"] < 8.0 if name.startswith("tiny") else result["val_loss"] < 10.6


def test_ratio_sweep_on_one_gpu(runs):
    run = runs["ratio_sweep"]
    assert run["code"] == 0, run["log"].read_text()[-5000:]
    for name in ("ratio_sweep.md", "ratio_sweep.json", "ratio_sweep.png"):
        shutil.copy(run["dir"] / name, OUT / name)
    rows = json.loads((run["dir"] / "ratio_sweep.json").read_text())
    print((run["dir"] / "ratio_sweep.md").read_text())
    assert [r["ratio"] for r in rows] == ["8:0", "6:2", "4:4", "2:6", "0:8"]
    assert all(r["steps"] == SWEEP_STEPS and r["tokens_per_sec_per_gpu"] > 0 for r in rows)
