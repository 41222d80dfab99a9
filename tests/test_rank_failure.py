"""A rank that dies or hangs ends the job, promptly and by name; the relaunched job resumes exactly.

Real 2-process runs on CPU (gloo) of tests/distributed/train_tiny.py, under torchrun and under
Lightning's own subprocess launcher (`trainer.devices=2` without torchrun), with faults injected
into one rank: SIGKILL after a step, an exception before the ranks meet, a block (sleep) before
the next step's collectives, a block in C code that holds the GIL. A job of 2 processes takes
about 7 s to start here, so the file takes about 1.5 minutes.
"""

import json
import os
import re
import signal
import sys
from pathlib import Path

from tests.conftest import REPO, run_session_and_wait_for_its_processes, step_records

TRAIN = str(REPO / "tests/distributed/train_tiny.py")
GLOBAL_BATCH = 8
HANG_TIMEOUT = 6  # seconds; a step here takes well under 1 s


def run_job(cmd: list[str], timeout: float = 120) -> tuple[int, str, float]:
    """Run `cmd` in its own session, 1 thread per process (2 processes on CI's 2 cores); return its
    exit code, output and the time it ended. After the command itself exits, every process it
    started must end by itself within 10 s (none is left waiting on a dead peer)."""
    env = dict(os.environ, PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1")
    code, text, ended, outlived = run_session_and_wait_for_its_processes(cmd, REPO, env, timeout, linger=10)
    assert code is not None, f"the job ran past {timeout} s:\n{text[-6000:]}"
    assert not outlived, f"processes of the job outlived it:\n{text[-6000:]}"
    return code, text, ended


def torchrun(*args: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", TRAIN, *args]


def fault_time(record: Path, rank: int) -> float:
    return json.loads((record / f"fault-rank{rank}.json").read_text())["time"]


def test_a_killed_rank_ends_the_job_by_name_and_the_relaunch_resumes_exactly(tmp_path):
    record = tmp_path / "record"
    common = ["--log-dir", str(tmp_path / "run"), "--record", str(record), "--max-steps", "6",
              "--checkpoint-every", "3"]
    code, text, ended = run_job(torchrun(*common, "--fault-rank", "1", "--kill-at-step", "5"))
    assert code != 0
    assert ended - fault_time(record, 1) < 60
    # torchrun's summary: the first failure is rank 1, killed by SIGKILL
    root_cause = text[text.index("Root Cause"):]
    assert re.search(r"rank\s*: 1 \(local_rank: 1\)\s*\n\s*exitcode\s*: -9", root_cause), text[-3000:]
    assert "Signal 9 (SIGKILL) received" in root_cause
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir()) == ["step=0000003"]
    # the job ran uninterrupted up to the kill: rank 0 recorded steps 1-5
    uninterrupted = [json.loads(line) for line in (record / "steps.jsonl").read_text().splitlines()]
    assert [entry["step"] for entry in uninterrupted] == [1, 2, 3, 4, 5]

    code, text, _ = run_job(torchrun(*common))  # the same command again: resumes from step 3
    assert code == 0, text[-6000:]
    assert re.search(r"resumed from \S+step=0000003 \(step 3, consumed_samples 24\)", text), text[-3000:]
    resumed = step_records(record)  # steps 4 and 5 again, then 6
    assert sorted(resumed) == [1, 2, 3, 4, 5, 6]
    for before in uninterrupted[3:]:
        after = resumed[before["step"]]
        assert abs(after["loss"] - before["loss"]) <= 1e-6, (before, after)
        assert after["grad_norm"] == before["grad_norm"] or abs(after["grad_norm"] - before["grad_norm"]) <= 1e-6
    for step, entry in resumed.items():
        assert entry["consumed_samples"] == step * GLOBAL_BATCH


def test_a_failed_rank_of_a_lightning_launched_job_ends_it_by_name(tmp_path):
    """`trainer.devices=2` without torchrun: rank 0 starts rank 1 by running the command again.
    Each run_job checks that no process outlives the job."""
    common = [sys.executable, TRAIN, "--devices", "2", "--max-steps", "5"]
    # rank 0 fails before the rendezvous: rank 1 waited for rank 0's store (30 min) before the fix
    code, text, _ = run_job([*common, "--log-dir", str(tmp_path / "early"), "--record", str(tmp_path / "early"),
                             "--fault-rank", "0", "--raise-before-rendezvous"])
    assert code != 0 and "RuntimeError: injected fault before the rendezvous" in text
    assert re.search(r"rank 0: stopping rank 1 \(pid \d+\)", text), text[-4000:]

    record = tmp_path / "record1"
    code, text, ended = run_job([*common, "--log-dir", str(tmp_path / "run1"), "--record", str(record),
                                 "--fault-rank", "1", "--kill-at-step", "3"])
    assert code != 0 and ended - fault_time(record, 1) < 60
    # said by rank 0 on its failure, or by Lightning's observer of the ranks it started (every 5 s)
    # when that comes first: it then SIGKILLs rank 0 too
    assert re.search(r"rank 1 \(pid \d+\) died: killed by SIGKILL|"
                     r"\[rank: 1\] Child process with PID \d+ terminated with code -9", text), text[-4000:]

    # rank 0 (the launcher) killed: rank 1 says so and exits (run_job: no process is left)
    record = tmp_path / "record0"
    code, text, ended = run_job([*common, "--log-dir", str(tmp_path / "run0"), "--record", str(record),
                                 "--fault-rank", "0", "--kill-at-step", "3"])
    assert code == -signal.SIGKILL and ended - fault_time(record, 0) < 60
    assert re.search(r"rank 1: its launcher \(pid \d+, rank 0, which started it\) is gone; exiting", text), \
        text[-4000:]


def test_a_blocked_rank_is_reported_by_the_watchdog_with_its_stack(tmp_path):
    record = tmp_path / "record"
    code, text, ended = run_job(torchrun("--log-dir", str(tmp_path / "run"), "--record", str(record),
                                         "--max-steps", "6", "--hang-timeout", str(HANG_TIMEOUT),
                                         "--fault-rank", "1", "--block-at-step", "3"))
    assert code != 0
    blocked = fault_time(record, 1)
    assert HANG_TIMEOUT - 1 <= ended - blocked < HANG_TIMEOUT + 15, ended - blocked
    line = re.search(r"rank 1: no progress for (\d+) s \(step 3, in training step\); stacks of its threads follow; "
                     r"exiting\n", text)
    assert line and HANG_TIMEOUT <= int(line.group(1)) <= HANG_TIMEOUT + 2, text[-6000:]
    # its stacks: the main thread is where train_tiny.py blocks
    stacks = text[line.end():]
    assert re.search(r'File ".*train_tiny\.py", line \d+ in on_train_batch_end', stacks[:6000]), stacks[:6000]
    # the other rank, blocked in the next collective, is reported too, or stopped by torchrun
    assert re.search(r"rank 0: no progress for \d+ s", text) or "Sending process" in text


def test_a_rank_blocked_holding_the_gil_is_stopped_by_faulthandler(tmp_path):
    """The watchdog's Python thread cannot run while the main thread holds the GIL in C code:
    faulthandler's own timer (timeout + 5 s) dumps the stacks and exits."""
    record = tmp_path / "record"
    code, text, ended = run_job(torchrun("--log-dir", str(tmp_path / "run"), "--record", str(record),
                                         "--max-steps", "6", "--hang-timeout", str(HANG_TIMEOUT),
                                         "--fault-rank", "1", "--block-at-step", "3", "--block-holding-gil"))
    assert code != 0
    assert ended - fault_time(record, 1) < HANG_TIMEOUT + 5 + 15
    assert f"Timeout (0:00:{HANG_TIMEOUT + 5:02d})!" in text, text[-6000:]  # faulthandler's line
    backstop = text[text.index("Timeout (0:00:"):]
    assert re.search(r'File ".*train_tiny\.py", line \d+ in on_train_batch_end', backstop[:8000])
    assert "rank 1: no progress" not in text  # rank 1's Python thread never ran
    # rank 0, waiting in a collective (the GIL released), was reported by its Python thread
    assert re.search(r"rank 0: no progress for \d+ s", text)
    assert re.search(r"rank\s*: 1 \(local_rank: 1\)\s*\n\s*exitcode\s*: 1 ", text)


def test_the_hang_timeout_is_set_by_the_recipes_and_the_main_job(tmp_path):
    import fiddle as fdl

    from falcon_h1.train import parse_args
    from falcon_h1.training.watchdog import DEFAULT_HANG_TIMEOUT, HangWatchdog
    from recipes import tiny

    assert parse_args([]).hang_timeout == DEFAULT_HANG_TIMEOUT == 1800
    assert parse_args(["--hang-timeout", "0"]).hang_timeout == 0
    config = tiny.trainer(dir=str(tmp_path))
    assert config.hang_timeout == DEFAULT_HANG_TIMEOUT
    for value, expected in ((20, 20.0), (0, None)):
        config.hang_timeout = value  # `trainer.hang_timeout=20` on the command line
        watchdogs = [c for c in fdl.build(config).callbacks if isinstance(c, HangWatchdog)]
        assert [w.timeout for w in watchdogs] == [expected]
