"""A real one-node Slurm cluster on this machine, for the tests of the Slurm executors.

munged (as the munge user, with a key made here), slurmctld and slurmd (as root) run from one
generated slurm.conf on 127.0.0.1 with free ports; every file they write lives under one temp
directory. Clients find the cluster through `SLURM_CONF` (`cluster.env`). `stop()` ends all three
and waits for them, so nothing is left running.

    with LocalSlurm() as cluster:
        subprocess.run(["sinfo"], env=cluster.env)

    python -m tests.slurm_cluster     # start one by hand, print its SLURM_CONF, stop on Ctrl-C

Debian's packages: slurm-wlm (slurmctld, slurmd, the clients) and munge. `make test` installs
them when missing on a machine where it is root (CI); `unavailable()` says why a cluster cannot
start here.
"""

import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

DAEMONS = ("munged", "slurmctld", "slurmd")
CLIENTS = ("sbatch", "scontrol", "sinfo", "squeue", "srun", "scancel")


def unavailable() -> str | None:
    """Why a cluster cannot start on this machine, or None when it can."""
    missing = [name for name in (*DAEMONS, *CLIENTS) if shutil.which(name, path=_sbin_path()) is None]
    if missing:
        return f"{', '.join(missing)} not installed (Debian: apt-get install slurm-wlm munge; `make test` does it as root)"
    if os.geteuid() != 0:
        return "slurmd must run as root to start jobs as their user"
    try:
        pwd.getpwnam("munge")
    except KeyError:
        return "there is no munge user (the munge package makes it)"
    return None


def _sbin_path() -> str:
    return os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin"])


