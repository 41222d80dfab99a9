"""Per-layer CUDA graphs (cuda_graph_impl="local") train the same model as eager execution.

The tiny preset (4 layers) with the GPU kernels, bf16, sequence 512, global batch 8 in 4
micro-batches (so each graph replays 4 times per step), 12 steps from the same initial weights
and data. Graph replay runs the same kernels on the same inputs as eager execution, so the losses
agree to rounding noise; a graph that replays stale inputs or drops a gradient shows as a loss
off by far more than that from step 2 on; the validation (2 batches at the end) replays the
training graphs without autograd. A graphed run killed at step 8 resumes from its step-6
checkpoint, captures its graphs again and must land on the eager run's losses (a separate test,
so that each fits one device call).
"""

import json

import pytest
import torch

from tests.conftest import step_records
from tests.gpu.training_runs import launch, report

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")]

COMMON = ["--precision", "bf16-mixed", "--kernel-backend", "auto", "--num-layers", "4", "--seq-length", "512",
          "--global-batch-size", "8", "--micro-batch-size", "2", "--max-steps", "12", "--lr", "3e-4"]
GRAPHS = ["--model", json.dumps({"cuda_graph_impl": "local"})]
TOLERANCE = 2e-3  # rounding (atomic adds in the SSD backward) over 12 bf16 steps


@pytest.fixture(scope="module")
def eager_run(tmp_path_factory):
    """(per-step records, output) of the eager run both tests compare with."""
    directory = tmp_path_factory.mktemp("eager")
    out = launch(1, *COMMON, "--log-dir", str(directory / "logs"), "--record", str(directory / "record"))
    return step_records(directory / "record"), out


def test_cuda_graphs_train_like_eager(tmp_path, eager_run):
    eager, eager_out = eager_run
    graphs_out = launch(1, *COMMON, *GRAPHS, "--log-dir", str(tmp_path / "graphs"),
                        "--record", str(tmp_path / "graphs_record"))
    assert "CUDA graphs: captured 4 of 4 layer runners" in graphs_out, graphs_out[-3000:]
    graphs = step_records(tmp_path / "graphs_record")
    assert sorted(eager) == sorted(graphs) == list(range(1, 13))
    for step in eager:
        assert graphs[step]["loss"] == pytest.approx(eager[step]["loss"], abs=TOLERANCE), step
    assert eager[12]["loss"] < eager[1]["loss"] - 0.5, "the run did not learn"
    val = [json.loads(line)["val_loss"] for out in (eager_out, graphs_out)
           for line in out.splitlines() if line.startswith('{"global_step"')]
    assert val[1] == pytest.approx(val[0], abs=TOLERANCE)
    report("CUDA graphs vs eager", {"eager": [round(eager[s]["loss"], 4) for s in sorted(eager)],
                                    "graphs": [round(graphs[s]["loss"], 4) for s in sorted(graphs)],
                                    "val_loss": val})


def test_cuda_graphs_resume_from_a_checkpoint_like_eager(tmp_path, eager_run):
    eager, _ = eager_run
    resumed_dir, resumed_record = tmp_path / "resumed", tmp_path / "resumed_record"
    launch(1, *COMMON, *GRAPHS, "--log-dir", str(resumed_dir), "--record", str(resumed_record),
           "--checkpoint-every", "6", "--kill-at-step", "8", expect_kill=True)
    resumed_out = launch(1, *COMMON, *GRAPHS, "--log-dir", str(resumed_dir), "--record", str(resumed_record),
                         "--checkpoint-every", "6")
    assert "CUDA graphs: captured 4 of 4 layer runners" in resumed_out, resumed_out[-3000:]
    resumed = step_records(resumed_record)  # steps 1-8 from the killed run, then 7-12 again
    assert sorted(resumed) == list(range(1, 13))
    for step in range(7, 13):
        assert resumed[step]["loss"] == pytest.approx(eager[step]["loss"], abs=TOLERANCE), step
    report("CUDA graphs, resumed at step 6", {"eager": [round(eager[s]["loss"], 4) for s in range(7, 13)],
                                              "resumed": [round(resumed[s]["loss"], 4) for s in range(7, 13)]})
