"""Where a recipe runs: this machine (torchrun over its GPUs, or the CPU) or a Slurm cluster.

    run.run(recipe, executor=local_executor(devices=8))
    falcon-h1 pretrain --factory falcon_h1_7b run.executor=slurm run.executor.account=ACC ...

On the command line an executor is chosen with `run.executor=local` / `run.executor=slurm`; the
factory's arguments are set as `run.executor=slurm(account=ACC,nodes=2)`, the executor's own fields
as `run.executor.FIELD=VALUE` (e.g. `run.executor.time=08:00:00`).

A Slurm job runs the project where it is installed: the virtual environment `venv` (the one this
command runs from, by default, for `slurm`: login and compute nodes share the file system) or
`container_image`, an image with the project installed (docs/recipes.md, "Running on Slurm"). No
code is copied into the job. It runs in `workdir`, so relative paths in the recipe (`runs/NAME`,
data prefixes) are those of the directory the command was typed in.
"""

import os
import shlex
import sys

import nemo_run as run

# NCCL settings for H100 nodes that the project's tests use (NVLink SHARP multicast off: it is
# not available on every machine and NCCL fails hard when it is asked for and absent).
NCCL_ENV = {"NCCL_NVLS_ENABLE": "0", "TORCH_NCCL_AVOID_RECORD_STREAMS": "1", "CUDA_DEVICE_MAX_CONNECTIONS": "1"}


def use_this_pythons_torchrun() -> None:
    """The local executor launches `torchrun` from PATH: make it this interpreter's."""
    os.environ["PATH"] = os.pathsep.join([os.path.dirname(sys.executable), os.environ.get("PATH", "")])


def this_venv() -> str | None:
    """The virtual environment this Python runs in, if any."""
    return sys.prefix if sys.prefix != sys.base_prefix else None


@run.cli.factory(name="local")
def local_executor(devices: int = 1, env_vars: dict[str, str] | None = None) -> run.Config[run.LocalExecutor]:
    """torchrun with `devices` processes on this machine (one per GPU; on a machine without a
    GPU they run on the CPU with gloo)."""
    return run.Config(run.LocalExecutor, ntasks_per_node=devices, launcher="torchrun",
                      env_vars={**NCCL_ENV, **(env_vars or {})})


def _slurm(tunnel: run.Config, account: str, partition: str | None, nodes: int, gpus_per_node: int,
           ntasks_per_node: int | None, time: str, venv: str | None, workdir: str | None,
           container_image: str | None, container_mounts: list[str] | None,
           env_vars: dict[str, str] | None) -> run.Config[run.SlurmExecutor]:
    # One task per GPU; on nodes without GPUs (gpus_per_node=0) `ntasks_per_node` tasks on the CPU.
    ntasks = ntasks_per_node or gpus_per_node or 1
    return run.Config(
        # No account: the cluster's default (nemo-run would send an empty --account). nemo-run names
        # a job ACCOUNT-ACCOUNT.TASK unless given a prefix; the falcon-h1 command names it after the recipe.
        run.SlurmExecutor, account=account or None, job_name_prefix="falcon-h1.", partition=partition, nodes=nodes,
        ntasks_per_node=ntasks, gpus_per_node=ntasks if gpus_per_node else None, time=time,
        container_image=container_image, container_mounts=list(container_mounts or []), tunnel=tunnel,
        # The project is installed where the job runs (venv or image): nothing to ship.
        packager=run.Config(run.Packager),
        setup_lines=f"source {shlex.quote(os.path.join(venv, 'bin', 'activate'))}" if venv and not container_image
        else None,
        # A task that fails ends the job's other tasks at once (plain srun lets them wait in a collective).
        srun_args=["--kill-on-bad-exit=1", *(["--chdir", workdir] if workdir and not container_image else [])],
        env_vars={**NCCL_ENV, **(env_vars or {})}, exclusive=True, mem="0",
        poll_estimated_start_time=False)  # the falcon-h1 command reports the job's state itself


@run.cli.factory(name="slurm")
def slurm_executor(account: str = "", partition: str | None = None, nodes: int = 1, gpus_per_node: int = 8,
                   ntasks_per_node: int | None = None, time: str = "04:00:00", venv: str | None = None,
                   workdir: str | None = None, container_image: str | None = None,
                   container_mounts: list[str] | None = None, job_dir: str = "",
                   env_vars: dict[str, str] | None = None) -> run.Config[run.SlurmExecutor]:
    """An sbatch job submitted from this machine (a cluster login node): `nodes` x `gpus_per_node`
    tasks, one per GPU (gpus_per_node=0: `ntasks_per_node` CPU tasks). The job activates `venv`
    (default: the virtual environment of this command) or runs in `container_image` (an image
    with the project installed; `container_mounts` "host:container"), in `workdir` (default: the
    current directory). nemo-run's job files (sbatch script, logs) go under `job_dir` (default
    ~/.nemo_run/experiments)."""
    return _slurm(run.Config(run.LocalTunnel, job_dir=job_dir), account, partition, nodes, gpus_per_node,
                  ntasks_per_node, time, venv or this_venv(), workdir or os.getcwd(), container_image,
                  container_mounts, env_vars)


@run.cli.factory(name="slurm_ssh")
def slurm_ssh_executor(host: str = "", user: str = "", identity: str | None = None, port: int | None = None,
                       account: str = "", partition: str | None = None, nodes: int = 1, gpus_per_node: int = 8,
                       ntasks_per_node: int | None = None, time: str = "04:00:00", venv: str | None = None,
                       workdir: str | None = None, container_image: str | None = None,
                       container_mounts: list[str] | None = None, job_dir: str = "",
                       env_vars: dict[str, str] | None = None) -> run.Config[run.SlurmExecutor]:
    """Like `slurm`, submitted over SSH to `user@host` (key file `identity`), e.g. from a laptop
    or notebook. Paths are the cluster's: `venv` (or `container_image`) must be named, `job_dir`
    is where job files go, and `workdir` (default: `job_dir`) where relative paths resolve."""
    tunnel = run.Config(run.SSHTunnel, host=host, user=user, port=port, job_dir=job_dir, identity=identity)
    return _slurm(tunnel, account, partition, nodes, gpus_per_node, ntasks_per_node, time, venv,
                  workdir or job_dir or None, container_image, container_mounts, env_vars)
