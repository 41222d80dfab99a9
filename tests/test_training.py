"""Training under MegatronStrategy on CPU: exact resume after SIGKILL (also during a save),
parallel layouts tracking the single-process run, resharding a checkpoint, bad input.

Runs are real: tests/distributed/train_tiny.py trains a 2-layer Falcon-H1 in float32 on the
bundled corpus with the project's strategy, data module and checkpoints, in its own process(es).
"""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.conftest import REPO, run_in_session, step_records, torchrun

TRAIN = "tests/distributed/train_tiny.py"
GLOBAL_BATCH = 8


def run_single(*args: str, killed: bool = False, timeout: int = 600) -> str:
    """Run the training script in one process; return its output."""
    code, text = run_in_session([sys.executable, str(REPO / TRAIN), *args], timeout)
    if killed:
        assert code == -signal.SIGKILL, f"expected SIGKILL, got {code}:\n{text[-4000:]}"
    elif code != 0:
        pytest.fail(f"{TRAIN} {' '.join(args)} failed ({code}):\n{text[-8000:]}")
    return text


def samples(record: Path) -> list[list[int]]:
    """Training sample indices read by the single process, step by step."""
    return [json.loads(line)["indices"] for line in (record / "samples-rank0.jsonl").read_text().splitlines()]


def reference_run(root: Path, *args: str) -> Path:
    """An uninterrupted 12-step run, with a checkpoint of its initial weights."""
    run_single("--log-dir", str(root / "run"), "--record", str(root / "record"), "--max-steps", "12",
               "--save-at-start", *args)
    return root


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    return reference_run(tmp_path_factory.mktemp("reference"))


@pytest.fixture(scope="module")
def reference_4_layers(tmp_path_factory):
    return reference_run(tmp_path_factory.mktemp("reference4"), "--num-layers", "4")


def test_resume_after_sigkill_repeats_no_sample_and_reproduces_the_losses(reference, tmp_path):
    common = ["--log-dir", str(tmp_path / "run"), "--record", str(tmp_path / "record"), "--max-steps", "12",
              "--checkpoint-every", "4"]
    run_single(*common, "--kill-at-step", "7", killed=True)
    checkpoints = tmp_path / "run" / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir()) == ["step=0000004"]
    before = samples(tmp_path / "record")
    assert len(before) == 7  # the steps read up to the kill

    run_single(*common)  # resumes from step 4, the latest complete checkpoint
    expected, got = step_records(reference / "record"), step_records(tmp_path / "record")
    assert sorted(got) == list(range(1, 13))
    for step in range(1, 13):
        assert abs(got[step]["loss"] - expected[step]["loss"]) <= 1e-6, (step, got[step], expected[step])
        assert got[step]["consumed_samples"] == step * GLOBAL_BATCH
    # The resumed run read on from sample 4 x 8 = 32: every sample exactly once, in the reference order.
    after = samples(tmp_path / "record")[len(before):]
    consumed = [i for batch in before[:4] + after for i in batch]
    assert consumed == [i for batch in samples(reference / "record") for i in batch] == list(range(12 * GLOBAL_BATCH))
    run_info = json.loads((checkpoints / "step=0000012" / "context" / "run.json").read_text())
    assert run_info["consumed_samples"] == 12 * GLOBAL_BATCH and run_info["global_step"] == 12


def test_run_killed_during_a_save_resumes_from_the_previous_good_checkpoint(reference, tmp_path):
    common = ["--log-dir", str(tmp_path / "run"), "--record", str(tmp_path / "record"), "--max-steps", "12",
              "--checkpoint-every", "4"]
    run_single(*common, "--kill-during-save-at-step", "8", killed=True)
    checkpoints = tmp_path / "run" / "checkpoints"
    assert (checkpoints / "step=0000008-unfinished").exists()  # the torn save is marked

    run_single(*common)
    got, expected = step_records(tmp_path / "record"), step_records(reference / "record")
    for step in range(1, 13):
        assert abs(got[step]["loss"] - expected[step]["loss"]) <= 1e-6, step
    assert not (checkpoints / "step=0000008-unfinished").exists()  # step 8 was saved again, completely
    assert (checkpoints / "step=0000008" / "weights" / "metadata.json").exists()


