"""A hang watchdog: a rank that makes no progress for `timeout` seconds says so, dumps the Python
stacks of all its threads and exits non-zero, so a job never waits forever on a rank that blocks
(a collective whose peer never comes, a stuck file system, a deadlock).

Each rank beats a heartbeat at training and validation batch boundaries and when a checkpoint save
starts. The clock runs from the sanity validation (or the first step) to the end of training: data
index building, model setup and the checkpoint load before it are not counted. If the rank gets no
beat for `timeout` seconds, a Python thread prints

    rank 1: no progress for 30 s (step 4, in training step); stacks of its threads follow; exiting

then every thread's stack (faulthandler) and exits with status 1; the launcher (torchrun, Lightning's
subprocess launcher, srun) then ends the other ranks. A main thread blocked in C++ normally releases
the GIL; in case it does not, faulthandler's own timer (GIL-free, a little later: `timeout` plus
10 %, at least 5 s) dumps the stacks after a `Timeout (0:00:33)!` line and exits with status 1.

The same callback makes a rank that dies visible. Under Lightning's subprocess launcher (a
`trainer.devices=N` run without torchrun) rank 0 started the other ranks: when it fails it says
which of them died and how (`rank 1 (pid 4242) died: killed by SIGKILL`) and stops the ones still
running, and a rank whose launcher is gone (rank 0, or torchrun's agent, killed) says so and exits
at once rather than waiting in a collective (NCCL waits for its timeout; gloo fails at once).

After an exception in a job of several processes the clock runs on (or starts), for
`shutdown_timeout` seconds, over Lightning's teardown: a rank that raised and then blocks in a
collective of the teardown exits instead of waiting for peers that are gone; `close()` (called by
`pretrain` once `trainer.fit` returns or raises) ends it and all watching.
"""

from __future__ import annotations

import faulthandler
import os
import signal
import sys
import threading
import time

import pytorch_lightning as pl
from pytorch_lightning.utilities import rank_zero_only

from falcon_h1.arguments import check_seconds

# Long enough for a checkpoint save or a validation of a large model between two beats.
DEFAULT_HANG_TIMEOUT = 1800.0
SHUTDOWN_TIMEOUT = 60.0


def _rank() -> int:
    """This process's global rank: Lightning's, from the launcher's environment until the strategy
    sets up the processes, the process group's after."""
    return rank_zero_only.rank


def _stderr():
    """A stream with a file descriptor for faulthandler (pytest and notebooks replace sys.stderr)."""
    for stream in (sys.stderr, sys.__stderr__):
        try:
            stream.fileno()
            return stream
        except (AttributeError, OSError, ValueError):
            continue
    return None


def describe_exit(code: int) -> str:
    """A process's exit status as a reader wants it: 'killed by SIGKILL', 'exited with status 1'."""
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exited with status {code}"


def _launcher_name() -> str | None:
    """Who started this process, when it is a rank that its launcher may die before: torchrun's
    agent, or rank 0 (Lightning's subprocess launcher starts ranks 1.. with LOCAL_RANK set); None
    otherwise (a single process, rank 0 itself, srun). Known from the environment, before the
    rendezvous, where a rank whose rank 0 is gone would wait for the store's timeout (30 min)."""
    if int(os.environ.get("WORLD_SIZE", 1)) <= 1:
        return None
    if "TORCHELASTIC_RUN_ID" in os.environ:
        return "torchrun's agent"
    if int(os.environ.get("LOCAL_RANK", 0)) > 0 and "SLURM_PROCID" not in os.environ:
        return "rank 0, which started it"
    return None