def wait_for(condition, timeout: float, what: str, logs: str | os.PathLike = "") -> None:
    """Poll `condition()` (which may raise to give up) until it is true, at most `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"waited {timeout:.0f} s for {what}" + (f"; logs in {logs}" if logs else ""))
        time.sleep(0.3)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class LocalSlurm:
    """munged + slurmctld + slurmd for one node (this machine's CPUs) and one partition."""

    def __init__(self, partition: str = "debug"):
        self.partition = partition
        self.hostname = socket.gethostname()
        self.cpus = os.cpu_count() or 1
        self.processes: dict[str, subprocess.Popen] = {}
        # Not under pytest's 0700 tmp_path: the munge user must reach its own directory.
        self.root = Path(tempfile.mkdtemp(prefix="falcon-slurm-"))
        self.root.chmod(0o755)
        self.conf = self.root / "slurm.conf"
        self.munge_socket = self.root / "munge" / "munge.socket"

    @property
    def env(self) -> dict[str, str]:
        """The environment of a client of this cluster (sbatch, scontrol, ...)."""
        return {**os.environ, "SLURM_CONF": str(self.conf), "PATH": _sbin_path()}

    def start(self, timeout: float = 60) -> "LocalSlurm":
        try:
            self._start_munge()
            self._write_conf()
            for daemon in ("slurmctld", "slurmd"):
                log = open(self.root / f"{daemon}.out", "w")
                command = [shutil.which(daemon, path=_sbin_path()), "-D", "-f", str(self.conf)]
                if daemon == "slurmd":
                    command += ["-N", self.hostname]
                self.processes[daemon] = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT,
                                                          env=self.env, start_new_session=True)
            self._wait_until_idle(timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def _start_munge(self) -> None:
        munge = pwd.getpwnam("munge")
        directory = self.munge_socket.parent
        directory.mkdir()
        directory.chmod(0o755)  # munged: clients must reach the socket's directory
        key = directory / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o400)
        for path in (directory, key):
            os.chown(path, munge.pw_uid, munge.pw_gid)
        self.processes["munged"] = subprocess.Popen(
            [shutil.which("munged", path=_sbin_path()), "--foreground", f"--socket={self.munge_socket}",
             f"--key-file={key}", f"--pid-file={directory / 'munged.pid'}", f"--log-file={directory / 'munged.log'}",
             f"--seed-file={directory / 'munged.seed'}"],
            user=munge.pw_uid, group=munge.pw_gid, stdout=subprocess.DEVNULL, stderr=open(self.root / "munged.out", "w"),
            start_new_session=True)
        wait_for(self._munge_ready, 20, "munged to open its socket", self.root)

    def _munge_ready(self) -> bool:
        if self.processes["munged"].poll() is not None:
            raise RuntimeError(f"munged exited with {self.processes['munged'].returncode}: {self.log_tail('munged')}")
        return self.munge_socket.exists()

    def _write_conf(self) -> None:
        for name in ("state", "spool"):
            (self.root / name).mkdir()
        host = self.hostname
        self.conf.write_text("\n".join([
            "ClusterName=falcon-test",
            f"SlurmctldHost={host}(127.0.0.1)",
            f"SlurmctldPort={free_port()}",
            f"SlurmdPort={free_port()}",
            "AuthType=auth/munge",
            "CredType=cred/munge",
            f"AuthInfo=socket={self.munge_socket}",
            "SlurmUser=root",
            "SlurmdUser=root",
            f"StateSaveLocation={self.root / 'state'}",
            f"SlurmdSpoolDir={self.root / 'spool'}",
            f"SlurmctldPidFile={self.root / 'slurmctld.pid'}",
            f"SlurmdPidFile={self.root / 'slurmd.pid'}",
            f"SlurmctldLogFile={self.root / 'slurmctld.log'}",
            f"SlurmdLogFile={self.root / 'slurmd.log'}",
            "ProctrackType=proctrack/linuxproc",
            "TaskPlugin=task/none",
            "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_Core",
            "AccountingStorageType=accounting_storage/none",
            "JobAcctGatherType=jobacct_gather/none",
            "MpiDefault=none",
            "ReturnToService=2",
            "SchedulerType=sched/backfill",
            # Tests read a finished job's state with scontrol: keep it for an hour.
            "MinJobAge=3600",
            f"NodeName={host} NodeAddr=127.0.0.1 CPUs={self.cpus} State=UNKNOWN",
            f"PartitionName={self.partition} Nodes=ALL Default=YES MaxTime=INFINITE State=UP",
            "",
        ]))

    def _wait_until_idle(self, timeout: float) -> None:
        def idle() -> bool:
            for name, process in self.processes.items():
                if process.poll() is not None:
                    raise RuntimeError(f"{name} exited with {process.returncode}: {self.log_tail(name)}")
            shown = subprocess.run(["sinfo", "--noheader", "--format=%t"], env=self.env, capture_output=True,
                                   text=True)
            return shown.returncode == 0 and shown.stdout.strip() == "idle"
        wait_for(idle, timeout, "the node to be idle in sinfo", self.root)

    def log_tail(self, daemon: str, lines: int = 20) -> str:
        for name in (f"{daemon}.log", f"{daemon}.out", f"munge/{daemon}.log"):
            path = self.root / name
            if path.exists() and path.stat().st_size:
                return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
        return "(no log)"

    def job(self, job_id: str) -> dict[str, str]:
        """`scontrol show job`'s fields of one job (JobState, ExitCode, StdOut, Restarts, ...)."""
        shown = subprocess.run(["scontrol", "show", "job", "--oneliner", job_id], env=self.env, capture_output=True,
                               text=True, check=True)
        return dict(field.split("=", 1) for field in shown.stdout.split() if "=" in field)

    def jobs(self) -> list[str]:
        """The ids of every job the controller knows (running, pending or finished)."""
        shown = subprocess.run(["squeue", "--noheader", "--states=all", "--format=%i"], env=self.env,
                               capture_output=True, text=True, check=True)
        return shown.stdout.split()

    def stop(self) -> None:
        """Cancel every job, then end the daemons (slurmd first) and wait for them."""
        if "slurmctld" in self.processes and self.processes["slurmctld"].poll() is None:
            subprocess.run(["scancel", "--full", "--user=root"], env=self.env, capture_output=True, timeout=30)
        for name in reversed(DAEMONS):
            process = self.processes.pop(name, None)
            if process is None or process.poll() is not None:
                continue
            os.killpg(process.pid, signal.SIGTERM)
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
        shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> "LocalSlurm":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


if __name__ == "__main__":
    reason = unavailable()
    if reason:
        raise SystemExit(f"no local Slurm: {reason}")
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # `kill` stops it as Ctrl-C does
    with LocalSlurm() as cluster:
        print(f"export SLURM_CONF={cluster.conf}   # Ctrl-C stops the cluster", flush=True)
        try:
            signal.pause()
        except KeyboardInterrupt:
            pass