def test_bf16_resume_restores_the_fp32_main_weights(tmp_path):
    """In bf16 the optimizer steps fp32 main weights; a resume that kept only the bf16 model
    weights would drift from the uninterrupted run at the first resumed step."""
    bf16 = ["--precision", "bf16-mixed", "--max-steps", "8"]
    run_single(*bf16, "--log-dir", str(tmp_path / "ref"), "--record", str(tmp_path / "ref_record"))
    common = [*bf16, "--log-dir", str(tmp_path / "run"), "--record", str(tmp_path / "record"), "--checkpoint-every", "3"]
    run_single(*common, "--kill-at-step", "4", killed=True)
    run_single(*common)
    got, expected = step_records(tmp_path / "record"), step_records(tmp_path / "ref_record")
    for step in range(1, 9):
        assert got[step]["loss"] == expected[step]["loss"], step


def test_bf16_resume_with_several_gradient_buckets_restores_the_fp32_main_weights(tmp_path):
    """As on a GPU past 40M parameters: DDP splits the gradients into buckets, each padded at its
    end, and the Mamba heads' parameters are not multiples of the padding. Every parameter's main
    weights and moments must come back as they were, wherever its bucket lies in the buffer."""
    bf16 = ["--precision", "bf16-mixed", "--max-steps", "8", "--grad-bucket-size", "20000"]
    run_single(*bf16, "--log-dir", str(tmp_path / "ref"), "--record", str(tmp_path / "ref_record"))
    common = [*bf16, "--log-dir", str(tmp_path / "run"), "--record", str(tmp_path / "record"), "--checkpoint-every", "3"]
    run_single(*common, "--kill-at-step", "4", killed=True)
    text = run_single(*common)
    got, expected = step_records(tmp_path / "record"), step_records(tmp_path / "ref_record")
    for step in range(1, 9):
        assert got[step]["loss"] == expected[step]["loss"], step
    assert "param range exceeds" not in text  # Megatron's warning when it saves past the buffer


def test_async_saves_resume_exactly(reference, tmp_path):
    """Checkpoints written in the background: a kill while one may still be in flight resumes from
    the latest one that finished, with the same losses."""
    common = ["--log-dir", str(tmp_path / "run"), "--record", str(tmp_path / "record"), "--max-steps", "12",
              "--checkpoint-every", "4", "--async-save"]
    run_single(*common, "--kill-at-step", "9", killed=True)
    checkpoints = tmp_path / "run" / "checkpoints"
    assert (checkpoints / "step=0000004" / "weights" / "metadata.json").exists()
    run_single(*common)
    got, expected = step_records(tmp_path / "record"), step_records(reference / "record")
    for step in range(1, 13):
        assert abs(got[step]["loss"] - expected[step]["loss"]) <= 1e-6, step
    assert not list(checkpoints.glob("*-unfinished"))


# Loss of each parallel layout vs one process over 12 float32 steps from the same initial weights.
# The layouts differ only in reduction order (GEMM splits, gradient all-reduce/reduce-scatter), so
# they agree to float32 rounding amplified by 12 Adam steps.
LAYOUT_TOLERANCE = 2e-4


@pytest.mark.parametrize("layout", [["--tp", "2", "--sp"], ["--pp", "2"], ["--pp", "2", "--vpp", "2"], ["--cp", "2"], []],
                         ids=["tp2-sp", "pp2", "pp2-vpp2", "cp2", "dp2"])
def test_parallel_layouts_track_the_single_process_loss(request, tmp_path, layout):
    # Interleaved 1F1B needs layers for 2 stages x 2 virtual stages.
    reference = request.getfixturevalue("reference_4_layers" if "--vpp" in layout else "reference")
    layers = ["--num-layers", "4"] if "--vpp" in layout else []
    initial = reference / "run" / "checkpoints" / "step=0000000"
    torchrun(TRAIN, 2, "--log-dir", str(tmp_path / "run"), "--record", str(tmp_path / "record"),
             "--max-steps", "12", "--restore-weights-from", str(initial), *layers, *layout)
    got, expected = step_records(tmp_path / "record"), step_records(reference / "record")
    errors = [abs(got[s]["loss"] - expected[s]["loss"]) for s in range(1, 13)]
    assert max(errors) <= LAYOUT_TOLERANCE, errors
    # Gradient norms (and so clipping) agree too: rows TP replicates (the SSM group's B/C here)
    # count once, as at TP = 1.
    for s in range(1, 13):
        assert abs(got[s]["grad_norm"] - expected[s]["grad_norm"]) <= 1e-3 * expected[s]["grad_norm"], s
    if not layout:  # data parallel: the two ranks read disjoint halves of every global batch
        ranks = [[json.loads(line) for line in (tmp_path / "record" / f"samples-rank{r}.jsonl").read_text().splitlines()]
                 for r in range(2)]
        read = sorted(i for rank in ranks for entry in rank for i in entry["indices"])
        assert read == list(range(12 * GLOBAL_BATCH))


