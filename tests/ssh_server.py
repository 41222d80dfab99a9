"""A real OpenSSH server on 127.0.0.1, for the tests of `slurm_ssh` (a cluster's login node).

Debian's sshd runs from a config written here: a free port on loopback only, a host key and one
client key made here, key login only, and `SetEnv` for what every session should see (the local
cluster's SLURM_CONF). `client_env` is a client environment whose `ssh` (the one rsync starts)
trusts this server's host key and uses the client key through its own ssh_config, as a user's
~/.ssh/config would. `stop()` ends sshd and removes every file.

    with LocalSSHServer(session_env={"SLURM_CONF": conf}) as server:
        server.port, server.identity
"""

import os
import shutil
import signal
import subprocess
import tempfile
from pathlib import Path

from tests.slurm_cluster import free_port, wait_for

SSHD = "/usr/sbin/sshd"


def unavailable() -> str | None:
    """Why an sshd cannot start on this machine, or None when it can."""
    missing = [name for name in (SSHD, "ssh", "ssh-keygen", "rsync") if shutil.which(name) is None]
    if missing:
        return f"{', '.join(missing)} not installed (Debian: apt-get install openssh-server rsync; `make test` does it)"
    if os.geteuid() != 0:
        return "sshd must run as root to log a user in"
    return None


class LocalSSHServer:
    def __init__(self, session_env: dict[str, str] | None = None):
        self.session_env = session_env or {}
        self.user = "root"
        self.port = free_port()
        self.root = Path(tempfile.mkdtemp(prefix="falcon-sshd-"))
        self.identity = self.root / "client_ed25519"
        self.process: subprocess.Popen | None = None

    @property
    def client_env(self) -> dict[str, str]:
        """An environment whose `ssh` knows this server (a PATH entry with an `ssh` that reads our ssh_config)."""
        return {**os.environ, "PATH": os.pathsep.join([str(self.root / "bin"), os.environ.get("PATH", "")])}

    def start(self, timeout: float = 20) -> "LocalSSHServer":
        try:
            self._write_keys_and_configs()
            Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)  # sshd's privilege separation directory
            self.process = subprocess.Popen([SSHD, "-D", "-e", "-f", str(self.root / "sshd_config")],
                                            stdout=subprocess.DEVNULL, stderr=open(self.root / "sshd.log", "w"),
                                            start_new_session=True)
            wait_for(self._answers, timeout, "sshd to accept a login", self.root)
        except BaseException:
            self.stop()
            raise
        return self

    def _write_keys_and_configs(self) -> None:
        host_key = self.root / "host_ed25519"
        for key in (host_key, self.identity):
            subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True)
        shutil.copy(f"{self.identity}.pub", self.root / "authorized_keys")
        set_env = " ".join(f"{name}={value}" for name, value in self.session_env.items())
        (self.root / "sshd_config").write_text("\n".join([
            f"Port {self.port}",
            "ListenAddress 127.0.0.1",
            f"HostKey {host_key}",
            f"AuthorizedKeysFile {self.root / 'authorized_keys'}",
            "PubkeyAuthentication yes",
            "PasswordAuthentication no",
            "KbdInteractiveAuthentication no",
            "PermitRootLogin prohibit-password",
            "StrictModes no",  # the keys live under /tmp
            "UsePAM no",
            f"PidFile {self.root / 'sshd.pid'}",
            "Subsystem sftp internal-sftp",  # paramiko copies files over SFTP
            *([f"SetEnv {set_env}"] if set_env else []),
            "",
        ]))
        (self.root / "known_hosts").write_text(f"[127.0.0.1]:{self.port} {Path(f'{host_key}.pub').read_text()}")
        (self.root / "ssh_config").write_text("\n".join([
            "Host 127.0.0.1",
            f"  Port {self.port}",
            f"  IdentityFile {self.identity}",
            f"  UserKnownHostsFile {self.root / 'known_hosts'}",
            "  StrictHostKeyChecking yes",
            "  BatchMode yes",
            "",
        ]))
        wrapper = self.root / "bin" / "ssh"
        wrapper.parent.mkdir()
        wrapper.write_text(f'#!/bin/sh\nexec {shutil.which("ssh")} -F {self.root / "ssh_config"} "$@"\n')
        wrapper.chmod(0o755)

    def _answers(self) -> bool:
        if self.process.poll() is not None:
            raise RuntimeError(f"sshd exited with {self.process.returncode}: "
                               f"{(self.root / 'sshd.log').read_text()[-2000:]}")
        probe = subprocess.run(["ssh", f"{self.user}@127.0.0.1", "true"], env=self.client_env,
                               capture_output=True, timeout=20)
        return probe.returncode == 0

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
        shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> "LocalSSHServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
