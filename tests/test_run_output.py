"""What a training run prints and keeps: a header before the model is built, no warning lines, the
run's configuration in LOG_DIR/config.yaml and in TensorBoard's hparams, and on resume the
checkpoint it continued from.

Real runs of the main job (`python -m falcon_h1.train`'s main(): tiny preset at 2 layers, bundled
corpus, 32-token sequences), with Python's warnings shown as a user sees them (no PYTHONWARNINGS).
"""

import logging
import os
import re
import subprocess
import sys
import warnings

import pytest
import yaml

from falcon_h1.quiet import quiet_third_party_notices
from tests.conftest import REPO

LR = 2e-3
# A line that reports a warning: the words the issue counted, Python's "FILE.py:LINE: message"
# format (Lightning's warnings drop the category name), torch's glog-style "W1202 hh:mm..." records.
WARNING_LINE = re.compile(r"Warning|warn\(|\.py:\d+: |^W\d{4} \d\d:")


def warning_lines(output: str) -> list[str]:
    return [line for line in output.splitlines() if WARNING_LINE.search(line)]


# The main job (falcon_h1.train.main), with a line printed when the model's layers are built.
MAIN_JOB = """
import sys
from falcon_h1.quiet import quiet_third_party_notices
quiet_third_party_notices()  # what main() does first; the line below imports Megatron
from falcon_h1.training.module import FalconH1Module
build = FalconH1Module.configure_model
def configure_model(self):
    if self.chunks is None:
        print("-- building the model", flush=True)
    build(self)
FalconH1Module.configure_model = configure_model
from falcon_h1.train import main
sys.exit(main(sys.argv[1:]))
"""


def main_job(log_dir, max_steps: int) -> str:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONWARNINGS"}
    proc = subprocess.run(
        [sys.executable, "-c", MAIN_JOB, "--log-dir", str(log_dir), "--max-steps", str(max_steps),
         "--num-layers", "2", "--seq-length", "32", "--global-batch-size", "4", "--micro-batch-size", "2",
         "--val-every", "2", "--val-batches", "1", "--checkpoint-every", "3", "--lr", str(LR)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=600, cwd=REPO,
        env=dict(env, OMP_NUM_THREADS="1"))
    assert proc.returncode == 0, proc.stdout[-8000:]
    return proc.stdout


def first_line(output: str, start: str) -> int:
    return next(i for i, line in enumerate(output.splitlines()) if line.startswith(start))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A 3-step run, then the same command to step 5: it resumes from the step-3 checkpoint."""
    log_dir = tmp_path_factory.mktemp("run")
    return log_dir, main_job(log_dir, 3), main_job(log_dir, 5)


def test_a_run_prints_its_header_before_the_model_is_built_and_no_warnings(runs):
    log_dir, first, resumed = runs
    header = first_line(first, "Falcon-H1 tiny with num_layers=2: ")
    lines = first.splitlines()
    assert lines[header + 1].startswith("  layout     1 process on CPU (1 device x 1 node): TP 1 x PP 1 x CP 1 x DP 1")
    assert lines[header + 2].startswith("  data       ") and "tokens" in lines[header + 2]
    assert lines[header + 3].startswith("  batches    4 x 32 tokens (micro-batch 2): 128 tokens per step")
    assert lines[header + 4].startswith(f"  optimizer  adam, lr {LR:.1e}")
    assert lines[header + 5] == (f"  outputs    {log_dir}: checkpoints/ (every 3 steps and at the end, last 2 kept), "
                                 "tensorboard/, loss.png, config.yaml")
    assert header < first_line(first, "-- building the model") < first_line(first, "sanity check") \
        < first_line(first, "step 3/3")
    assert f"checkpoint:  {log_dir / 'checkpoints' / 'step=0000003'}" in first
    for output in (first, resumed):
        assert warning_lines(output) == []


def test_a_resumed_run_names_its_checkpoint(runs):
    log_dir, _, resumed = runs
    checkpoint = log_dir / "checkpoints" / "step=0000003"
    resumed_line = first_line(resumed, "resumed from ")
    assert resumed.splitlines()[resumed_line] == f"resumed from {checkpoint} (step 3, consumed_samples 12)"
    assert first_line(resumed, "Falcon-H1 ") < resumed_line < first_line(resumed, "validation at step 4")
    assert yaml.safe_load((log_dir / "config.yaml").read_text())["resume"]["resumed_from"] == str(checkpoint)


def test_the_run_configuration_is_saved_with_the_run_and_in_tensorboard(runs):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams.plugin_data_pb2 import HParamsPluginData

    log_dir, _, _ = runs
    # config.yaml is the latest run's; Lightning keeps the first run's hparams.yaml in the directory.
    for saved, max_steps in ((log_dir / "config.yaml", 5), (log_dir / "tensorboard" / "hparams.yaml", 3)):
        config = yaml.safe_load(saved.read_text())
        assert config["model"]["preset"] == "tiny with num_layers=2"
        assert config["model"]["config"]["hidden_size"] == 256 and config["model"]["config"]["num_layers"] == 2
        assert config["model"]["optimizer"]["lr"] == LR
        assert config["data"]["seq_length"] == 32 and config["data"]["global_batch_size"] == 4
        assert config["trainer"]["max_steps"] == max_steps
        assert config["trainer"]["strategy"]["tensor_model_parallel_size"] == 1
    events = EventAccumulator(str(next((log_dir / "tensorboard").glob("events.out.tfevents.*"))))
    events.Reload()
    session = HParamsPluginData.FromString(events.PluginTagToContent("hparams")["_hparams_/session_start_info"])
    hparams = session.session_start_info.hparams
    assert hparams["model/config/hidden_size"].number_value == 256
    assert hparams["model/optimizer/lr"].number_value == LR


def test_dataset_size_read_from_the_index_header_matches_megatrons_reader(tmp_path):
    import numpy as np
    import torch
    from megatron.core.datasets.indexed_dataset import IndexedDataset, IndexedDatasetBuilder

    from falcon_h1.training.pretrain import indexed_dataset_size

    documents = [[1, 2, 3], [4, 5], [6, 7, 8, 9, 10]]
    builder = IndexedDatasetBuilder(str(tmp_path / "d.bin"), dtype=np.uint16)
    for document in documents:
        builder.add_document(torch.tensor(document), [len(document)])
    builder.finalize(str(tmp_path / "d.idx"))
    megatron = IndexedDataset(str(tmp_path / "d"))
    assert indexed_dataset_size(str(tmp_path / "d")) == (10, 3) \
        == (int(megatron.sequence_lengths.sum()), len(megatron.document_indices) - 1)


def test_only_the_named_notices_are_filtered():
    """Other warnings from the same modules, and other records of the same loggers, still show."""
    with warnings.catch_warnings(record=True) as shown:
        warnings.simplefilter("always")
        quiet_third_party_notices()
        for message in ("Transformer Engine and Apex are not installed. Falling back", "something else"):
            warnings.warn_explicit(message, UserWarning, "optimizer.py", 25, module="megatron.core.optimizer")
    assert [str(w.message) for w in shown] == ["something else"]

    logger = logging.getLogger("megatron.core.distributed.distributed_data_parallel")
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    logger.addHandler(handler)
    try:
        logger.warning("DistributedDataParallel: full_param_layout not provided with use_distributed_optimizer=True")
        logger.warning("DistributedDataParallel: something else")
    finally:
        logger.removeHandler(handler)
    assert [r.getMessage() for r in records] == ["DistributedDataParallel: something else"]
