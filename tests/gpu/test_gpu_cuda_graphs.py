"""Per-layer CUDA graphs (cuda_graph_impl="local") train the same model as eager execution.

The tiny preset (4 layers) with the GPU kernels, bf16, sequence 512, global batch 8 in 4
micro-batches (so each graph replays 4 times per step), 12 steps from the same initial weights
and data. Graph replay runs the same kernels on the same inputs as eager execution, so the losses
agree to rounding noise; a graph that replays stale inputs or drops a gradient shows as a loss
off by far more than that from step 2 on.

Three runs, not four: the graphed run checkpoints at step 6 and is killed at step 8 (its steps
1-8 are the graphs-vs-eager comparison), then resumes from step 6, captures its graphs again and
must land on the eager run's losses for steps 7-12 and on its validation loss (2 batches at the
end, the training graphs replayed without autograd). The eager run and the first graphed run
share the GPU side by side: the tiny model leaves it nearly idle and start-up (imports, Triton
compilation) dominates each run.
"""

import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from tests.conftest import step_records
from tests.gpu.training_runs import launch, report

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")]

COMMON = ["--precision", "bf16-mixed", "--kernel-backend", "auto", "--num-layers", "4", "--seq-length", "512",
          "--global-batch-size", "8", "--micro-batch-size", "2", "--max-steps", "12", "--lr", "3e-4"]
GRAPHS = ["--model", json.dumps({"cuda_graph_impl": "local"})]
TOLERANCE = 2e-3  # rounding (atomic adds in the SSD backward) over 12 bf16 steps
CAPTURED = "CUDA graphs: captured 4 of 4 layer runners"


def segments(record: Path) -> list[dict[int, dict]]:
    """The per-step entries of a record, one dict per run that wrote to it (a resumed run starts
    again at an earlier step)."""
    runs = []
    for line in (record / "steps.jsonl").read_text().splitlines():
        entry = json.loads(line)
        if not runs or entry["step"] <= max(runs[-1]):
            runs.append({})
        runs[-1][entry["step"]] = entry
    return runs


def validation_loss(output: str) -> float:
    return [json.loads(line)["val_loss"] for line in output.splitlines() if line.startswith('{"global_step"')][-1]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("cuda_graphs")
    eager = [*COMMON, "--log-dir", str(root / "eager"), "--record", str(root / "eager_record")]
    graphs = [*COMMON, *GRAPHS, "--log-dir", str(root / "graphs"), "--record", str(root / "graphs_record"),
              "--checkpoint-every", "6"]
    with ThreadPoolExecutor(2) as pool:
        eager_run = pool.submit(launch, 1, *eager)
        killed_run = pool.submit(launch, 1, *graphs, "--kill-at-step", "8", expect_kill=True)
        eager_out, killed_out = eager_run.result(), killed_run.result()
    resumed_out = launch(1, *graphs)
    return dict(eager=step_records(root / "eager_record"), eager_out=eager_out, killed_out=killed_out,
                resumed_out=resumed_out, graphs=segments(root / "graphs_record"))


def test_cuda_graphs_train_like_eager(runs):
    eager, (graphs, *_) = runs["eager"], runs["graphs"]
    assert CAPTURED in runs["killed_out"], runs["killed_out"][-3000:]
    assert sorted(eager) == list(range(1, 13)) and sorted(graphs) == list(range(1, 9))
    for step in graphs:
        assert graphs[step]["loss"] == pytest.approx(eager[step]["loss"], abs=TOLERANCE), step
    assert eager[12]["loss"] < eager[1]["loss"] - 0.5, "the run did not learn"
    report("CUDA graphs vs eager", {"eager": [round(eager[s]["loss"], 4) for s in sorted(eager)],
                                    "graphs": [round(graphs[s]["loss"], 4) for s in sorted(graphs)]})


def test_cuda_graphs_resume_from_a_checkpoint_like_eager(runs):
    eager = runs["eager"]
    assert len(runs["graphs"]) == 2, "expected the killed run and its resumption"
    resumed = runs["graphs"][1]
    assert CAPTURED in runs["resumed_out"], runs["resumed_out"][-3000:]
    assert sorted(resumed) == list(range(7, 13))  # from the step-6 checkpoint
    for step in resumed:
        assert resumed[step]["loss"] == pytest.approx(eager[step]["loss"], abs=TOLERANCE), step
    val = [validation_loss(runs["eager_out"]), validation_loss(runs["resumed_out"])]
    assert val[1] == pytest.approx(val[0], abs=TOLERANCE)
    report("CUDA graphs, resumed at step 6", {"eager": [round(eager[s]["loss"], 4) for s in range(7, 13)],
                                              "resumed": [round(resumed[s]["loss"], 4) for s in range(7, 13)],
                                              "val_loss": val})