def test_a_run_resumes_at_another_layout(reference, tmp_path):
    """Weights, optimizer moments and main weights, schedule and data position written by one
    process continue under TP=2 + SP: the checkpoint holds everything in the canonical layout."""
    common = ["--log-dir", str(tmp_path / "run"), "--record", str(tmp_path / "record"), "--max-steps", "12",
              "--checkpoint-every", "4"]
    run_single(*common, "--kill-at-step", "5", killed=True)
    torchrun(TRAIN, 2, *common, "--tp", "2", "--sp")  # resumes from step 4
    got, expected = step_records(tmp_path / "record"), step_records(reference / "record")
    errors = [abs(got[s]["loss"] - expected[s]["loss"]) for s in range(1, 13)]
    assert max(errors) <= LAYOUT_TOLERANCE, errors
    assert got[12]["consumed_samples"] == 12 * GLOBAL_BATCH


def test_tensor_parallel_checkpoint_loads_at_tp1_with_the_same_logits(tmp_path):
    run_dir = tmp_path / "tp2"
    torchrun(TRAIN, 2, "--log-dir", str(run_dir), "--record", str(tmp_path / "record"), "--max-steps", "3",
             "--tp", "2")
    checkpoint = run_dir / "checkpoints" / "step=0000003"
    torchrun("tests/distributed/checkpoint_logits.py", 2, "--checkpoint", str(checkpoint),
             "--out", str(tmp_path / "tp2.pt"))
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    subprocess.run([sys.executable, str(REPO / "tests/distributed/checkpoint_logits.py"), "--checkpoint",
                    str(checkpoint), "--out", str(tmp_path / "tp1.pt")], check=True, env=env, cwd=REPO)
    tp2, tp1 = torch.load(tmp_path / "tp2.pt"), torch.load(tmp_path / "tp1.pt")
    assert tp1.shape == tp2.shape
    assert (tp1 - tp2).abs().max() <= 1e-5 * tp1.abs().max()


# ---------------------------------------------------------------- bad input


def run_cli(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    return subprocess.run([sys.executable, "-m", "falcon_h1.train", *args], capture_output=True, text=True,
                          timeout=300, env=env, cwd=REPO)


def test_missing_data_path_is_named(tmp_path):
    proc = run_cli("--log-dir", str(tmp_path), "--data", str(tmp_path / "nowhere"), "--tokenizer", str(tmp_path))
    assert proc.returncode == 2
    assert f"{tmp_path / 'nowhere'}.bin" in proc.stderr and "falcon_h1.data.preprocess" in proc.stderr
    assert not (tmp_path / "checkpoints").exists()


def test_layout_the_world_cannot_hold_is_refused(tmp_path):
    proc = run_cli("--log-dir", str(tmp_path), "--mock-data", "--tp", "2", "--max-steps", "2")
    assert proc.returncode == 2
    assert "--tp 2 x --pp 1 x --cp 1 = 2 ranks per model replica do not divide the 1 processes" in proc.stderr


def test_tokenizer_larger_than_the_vocabulary_is_refused(tmp_path):
    proc = subprocess.run([sys.executable, str(REPO / TRAIN), "--log-dir", str(tmp_path / "run"), "--record",
                           str(tmp_path / "record"), "--model", json.dumps({"vocab_size": 1000})],
                          capture_output=True, text=True, timeout=300, cwd=REPO)
    assert proc.returncode != 0
    assert "has 4096 tokens but the model's vocab_size is 1000" in proc.stderr
    assert not (tmp_path / "record" / "steps.jsonl").exists()


def test_corrupt_checkpoint_is_named_before_training(reference, tmp_path):
    import shutil

    corrupt = tmp_path / "corrupt"
    shutil.copytree(reference / "run" / "checkpoints" / "step=0000012", corrupt)
    for data_file in (corrupt / "weights").glob("*.distcp"):
        data_file.write_bytes(data_file.read_bytes()[:100])
    proc = run_cli("--log-dir", str(tmp_path / "run"), "--preset", "tiny", "--num-layers", "2",
                   "--resume-from", str(corrupt), "--max-steps", "20")
    assert proc.returncode == 2
    assert f"checkpoint {corrupt} is damaged: weights/__0_0.distcp has 100 bytes" in proc.stderr
    assert "step 1/" not in proc.stdout

    missing = run_cli("--log-dir", str(tmp_path / "run"), "--resume-from", str(tmp_path / "nothing"))
    assert missing.returncode == 2 and f"checkpoint {tmp_path / 'nothing'} does not exist" in missing.stderr