class HangWatchdog(pl.Callback):
    """Exit a rank that makes no progress for `timeout` seconds (None or 0: no watchdog).

    Args:
        timeout: seconds without a heartbeat before the rank reports and exits.
        shutdown_timeout: seconds Lightning's teardown may take after an exception.
        backstop_margin: how much later faulthandler's GIL-free timer fires (default: 10 % of
            `timeout`, at least 5 s).
    """

    def __init__(self, timeout: float | None = DEFAULT_HANG_TIMEOUT, shutdown_timeout: float = SHUTDOWN_TIMEOUT,
                 backstop_margin: float | None = None):
        check_seconds("hang_timeout", timeout, "a process without progress for this long exits; 0: never")
        self.timeout = float(timeout) if timeout else None
        self.shutdown_timeout = shutdown_timeout
        self.backstop_margin = backstop_margin if backstop_margin is not None else \
            max(5.0, 0.1 * (self.timeout or 0))
        self._lock = threading.Lock()
        self._last = time.monotonic()
        self._limit = self.timeout
        self._phase = "starting"
        self._step = 0
        self._running = False
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self._backstop_armed_at: float | None = None
        self._parent: tuple[int, str] | None = None  # (pid, who) of the launcher this rank watches
        self._said_parent_gone = False
        self._closed = False
        who = _launcher_name()
        if who is not None:
            self._parent = (os.getppid(), who)
            threading.Thread(target=self._watch_parent, name="launcher-watch", daemon=True).start()

    # ------------------------------------------------------------ the launcher and the other ranks

    def close(self) -> None:
        """The run is over (`trainer.fit` returned or raised): no more watching."""
        self.stop()
        self._closed = True

    def _parent_gone(self) -> bool:
        return self._parent is not None and os.getppid() != self._parent[0]

    def _say_parent_gone(self) -> None:
        if not self._said_parent_gone:
            self._said_parent_gone = True
            pid, who = self._parent
            print(f"rank {_rank()}: its launcher (pid {pid}, {who}) is gone; exiting", file=_stderr() or sys.stderr,
                  flush=True)

    def _watch_parent(self) -> None:
        while not self._parent_gone():
            time.sleep(1.0)
            if self._closed:
                return
        self._say_parent_gone()
        os._exit(1)

    def _report_children(self, trainer, grace: float = 2.0) -> None:
        """On rank 0 of a subprocess-launched run: say which ranks died, stop those still running."""
        launched = getattr(trainer.strategy.launcher, "procs", None)
        if not launched:
            return
        procs = list(launched)
        # Lightning's child-process observer watches this same list: emptied, it stops, rather than
        # SIGKILL this process too once it sees the ranks stopped here.
        launched.clear()
        deadline = time.monotonic() + grace  # a rank that failed first may still be exiting
        while time.monotonic() < deadline and any(p.poll() is None for p in procs):
            time.sleep(0.1)
        stream = _stderr() or sys.stderr
        for local_rank, proc in enumerate(procs, start=1):
            rank = trainer.node_rank * trainer.num_devices + local_rank
            if proc.poll() is None:
                print(f"rank {_rank()}: stopping rank {rank} (pid {proc.pid})", file=stream, flush=True)
                proc.kill()
            elif proc.returncode != 0:
                print(f"rank {rank} (pid {proc.pid}) died: {describe_exit(proc.returncode)}", file=stream,
                      flush=True)

    # ------------------------------------------------------------ the clock

    def start(self) -> None:
        if self.timeout is None or self._running:
            return
        self._running = True
        self._limit = self.timeout
        self._wake.clear()
        self._thread = threading.Thread(target=self._watch, name="hang-watchdog", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        if not self._running:
            return
        self._running = False
        self._wake.set()
        if self._backstop_armed_at is not None:
            faulthandler.cancel_dump_traceback_later()
            self._backstop_armed_at = None

    def beat(self, phase: str, step: int | None = None, rearm: bool = False) -> None:
        """Progress: the rank is now in `phase` (at `step`)."""
        now = time.monotonic()
        with self._lock:
            self._last, self._phase = now, phase
            if step is not None:
                self._step = step
        # Re-arming faulthandler's timer restarts its thread: at most once a second.
        if self._running and (rearm or self._backstop_armed_at is None or now - self._backstop_armed_at >= 1.0):
            self._arm_backstop(self._limit + self.backstop_margin)
            self._backstop_armed_at = now

    def _arm_backstop(self, seconds: float) -> None:
        stream = _stderr()
        if stream is not None:
            faulthandler.dump_traceback_later(seconds, exit=True, file=stream)

    def _watch(self) -> None:
        poll = min(5.0, max(0.2, self.timeout / 20))
        while not self._wake.wait(poll):
            with self._lock:
                idle, phase, step, limit = time.monotonic() - self._last, self._phase, self._step, self._limit
            if self._running and idle >= limit:
                self._fire(idle, phase, step)

    def _fire(self, idle: float, phase: str, step: int) -> None:
        stream = _stderr() or sys.stderr
        line = f"rank {_rank()}: no progress for {idle:.0f} s (step {step}, {phase}); " \
               f"stacks of its threads follow; exiting"
        try:
            sys.stdout.flush()  # what the rank printed before, then the report
            print(f"\n{line}", file=stream, flush=True)
            faulthandler.dump_traceback(file=stream, all_threads=True)
            print(line, file=stream, flush=True)  # again, below the stacks, where one reads first
        finally:
            os._exit(1)

    # ------------------------------------------------------------ Lightning hooks

    def on_sanity_check_start(self, trainer, pl_module):
        self.start()
        self.beat("in sanity validation", trainer.global_step)

    def on_sanity_check_end(self, trainer, pl_module):
        self.beat("after sanity validation (building the training data loader)", trainer.global_step)

    def on_train_start(self, trainer, pl_module):
        self.start()
        self.beat("starting training", trainer.global_step)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.beat("in training step", trainer.global_step + 1)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.beat("between training steps (loading the next batch, validation or checkpoint)",
                  trainer.global_step)

    def on_validation_start(self, trainer, pl_module):
        self.beat("in validation")

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):
        self.beat(f"in validation batch {batch_idx}")

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        self.beat(f"after validation batch {batch_idx}")

    def on_validation_end(self, trainer, pl_module):
        self.beat("after validation")

    def on_save_checkpoint(self, trainer, pl_module, checkpoint):
        self.beat("saving a checkpoint", trainer.global_step)

    def on_train_end(self, trainer, pl_module):
        self.stop()

    def on_exception(self, trainer, pl_module, exception):
        """The run failed on this rank: name the rank that died, if one did, and let teardown take
        `shutdown_timeout` seconds at most."""
        if self._parent is not None:
            deadline = time.monotonic() + 1.0  # the launcher's sockets close just before it is reaped
            while not self._parent_gone() and time.monotonic() < deadline:
                time.sleep(0.05)
            if self._parent_gone():
                self._say_parent_gone()
        self._report_children(trainer)
        if trainer.world_size <= 1:  # no peer to wait for: nothing can block the teardown on this
            self.stop()
            return
        self.start()  # also when the exception came before the first step
        if not self._running:
            return
        with self._lock:
            self._limit = self.shutdown_timeout
        message = (str(exception).splitlines() or [""])[0][:200]
        self.beat(f"shutting down after {type(exception).__name__}: {message}", rearm=True)
