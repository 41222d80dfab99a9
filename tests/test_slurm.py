"""Recipes on a real Slurm cluster, submitted the way users do: `falcon-h1 pretrain ...
run.executor=slurm` on a login node, and `run.executor=slurm_ssh` over SSH from elsewhere.

The cluster is Debian's slurm-wlm (slurmctld + slurmd) with munge, one node on 127.0.0.1
(tests/slurm_cluster.py); the login node for slurm_ssh is Debian's sshd on 127.0.0.1
(tests/ssh_server.py). Jobs run the tiny recipe in 2 CPU tasks (gloo) in this virtual
environment, from directories that are not git repositories.
"""

import json
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from falcon_h1.training.callbacks import read_loss_csv
from falcon_h1.training.checkpoint_io import unfinished_marker
from tests import slurm_cluster, ssh_server
from tests.conftest import cli_env, falcon_h1_cli

STEPS, EVERY, GLOBAL_BATCH = 30, 10, 16
# The tiny recipe on 2 CPU tasks: 30 steps, a checkpoint and a validation every 10.
TINY = ["pretrain", "--factory", "tiny", f"trainer.max_steps={STEPS}", f"trainer.checkpoint_every_n_steps={EVERY}",
        f"trainer.val_check_interval={EVERY}", "trainer.limit_val_batches=2", "-y"]
CPU_TASKS = ["run.executor.gpus_per_node=0", "run.executor.ntasks_per_node=2"]

needs_slurm = pytest.mark.skipif(bool(slurm_cluster.unavailable()),
                                 reason=f"no local Slurm cluster: {slurm_cluster.unavailable()}")
needs_sshd = pytest.mark.skipif(bool(ssh_server.unavailable()), reason=f"no local sshd: {ssh_server.unavailable()}")


@pytest.fixture(scope="module")
def cluster():
    with slurm_cluster.LocalSlurm() as local:
        yield local


@pytest.fixture(scope="module")
def login_node(cluster):
    """An sshd whose sessions see the cluster (as a login node's do)."""
    with ssh_server.LocalSSHServer(session_env={"SLURM_CONF": str(cluster.conf)}) as server:
        yield server


def job_id_in(output: str) -> str:
    return re.search(r"\[slurm\] submitted job (\d+)", output).group(1)


def run_info(checkpoint: Path) -> dict:
    return json.loads((checkpoint / "context" / "run.json").read_text())


@pytest.fixture(scope="module")
def slurm_run(cluster, tmp_path_factory):
    """The tiny recipe submitted with the slurm executor from a plain directory, followed to its end."""
    workdir = tmp_path_factory.mktemp("login")
    done = falcon_h1_cli(*TINY, "run.executor=slurm", "run.executor.account=proj", *CPU_TASKS,
                         tmp_path=workdir, cwd=workdir, env=cluster.env, timeout=900)
    return done, workdir


@needs_slurm
def test_a_recipe_submitted_to_slurm_trains_in_two_tasks_and_the_command_returns_0_once_completed(cluster, slurm_run):
    done, workdir = slurm_run
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    job = cluster.job(job_id_in(done.stdout))
    assert (job["JobState"], job["JobName"], job["NumTasks"], job["Account"]) == ("COMPLETED", "tiny", "2", "proj")
    assert f"trained Falcon-H1 'tiny' to step {STEPS}" in done.stdout  # the job's log, followed by the command
    # The job ran in the directory the command was typed in: the recipe's runs/tiny is there.
    final = run_info(workdir / "runs" / "tiny" / "checkpoints" / f"step={STEPS:07d}")
    assert (final["data_parallel_size"], final["consumed_samples"]) == (2, STEPS * GLOBAL_BATCH)


