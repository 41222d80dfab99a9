"""Submit a task to Slurm and follow the job until it ends: its state, its log as it grows.

    from falcon_h1.slurm import submit
    state = submit(recipe, executor, name="tiny")   # prints the job's log; state.state == "COMPLETED"

nemo-run waits on Slurm jobs through `sacct`, which needs the cluster's accounting database; this
asks `scontrol show job` (every cluster has it) and falls back to `sacct` only for a job the
controller has already forgotten. Commands run through the executor's tunnel, so the same code
follows a job submitted on a login node or over SSH. A job that Slurm requeues (preemption,
`scontrol requeue`) runs again from the start of its script and is followed on: its log of each
run is log-NAME_JOBID_RESTART.out.
"""

import shlex
import sys
import time
from dataclasses import dataclass

import nemo_run as run
from invoke.exceptions import UnexpectedExit
from nemo_run.core.execution.slurm import SlurmJobDetails

# Slurm's job states that end a job. A requeued job (preempted or `scontrol requeue`) goes back to
# PENDING and runs again: not an end.
ENDED = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE",
         "PREEMPTED", "SPECIAL_EXIT", "REVOKED"}


@dataclass
class JobState:
    state: str  # PENDING, RUNNING, COMPLETED, FAILED, ...
    exit_code: str = ""  # Slurm's "code:signal"
    restarts: int = 0
    reason: str = ""  # why it is pending (Resources, Priority, ...)
    job_id: str = ""
    log: str = ""  # the task log of the job's latest run

    @property
    def ended(self) -> bool:
        return self.state in ENDED


class SubmitError(RuntimeError):
    pass


def name_job(executor: run.SlurmExecutor, name: str) -> None:
    """The Slurm job's name, and the stem of its files' names (nemo-run's default: ACCOUNT-ACCOUNT.TASK)."""
    executor.job_details = SlurmJobDetails(job_name=name)


def submit(task, executor: run.SlurmExecutor, name: str, detach: bool = False, out=sys.stdout) -> JobState | None:
    """sbatch `task` as the job `name` and follow it until it ends (None with `detach`: submit only)."""
    name_job(executor, name)
    # nemo-run's console output and its end-of-run status (through sacct) are left out: this reports.
    with run.Experiment(title=name, executor=executor, log_level="WARN", clean_mode=True, skip_status_at_exit=True,
                        enable_goodbye_message=False) as experiment:
        experiment.add(task, name=name, tail_logs=False)
        try:
            experiment.run(detach=True)
        except UnexpectedExit as error:  # sbatch (or mkdir over SSH) refused: its last word says why
            said = (error.result.stderr or error.result.stdout or "").strip().splitlines()
            raise SubmitError(f"`{error.result.command}` failed: {said[-1] if said else error.result.exited}") from None
        job = experiment.jobs[0]
    job_id = job.handle.rstrip("/").rsplit("/", 1)[-1]
    tunnel, folder = job.executor.tunnel, job.executor.job_details.folder
    print(f"[slurm] submitted job {job_id} ({name}); sbatch script and logs: {folder}", file=out, flush=True)
    if detach:
        print(f"[slurm] follow it with: squeue -j {job_id}; tail -f {folder}/log-{name}_{job_id}_0.out", file=out)
        return None
    try:
        return follow(tunnel, job_id, folder, name, out=out)
    except KeyboardInterrupt:  # the job is Slurm's now: stopping the follower does not stop it
        print(f"\n[slurm] stopped following job {job_id}; it goes on (scancel {job_id} ends it)", file=out, flush=True)
        raise


def job_state(tunnel, job_id: str) -> JobState | None:
    """The job's state from `scontrol` (or `sacct` once the controller has forgotten it); None if
    neither knows the job."""
    shown = tunnel.run(f"scontrol show job --oneliner {job_id}", warn=True, hide=True)
    if shown.return_code == 0 and shown.stdout.strip():
        fields = dict(field.split("=", 1) for field in shown.stdout.split() if "=" in field)
        return JobState(fields.get("JobState", "UNKNOWN"), fields.get("ExitCode", ""),
                        int(fields.get("Restarts", "0") or 0), fields.get("Reason", ""))
    accounted = tunnel.run(f"sacct --noheader --parsable2 --allocations --format=State,ExitCode -j {job_id}",
                           warn=True, hide=True)
    lines = accounted.stdout.strip().splitlines() if accounted.return_code == 0 else []
    if not lines:
        return None
    state, _, exit_code = lines[-1].partition("|")
    return JobState(state.split()[0] if state else "UNKNOWN", exit_code)


class LogFollower:
    """Prints what the job's task logs gain (one file per restart: log-NAME_ID_RESTART.out)."""

    def __init__(self, tunnel, folder: str, job_name: str, job_id: str, out=sys.stdout):
        self.tunnel, self.out = tunnel, out
        self.pattern = f"{folder}/log-{job_name}_{job_id}_*.out"
        self.printed: dict[str, int] = {}
        self.seen: list[str] = []  # the log files of the last poll, in restart order

    def files(self) -> list[str]:
        listed = self.tunnel.run(f"ls -1 {self.pattern} 2>/dev/null", warn=True, hide=True).stdout.split()
        return sorted(listed, key=lambda path: int(path.rsplit("_", 1)[1].split(".")[0]))

    def poll(self) -> None:
        self.seen = self.files()
        for path in self.seen:
            offset = self.printed.get(path, 0)
            text = self.tunnel.run(f"tail -c +{offset + 1} {shlex.quote(path)}", warn=True, hide=True).stdout
            if text:
                self.out.write(text)
                self.out.flush()
                self.printed[path] = offset + len(text.encode())

    def latest(self) -> str:
        """The log of the job's latest run, as of the last poll."""
        return self.seen[-1] if self.seen else self.pattern


def follow(tunnel, job_id: str, folder: str, job_name: str, poll_seconds: float = 3.0, out=sys.stdout) -> JobState:
    """Print the job's log as it is written and its state changes, until the job ends."""
    logs = LogFollower(tunnel, folder, job_name, job_id, out)
    last = None
    while True:
        state = job_state(tunnel, job_id) or JobState("UNKNOWN")
        logs.poll()
        if (state.state, state.restarts, state.reason) != last:
            waiting = f" ({state.reason})" if state.state == "PENDING" and state.reason not in ("", "None") else ""
            restarted = f", restart {state.restarts}" if state.restarts else ""
            print(f"[slurm] job {job_id}: {state.state}{waiting}{restarted}", file=out, flush=True)
            last = (state.state, state.restarts, state.reason)
        if state.ended:
            logs.poll()
            state.job_id, state.log = job_id, logs.latest()
            return state
        time.sleep(poll_seconds)
