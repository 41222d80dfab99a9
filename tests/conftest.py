"""Shared fixtures. Tests run on CPU (CI has no GPU); GPU tests are marked `gpu`."""

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import pytest

warnings.filterwarnings("ignore", message=".*Transformer Engine and Apex are not installed.*")
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def single_rank():
    """A one-process gloo world with Megatron's parallel state (TP = PP = CP = DP = 1)."""
    from falcon_h1.single_process import single_process_megatron

    with single_process_megatron(seed=1234):
        yield


@pytest.fixture(autouse=True)
def fresh_rendezvous_port():
    """Lightning's in-process runs leave MASTER_ADDR/MASTER_PORT in os.environ. Left there, every
    later run of this worker (in process, or a process it starts) would rendezvous on that one port,
    a port of the ephemeral range that the other worker's connections may take in the meantime."""
    yield
    for name in ("MASTER_ADDR", "MASTER_PORT"):
        os.environ.pop(name, None)


def run_session(cmd: list[str], cwd, env: dict, timeout: float) -> tuple[int | None, str]:
    """Run `cmd` in its own session and return (exit code, output); the code is None when it ran
    past `timeout`. Output goes through a file, not a pipe, and the whole session is killed
    afterwards: a SIGKILLed trainer leaves checkpoint-writer helper processes behind that would
    otherwise hold a pipe open."""
    code, output, _, _ = run_session_and_wait_for_its_processes(cmd, cwd, env, timeout, linger=0)
    return code, output


def run_session_and_wait_for_its_processes(cmd: list[str], cwd, env: dict, timeout: float,
                                           linger: float) -> tuple[int | None, str, float, bool]:
    """run_session, which also gives the time `cmd` exited and, after waiting up to `linger` seconds
    for the other processes it started to end by themselves, whether any outlived it (killed then).
    The session is killed however the wait ends (also a test timeout or ^C interrupting it): its
    own session keeps it from the signals the test run gets."""
    with tempfile.TemporaryFile("w+") as output:
        proc = subprocess.Popen(cmd, stdout=output, stderr=subprocess.STDOUT, env=env, cwd=cwd,
                                start_new_session=True)
        note_session(proc.pid)
        try:
            try:
                code = proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                code = None
            ended = time.time()
            deadline = time.monotonic() + linger
            while time.monotonic() < deadline and _session_alive(proc.pid):
                time.sleep(0.2)
            outlived = _session_alive(proc.pid)
        finally:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        output.seek(0)
        return code, output.read(), ended, outlived


def note_session(session: int) -> None:
    """Where FALCON_H1_TEST_SESSIONS names a file (tests/gpu/run.sh sets it), add the id of a
    process session a test started: when a time limit kills the test run, whatever the session
    still runs (a training, its ranks) has escaped the kill, and the script ends it by this id."""
    path = os.environ.get("FALCON_H1_TEST_SESSIONS")
    if path:
        with open(path, "a") as f:
            f.write(f"{session}\n")


def _session_alive(session: int) -> bool:
    try:
        os.killpg(session, 0)
        return True
    except ProcessLookupError:
        return False


def run_in_session(cmd: list[str], timeout: int = 600, env: dict | None = None) -> tuple[int, str]:
    """run_session from the repository, Python warnings off; running past `timeout` raises."""
    code, output = run_session(cmd, REPO, dict(os.environ, PYTHONWARNINGS="ignore", **(env or {})), timeout)
    if code is None:
        raise subprocess.TimeoutExpired(cmd, timeout, output=output)
    return code, output


def step_records(record: Path) -> dict[int, dict]:
    """Step -> the entry tests/distributed/train_tiny.py wrote for it under `record`; a step run
    twice (before a kill and after the resume) keeps the later entry."""
    out = {}
    for line in (record / "steps.jsonl").read_text().splitlines():
        entry = json.loads(line)
        out[entry["step"]] = entry
    return out


def cli_env(tmp_path, base: dict | None = None, threads: int | None = None) -> dict[str, str]:
    """The environment of a `falcon-h1` command in a test: its own nemo-run home under tmp_path;
    `threads` caps OMP threads (for runs side by side on CI's 2 cores)."""
    return dict(base or os.environ, NEMORUN_HOME=str(tmp_path / "nemorun"), COLUMNS="250", PYTHONWARNINGS="ignore",
                **({"OMP_NUM_THREADS": str(threads)} if threads else {}))


def falcon_h1_cli(*args, tmp_path, timeout=600, threads: int | None = None, cwd=REPO,
                  env: dict | None = None) -> subprocess.CompletedProcess:
    """The project's console script (`python -m falcon_h1.cli ARGS`) run in `cwd`, with cli_env
    over `env` (default: this process's environment)."""
    return subprocess.run([sys.executable, "-m", "falcon_h1.cli", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, env=cli_env(tmp_path, env, threads), timeout=timeout, stdin=subprocess.DEVNULL)


def torchrun(script: str, nproc: int, *args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    """Run `script` under torchrun with `nproc` CPU processes (gloo); fail with its output on error."""
    env = dict(os.environ, PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           str(REPO / script), *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=REPO)
    if proc.returncode != 0:
        pytest.fail(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-8000:]}")
    return proc