@needs_slurm
@needs_sshd
def test_a_slurm_ssh_job_requeued_mid_run_resumes_from_its_checkpoint_with_the_same_losses(
        cluster, login_node, slurm_run, tmp_path):
    remote = tmp_path / "cluster"  # the cluster's side: job files, and the job's working directory
    client = {name: value for name, value in login_node.client_env.items() if name != "SLURM_CONF"}
    executor = (f"run.executor=slurm_ssh(host=127.0.0.1,user={login_node.user},port={login_node.port},"
                f"identity={login_node.identity},venv={sys.prefix},job_dir={remote})")
    command = subprocess.Popen([sys.executable, "-m", "falcon_h1.cli", *TINY, executor, *CPU_TASKS],
                               cwd=tmp_path, env=cli_env(tmp_path, client), stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, text=True)
    first = remote / "runs" / "tiny" / "checkpoints" / f"step={EVERY:07d}"
    losses = remote / "runs" / "tiny" / "loss.csv"

    def checkpointed_and_validated() -> bool:  # the step-10 checkpoint is complete and its validation written
        return first.exists() and not unfinished_marker(first).exists() and EVERY in read_loss_csv(losses)[1]

    deadline = time.monotonic() + 600
    while not checkpointed_and_validated() and command.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    assert checkpointed_and_validated(), command.communicate(timeout=60)[0][-4000:]
    (job_id,) = [job for job in cluster.jobs() if cluster.job(job)["JobState"] == "RUNNING"]
    subprocess.run(["scontrol", "requeue", job_id], env=cluster.env, check=True)  # as a preemption does

    output, _ = command.communicate(timeout=600)
    assert command.returncode == 0, output[-6000:]
    job = cluster.job(job_id)
    assert (job["JobState"], job["Restarts"]) == ("COMPLETED", "1")
    assert f"resumed from {first} (step {EVERY}, consumed_samples {EVERY * GLOBAL_BATCH})" in output
    # Step by step, the losses of the uninterrupted slurm run: the same samples in the same order.
    train, validation = read_loss_csv(losses)
    expected_train, expected_validation = read_loss_csv(slurm_run[1] / "runs" / "tiny" / "loss.csv")
    assert sorted(train) == list(range(1, STEPS + 1)) and sorted(validation) == sorted(expected_validation)
    for step in train:
        assert abs(train[step] - expected_train[step]) <= 1e-6, (step, train[step], expected_train[step])
    for step in validation:
        assert abs(validation[step] - expected_validation[step]) <= 1e-6, step
    final = run_info(remote / "runs" / "tiny" / "checkpoints" / f"step={STEPS:07d}")
    assert final["consumed_samples"] == STEPS * GLOBAL_BATCH


@needs_slurm
def test_a_job_whose_task_fails_ends_failed_and_the_command_exits_1_naming_its_log(cluster, tmp_path):
    done = falcon_h1_cli(*TINY, "run.executor=slurm", *CPU_TASKS,
                         "data=pretraining(paths=/missing/web,tokenizer=/missing/tok)",
                         tmp_path=tmp_path, cwd=tmp_path, env=cluster.env, timeout=600)
    assert done.returncode == 1, done.stdout[-3000:] + done.stderr[-3000:]
    assert cluster.job(job_id_in(done.stdout))["JobState"] == "FAILED"
    message = done.stderr.strip().splitlines()[-1]
    log = Path(re.search(r"ended FAILED \(exit code \d+:\d+\); its log: (\S+)$", message).group(1))
    assert "dataset '/missing/web' not found" in log.read_text()


def test_dryrun_outside_a_git_repository_shows_the_sbatch_script(tmp_path):
    done = falcon_h1_cli(
        "pretrain", "--factory", "falcon_h1_7b", "--dryrun", "run.executor=slurm", "run.executor.account=proj",
        "run.executor.partition=batch", "run.executor.nodes=2", "run.executor.time=02:30:00",
        f"run.executor.tunnel.job_dir={tmp_path / 'jobs'}", tmp_path=tmp_path, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    script = [line.strip(" │") for line in done.stdout.splitlines()]
    for expected in ("#SBATCH --account=proj", "#SBATCH --partition=batch", "#SBATCH --nodes=2",
                     "#SBATCH --ntasks-per-node=8", "#SBATCH --gpus-per-node=8", "#SBATCH --time=02:30:00",
                     "#SBATCH --job-name=falcon_h1_7b", f"source {sys.prefix}/bin/activate"):
        assert expected in script, expected
    words = " ".join(done.stdout.replace("│", " ").split())  # the srun line wraps on the console
    # A task that fails ends the others (they would wait in a collective).
    assert f"--kill-on-bad-exit=1 --chdir {tmp_path} python -m nemo_run.core.runners.fdl_runner" in words


def test_a_slurm_job_with_no_environment_for_the_project_is_refused_before_submission(tmp_path):
    done = falcon_h1_cli(*TINY, "run.executor=slurm_ssh(host=login.cluster,user=me,job_dir=/lustre/me/jobs)",
                         tmp_path=tmp_path, cwd=tmp_path)
    assert done.returncode == 1
    assert "run.executor=slurm(venv=/path/to/.venv)" in done.stderr.strip().splitlines()[-1]
    assert not (tmp_path / "nemorun" / "experiments").exists()
