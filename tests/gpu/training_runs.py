"""The training runs the GPU training tests make: tests/distributed/train_tiny.py launched on one
or more GPUs (its per-step record is read back with tests.conftest.step_records), results appended
to $OUT/gpu_training.jsonl."""

import json
import os
import sys
import tempfile
from pathlib import Path

import pytest
import torch

from tests.conftest import REPO, run_in_session

TRAIN = str(REPO / "tests/distributed/train_tiny.py")
OUT = Path(os.environ.get("OUT", tempfile.gettempdir()))  # the JSON report


def launch(nproc: int, *args: str, expect_kill: bool = False) -> str:
    """Run the training script (torchrun for nproc > 1); return its output."""
    if nproc == 1:
        cmd = [sys.executable, TRAIN, *args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", TRAIN, *args]
    code, text = run_in_session(cmd, timeout=900)
    if expect_kill:
        assert code != 0, "the run was meant to be killed"
    elif code != 0:
        pytest.fail(f"{' '.join(cmd)} failed ({code}):\n{text[-6000:]}")
    return text


def report(name: str, payload: dict) -> None:
    with open(OUT / "gpu_training.jsonl", "a") as f:
        f.write(json.dumps({"case": name, "device": torch.cuda.get_device_name(), **payload}) + "\n")
    print(name, json.dumps(payload))
