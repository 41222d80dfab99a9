"""Where a recipe runs: this machine (torchrun over its GPUs, or the CPU) or a Slurm cluster.

    run.run(recipe, executor=local_executor(devices=8))
    falcon-h1 pretrain --factory falcon_h1_7b run.executor=slurm run.executor.account=ACC ...

On the command line an executor is chosen with `run.executor=local` / `run.executor=slurm`; the
factory's arguments are set as `run.executor=local(devices=2)`, the executor's own fields as
`run.executor.FIELD=VALUE` (e.g. `run.executor.ntasks_per_node=2`).
"""

import os
import sys

import nemo_run as run

# NCCL settings for H100 nodes that the project's tests use (NVLink SHARP multicast off: it is
# not available on every machine and NCCL fails hard when it is asked for and absent).
NCCL_ENV = {"NCCL_NVLS_ENABLE": "0", "TORCH_NCCL_AVOID_RECORD_STREAMS": "1", "CUDA_DEVICE_MAX_CONNECTIONS": "1"}


def use_this_pythons_torchrun() -> None:
    """The local executor launches `torchrun` from PATH: make it this interpreter's."""
    os.environ["PATH"] = os.pathsep.join([os.path.dirname(sys.executable), os.environ.get("PATH", "")])


@run.cli.factory(name="local")
def local_executor(devices: int = 1, env_vars: dict[str, str] | None = None) -> run.Config[run.LocalExecutor]:
    """torchrun with `devices` processes on this machine (one per GPU; on a machine without a
    GPU they run on the CPU with gloo)."""
    return run.Config(run.LocalExecutor, ntasks_per_node=devices, launcher="torchrun",
                      env_vars={**NCCL_ENV, **(env_vars or {})})


def _slurm(tunnel: run.Config, account: str, partition: str | None, nodes: int, gpus_per_node: int, time: str,
           container_image: str | None, container_mounts: list[str] | None,
           env_vars: dict[str, str] | None) -> run.Config[run.SlurmExecutor]:
    return run.Config(
        run.SlurmExecutor, account=account, partition=partition, nodes=nodes, ntasks_per_node=gpus_per_node,
        gpus_per_node=gpus_per_node, time=time, container_image=container_image,
        container_mounts=list(container_mounts or []), tunnel=tunnel, packager=run.Config(run.GitArchivePackager),
        env_vars={**NCCL_ENV, **(env_vars or {})}, exclusive=True, mem="0")


@run.cli.factory(name="slurm")
def slurm_executor(account: str = "", partition: str | None = None, nodes: int = 1, gpus_per_node: int = 8,
                   time: str = "04:00:00", container_image: str | None = None,
                   container_mounts: list[str] | None = None, job_dir: str = "",
                   env_vars: dict[str, str] | None = None) -> run.Config[run.SlurmExecutor]:
    """An sbatch job submitted from this machine (a cluster login node): `nodes` x `gpus_per_node`
    tasks, one per GPU, in `container_image` (e.g. an NGC PyTorch image with this project
    installed) with `container_mounts` ("host:container"); job files go to `job_dir`. The code
    travels as a `git archive` of HEAD. On the command line: run.executor=slurm
    run.executor.account=ACC run.executor.nodes=2 run.executor.tunnel.job_dir=DIR ..."""
    return _slurm(run.Config(run.LocalTunnel, job_dir=job_dir), account, partition, nodes, gpus_per_node, time,
                  container_image, container_mounts, env_vars)


@run.cli.factory(name="slurm_ssh")
def slurm_ssh_executor(host: str = "", user: str = "", identity: str | None = None, account: str = "",
                       partition: str | None = None, nodes: int = 1, gpus_per_node: int = 8, time: str = "04:00:00",
                       container_image: str | None = None, container_mounts: list[str] | None = None,
                       job_dir: str = "", env_vars: dict[str, str] | None = None) -> run.Config[run.SlurmExecutor]:
    """Like `slurm`, submitted over SSH to `user@host` (key file `identity`), e.g. from a laptop
    or notebook: run.executor=slurm_ssh run.executor.tunnel.host=login.cluster
    run.executor.tunnel.user=me run.executor.tunnel.job_dir=/lustre/me/jobs ..."""
    tunnel = run.Config(run.SSHTunnel, host=host, user=user, job_dir=job_dir, identity=identity)
    return _slurm(tunnel, account, partition, nodes, gpus_per_node, time, container_image, container_mounts, env_vars)
