"""`falcon-h1 preprocess`: N tasks of nemo-run's local executor write the shards one process writes,
a re-run after a kill skips the inputs already complete, and bad flags fail in one line."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from falcon_h1.data.preprocess import preprocess
from tests.conftest import REPO, cli_env, falcon_h1_cli, note_session
from tests.test_slurm import cluster, job_id_in, needs_slurm  # noqa: F401,F811 (cluster: the local Slurm, a fixture)

INPUTS = 40
WORDS = "red green blue cyan magenta yellow black white".split()


def text(i: int) -> str:
    return " ".join(WORDS[(i * 3 + k) % len(WORDS)] for k in range(3 + i % 60))


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """40 JSONL inputs (one per data file: enough that a kill lands half-way) and a BPE trained on them."""
    root = tmp_path_factory.mktemp("inputs")
    for n in range(INPUTS):
        (root / f"{n:02d}.jsonl").write_text("".join(json.dumps({"text": text(i)}) + "\n"
                                                     for i in range(n * 1500, n * 1500 + 1500)))
    files = [str(root / f"{n:02d}.jsonl") for n in range(INPUTS)]
    tokenizer = preprocess(files[:1], str(root / "bpe"), train_bpe_vocab=300, log_every=0).tokenizer_dir
    return files, tokenizer


@pytest.fixture(scope="module")
def one_process(inputs, tmp_path_factory):
    """The outputs of one plain `python -m falcon_h1.data.preprocess` on the inputs: name -> bytes."""
    files, tokenizer = inputs
    out = tmp_path_factory.mktemp("one") / "data"
    subprocess.run([sys.executable, "-m", "falcon_h1.data.preprocess", "--input", *files, "--output-prefix", str(out),
                    "--tokenizer", tokenizer, "--shard-size", "20000", "--log-every", "0"], check=True, cwd=REPO)
    return written(out.parent)


def written(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.glob("data*")) if p.is_file()}


def flags(files, tokenizer, prefix, *more) -> list[str]:
    return ["preprocess", "--input", *files, "--output-prefix", str(prefix), "--tokenizer", tokenizer,
            "--shard-size", "20000", "--log-every", "0", *more]


def test_two_local_tasks_write_the_shards_and_manifest_one_process_writes(tmp_path, inputs, one_process):
    files, tokenizer = inputs
    proc = falcon_h1_cli(*flags(files, tokenizer, tmp_path / "out" / "data", "--tasks", "2"), tmp_path=tmp_path,
                         timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    ours = written(tmp_path / "out")
    assert sorted(ours) == sorted(one_process)
    assert all(ours[name] == one_process[name] for name in ours)  # shards, records and the manifest, byte for byte
    assert "skipped 0 inputs already complete" in proc.stdout
    assert f"wrote {tmp_path / 'out' / 'data.manifest.json'}" in proc.stdout


@needs_slurm
def test_two_tasks_on_slurm_write_the_shards_and_manifest_one_process_writes(cluster, tmp_path, inputs, one_process):
    files, tokenizer = inputs
    proc = falcon_h1_cli(*flags(files, tokenizer, tmp_path / "out" / "data", "--tasks", "2", "--executor", "slurm",
                                "--account", "proj"), tmp_path=tmp_path, cwd=tmp_path, env=cluster.env, timeout=300)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    job = cluster.job(job_id_in(proc.stdout))
    # One job of 2 srun tasks, on the CPU.
    assert (job["JobState"], job["JobName"], job["NumTasks"], job["Account"]) == ("COMPLETED", "preprocess", "2",
                                                                                  "proj")
    assert "gres/gpu" not in job.get("TRES", "") + job.get("TresPerNode", "")
    ours = written(tmp_path / "out")
    assert sorted(ours) == sorted(one_process)
    assert all(ours[name] == one_process[name] for name in ours)  # shards, records and the manifest, byte for byte
    assert f"wrote {tmp_path / 'out' / 'data.manifest.json'}" in proc.stdout


def task_pids(marker: str) -> list[int]:
    """The processes whose command line names `marker` (this test's output directory): the tasks."""
    pids = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and marker in (entry / "cmdline").read_bytes().decode(errors="replace"):
                pids.append(int(entry.name))
        except OSError:
            pass
    return pids


def test_a_killed_run_resumes_without_redoing_complete_inputs(tmp_path, inputs, one_process):
    files, tokenizer = inputs
    out = tmp_path / "out"
    with open(tmp_path / "first.log", "w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "falcon_h1.cli", *flags(files, tokenizer, out / "data",
                                                                                "--tasks", "2")],
                                stdout=log, stderr=subprocess.STDOUT, cwd=REPO, env=cli_env(tmp_path, threads=1),
                                start_new_session=True, stdin=subprocess.DEVNULL)
    note_session(proc.pid)
    try:
        deadline = time.monotonic() + 60
        while not list(out.glob("*.done.json")) and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.05)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    # The tasks run in sessions of their own: they stop themselves once their launcher is gone.
    deadline = time.monotonic() + 15
    while task_pids(str(out)) and time.monotonic() < deadline:
        time.sleep(0.1)
    left = task_pids(str(out))
    for pid in left:
        os.kill(pid, signal.SIGKILL)
    assert not left, "tasks outlived the killed command"
    done = {p.name: p.stat().st_mtime_ns for p in out.glob("*.done.json")}
    assert 1 <= len(done) < INPUTS, (tmp_path / "first.log").read_text()
    assert not (out / "data.manifest.json").exists()

    proc = falcon_h1_cli(*flags(files, tokenizer, out / "data", "--tasks", "2"), tmp_path=tmp_path, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"skipped {len(done)} inputs already complete" in proc.stdout
    assert {name: (out / name).stat().st_mtime_ns for name in done} == done  # not redone
    assert written(out) == one_process


@pytest.mark.parametrize("bad, says", [
    (["--tasks", "0"], "--tasks 0: give at least 1"),
    (["--shard-size", "big"], "--shard-size"),
    (["--tasks", "two"], "argument --tasks: invalid int value: 'two'"),
    (["--executor", "kubernetes"], "argument --executor: invalid choice"),
    (["--input", "/nonexistent/x.jsonl"], "input path does not exist: /nonexistent/x.jsonl"),
    (["--tokenizer", "/nonexistent/tok"], "--tokenizer /nonexistent/tok: no such directory"),
])
def test_a_bad_flag_or_input_fails_in_one_line(tmp_path, inputs, bad, says):
    files, tokenizer = inputs
    proc = falcon_h1_cli(*flags(files, tokenizer, tmp_path / "data"), *bad, tmp_path=tmp_path, timeout=60)
    assert proc.returncode == 2
    assert proc.stderr.startswith("error: ") and proc.stderr.count("\n") == 1, proc.stderr
    assert says in proc.stderr
    assert not list(tmp_path.glob("data*"))
