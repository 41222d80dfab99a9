import json
import os
import signal
import subprocess
from pathlib import Path

import pytest

from tests.conftest import REPO, note_session

# No TRITON_F32_DEFAULT here: Triton's float32 dot default (tf32) stays as users get it. The only
# Triton dots of the project's float32 paths are the SSD scan's, which ask for TF32x3 themselves
# (kernels/ssd_triton.py); the other project kernels and mamba_ssm's gated norm have no dots, and
# mamba_ssm's SSD is checked in bf16 only. IEEE float32 dots made every mamba_ssm kernel compile
# for minutes, and the variable is part of Triton's cache key: set here, it also made the carried
# autotune choices (.triton_cache, saved without it) miss.


def run_once(args: list, gpus: str, log: Path, done: Path, nemorun_home: Path) -> int:
    """Run `args` on GPUs `gpus` with its output in `log`, unless `done` (the file a finished run
    leaves) exists: a later pytest call on the same machine reuses the runs that finished."""
    if done.exists():
        return 0
    env = dict(os.environ, NEMORUN_HOME=str(nemorun_home), CUDA_VISIBLE_DEVICES=gpus, COLUMNS="200",
               PYTHONWARNINGS="ignore")
    with open(log, "w") as output:
        # In a session of its own, killed whole however the wait ends: the launcher's training
        # processes must not outlive a test that timed out (they would hold the GPU).
        proc = subprocess.Popen([str(a) for a in args], stdout=output, stderr=subprocess.STDOUT, env=env, cwd=REPO,
                                start_new_session=True)
        note_session(proc.pid)
        try:
            return proc.wait(timeout=1200)
        finally:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def _record(entry: dict) -> None:
    """With FALCON_H1_GPU_RESULTS set (tests/gpu/run.sh sets it), one JSON line, written by the
    process that reports (xdist's controller, not its workers): the suite's summary counts from
    these lines even when a timeout cuts the run short."""
    path = os.environ.get("FALCON_H1_GPU_RESULTS")
    if path and not os.environ.get("PYTEST_XDIST_WORKER"):
        with open(path, "a") as f:
            f.write(json.dumps(entry) + "\n")


def pytest_collection_finish(session):
    _record({"collected": len(session.items)})


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_node_collection_finished(node, ids):
    _record({"collected": len(ids)})  # each worker collects the same tests


def pytest_runtest_logreport(report):
    _record({"test": report.nodeid, "when": report.when, "outcome": report.outcome,
             "seconds": round(report.duration, 2)})


# Test modules whose tests the xdist workers take one by one: they share nothing costly.
SPREAD = ("test_gpu_kernels.py",)


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config, log):
    """Under pytest-xdist (tests/gpu/run.sh): each test module goes whole to one worker, so that
    the runs its tests share through module fixtures (trainings, fine-tunings, probes) are made
    once; the modules in SPREAD go test by test to whichever worker is free. (xdist's own
    `--dist loadgroup` marks do not group under pytest 9: it renames node ids, which pytest 9
    ignores.)"""
    from xdist.scheduler import LoadScopeScheduling

    class ModulesWholeKernelsSpread(LoadScopeScheduling):
        def _split_scope(self, nodeid):
            module = nodeid.split("::", 1)[0]
            return nodeid if module.rsplit("/", 1)[-1] in SPREAD else module

        def _reschedule(self, node):
            # One test queued behind the running one, not xdist's up to three: a kernel test can
            # compile for a minute, and the last ones should not wait in a busy worker's queue
            # while another worker idles. (A worker needs the next test to run its current one.)
            if not node.shutting_down and self.workqueue and self._pending_of(self.assigned_work[node]) > 1:
                return
            super()._reschedule(node)

    return ModulesWholeKernelsSpread(config, log)
