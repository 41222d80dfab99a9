"""How many processes a command starts, the way Lightning and nemo-run users expect:

- `trainer.devices=N` with no executor: Lightning starts the other N-1 processes by re-running the
  command as typed (the console script must leave sys.argv alone for that);
- an executor's `ntasks_per_node` / `nodes` set the trainer's `devices` / `num_nodes` (and the
  trainer's set the executor's when only they are named); named on both sides and different, the
  command fails before anything launches, naming both.
"""

import json

from tests.conftest import falcon_h1_cli


def data_parallel_size(checkpoint) -> int:
    return json.loads((checkpoint / "context" / "run.json").read_text())["data_parallel_size"]


def run_cli(*args, tmp_path):
    done = falcon_h1_cli(*args, "-y", tmp_path=tmp_path, timeout=900, threads=1)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    return done


def test_trainer_devices_without_an_executor_trains_on_that_many_processes(tmp_path):
    pretrain_dir, finetune_dir = tmp_path / "pretrain", tmp_path / "finetune"
    run_cli("pretrain", "--factory", "tiny", "trainer.devices=2", "trainer.max_steps=5",
            f"trainer.log_dir={pretrain_dir}", tmp_path=tmp_path)
    checkpoint = pretrain_dir / "checkpoints" / "step=0000005"
    assert data_parallel_size(checkpoint) == 2

    sft = tmp_path / "sft.jsonl"
    sft.write_text("".join(json.dumps({"prompt": f"n = {i}\n", "response": f"print({i})"}) + "\n" for i in range(64)))
    run_cli("finetune", "--factory", f"tiny(checkpoint={checkpoint}, data={sft})", "trainer.devices=2",
            "trainer.max_steps=5", f"trainer.log_dir={finetune_dir}", tmp_path=tmp_path)
    assert data_parallel_size(finetune_dir / "checkpoints" / "step=0000005") == 2


def test_the_local_executors_tasks_per_node_set_the_trainers_devices(tmp_path):
    run_dir = tmp_path / "run"
    run_cli("pretrain", "--factory", "tiny", "trainer.max_steps=3", f"trainer.log_dir={run_dir}",
            "run.executor=local", "run.executor.ntasks_per_node=2", tmp_path=tmp_path)
    assert data_parallel_size(run_dir / "checkpoints" / "step=0000003") == 2


def test_executor_and_trainer_naming_different_process_counts_fail_before_launch(tmp_path):
    done = falcon_h1_cli("pretrain", "--factory", "tiny", "trainer.devices=4", "run.executor=local",
                         "run.executor.ntasks_per_node=2", "-y", tmp_path=tmp_path)
    assert done.returncode != 0
    assert "trainer.devices=4 but run.executor.ntasks_per_node=2" in done.stderr + done.stdout
    assert not (tmp_path / "nemorun" / "experiments").exists()  # nothing was launched


def test_without_yes_and_without_a_terminal_the_command_says_to_add_it(tmp_path):
    done = falcon_h1_cli("pretrain", "--factory", "tiny", "trainer.max_steps=3", tmp_path=tmp_path)
    assert done.returncode != 0
    assert "add -y" in done.stderr


def test_slurm_nodes_set_the_trainers_num_nodes(tmp_path):
    done = falcon_h1_cli("pretrain", "--factory", "falcon_h1_7b", "--dryrun", "run.executor=slurm",
                         "run.executor.account=proj", "run.executor.nodes=2", "run.executor.gpus_per_node=4",
                         f"run.executor.tunnel.job_dir={tmp_path / 'jobs'}", tmp_path=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    config = " ".join(done.stdout.replace("│", " ").split())
    assert "devices=4," in config and "num_nodes=2," in config
    assert "#SBATCH --nodes=2" in config and "#SBATCH --ntasks-per-node=4" in config
