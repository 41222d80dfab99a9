"""Bad input fails before any work, in one line on stderr that names the value, with a non-zero
exit and no traceback: the main job's flags (python -m falcon_h1.train) and the falcon-h1
command's recipe fields and overrides.

Most cases call the entry points' main() in this process (what the console scripts run); two run
as the user runs them, in a process of their own."""

import io
import os
import subprocess
import sys

import pytest

from tests.conftest import REPO, falcon_h1_cli


def assert_one_error_line(code: int, out: str, err: str, names: str) -> None:
    assert code != 0, out + err
    assert "Traceback" not in out + err, out + err
    assert len(err.splitlines()) == 1, err
    assert names in err, err


# flags -> what the error line says
MAIN_JOB = {
    "zero sequence length": (["--seq-length", "0"], "error: --seq-length 0: must be a positive integer (the tokens"),
    "negative sequence length": (["--seq-length", "-8"], "error: --seq-length -8: must be a positive integer"),
    "zero steps": (["--max-steps", "0"], "error: --max-steps 0: must be a positive integer"),
    "negative steps": (["--max-steps", "-1"], "error: --max-steps -1: must be a positive integer"),
    "warm-up as long as the run": (["--max-steps", "20", "--warmup-steps", "20"],
                                   "error: --warmup-steps 20: must be below --max-steps 20"),
    "zero micro-batch": (["--micro-batch-size", "0"], "error: --micro-batch-size 0: must be a positive integer"),
    "global batch not whole micro-batches": (["--global-batch-size", "10", "--micro-batch-size", "4"],
                                             "error: --global-batch-size 10: must be a multiple of "
                                             "--micro-batch-size 4"),
    "NaN learning rate": (["--lr", "nan"], "error: --lr nan: must be a positive finite number"),
    "negative learning rate": (["--lr", "-0.001"], "error: --lr -0.001: must be a positive finite number"),
    "zero validation interval": (["--val-every", "0"], "error: --val-every 0: must be a positive integer"),
    "negative validation batches": (["--val-batches", "-1"], "error: --val-batches -1: must be an integer >= 0"),
    "zero progress interval": (["--log-every", "0"], "error: --log-every 0: must be a positive integer"),
    "zero checkpoint interval": (["--checkpoint-every", "0"], "error: --checkpoint-every 0: must be a positive"),
    "zero checkpoints kept": (["--keep-last", "0"], "error: --keep-last 0: must be a positive integer"),
    "negative hang timeout": (["--hang-timeout", "-5"], "error: --hang-timeout -5.0: must be a number of seconds >= 0"),
    "zero tensor parallel": (["--tp", "0"], "error: --tp 0: must be a positive integer"),
    "virtual pipeline without a pipeline": (["--vpp", "2"], "error: --vpp 2: interleaves pipeline stages and "
                                                            "needs --pp > 1"),
    "zero layers": (["--num-layers", "0"], "error: --num-layers 0: must be a positive integer"),
    "layout larger than the world": (["--cp", "2"], "error: --tp 1 x --pp 1 x --cp 2 = 2 ranks per model replica do "
                                                    "not divide the 1 processes"),
    "not a number": (["--seq-length", "abc"], "error: argument --seq-length: invalid int value: 'abc'"),
}

# Under torchrun (WORLD_SIZE=4): the layout and the batch against the processes.
MAIN_JOB_OF_4 = {
    "layout does not divide the world": (["--tp", "3"], "error: --tp 3 x --pp 1 x --cp 1 = 3 ranks per model "
                                                        "replica do not divide the 4 processes"),
    "global batch not whole micro-batches on every rank": (
        ["--tp", "2", "--global-batch-size", "12", "--micro-batch-size", "4"],
        "error: --global-batch-size 12: must be a multiple of --micro-batch-size 4 x 2 data-parallel ranks = 8"),
    "sequence that context parallelism cannot split": (["--cp", "4", "--seq-length", "126"],
                                                       "error: --seq-length 126: must be a multiple of --cp 4"),
}


def main_job(flags: list[str]) -> int:
    from falcon_h1.train import main

    try:
        return main(flags)
    except SystemExit as exit:  # argparse's own errors (a value that is not a number)
        return exit.code


@pytest.mark.parametrize("flags, names", MAIN_JOB.values(), ids=MAIN_JOB.keys())
def test_main_job_flag(flags, names, capfd, tmp_path):
    code = main_job([*flags, "--log-dir", str(tmp_path / "run")])
    out, err = capfd.readouterr()
    assert code == 2
    assert_one_error_line(code, out, err, names)
    assert not (tmp_path / "run").exists()  # nothing was started


@pytest.mark.parametrize("flags, names", MAIN_JOB_OF_4.values(), ids=MAIN_JOB_OF_4.keys())
def test_main_job_flag_under_torchrun(flags, names, capfd, monkeypatch, tmp_path):
    monkeypatch.setenv("WORLD_SIZE", "4")
    code = main_job([*flags, "--log-dir", str(tmp_path / "run")])
    out, err = capfd.readouterr()
    assert code == 2
    assert_one_error_line(code, out, err, names)


# `falcon-h1 pretrain` arguments -> what the error line says
COMMAND = {
    "misspelled field": (["--factory", "tiny", "trainer.max_stepz=5"],
                         "error: trainer.max_stepz: build_trainer has no argument 'max_stepz'; did you mean "
                         "'max_steps'?"),
    "misspelled top-level key": (["--factory", "tiny", "traner.max_steps=5"],
                                 "error: traner: pretrain has no argument 'traner'; did you mean 'trainer'?"),
    "misspelled field that **kwargs would take": (
        ["--factory", "tiny", "trainer.strategy.tensor_paralel=2"],
        "error: trainer.strategy.tensor_paralel: MegatronStrategy has no argument 'tensor_paralel'; did you mean "
        "'tensor_model_parallel_size'?"),
    "misspelled recipe argument": (["--factory", "tiny(max_stepz=3)"],
                                   "error: --factory tiny(max_stepz=3): recipe tiny has no argument 'max_stepz'; "
                                   "did you mean 'max_steps'?"),
    "misspelled factory": (["--factory", "tinyy"], "error: --factory tinyy: no such recipe of pretrain; did you "
                                                   "mean 'tiny'?"),
    "not a number": (["--factory", "tiny", "trainer.max_steps=abc"], "error: trainer.max_steps=abc: Failed to parse "
                                                                     "'abc'"),
    "zero steps": (["--factory", "tiny", "trainer.max_steps=0"], "error: trainer.max_steps=0: must be a positive"),
    "zero sequence length": (["--factory", "tiny", "data.seq_length=0"],
                             "error: data.seq_length=0: must be a positive integer (the tokens per training sequence"),
    "global batch not whole micro-batches on every rank": (
        ["--factory", "tiny", "trainer.devices=2", "data.global_batch_size=24"],
        "error: data.global_batch_size=24: must be a multiple of data.micro_batch_size=8 x 2 data-parallel ranks"),
    "NaN learning rate": (["--factory", "tiny", "model.optimizer.lr=nan"],
                          "error: model.optimizer.lr=nan: must be a positive finite number"),
    "end LR above the peak": (["--factory", "tiny", "model.optimizer.min_lr=1.0"],
                              "error: model.optimizer.min_lr=1.0: must be between 0 and model.optimizer.lr=0.003"),
    "negative warm-up": (["--factory", "tiny", "model.lr_schedule.warmup_steps=-1"],
                         "error: model.lr_schedule.warmup_steps=-1: must be an integer >= 0"),
    "zero validation interval": (["--factory", "tiny", "trainer.val_check_interval=0"],
                                 "error: trainer.val_check_interval=0: must be a positive integer"),
    "zero checkpoints kept": (["--factory", "tiny", "trainer.keep_last_k=0"],
                              "error: trainer.keep_last_k=0: must be a positive integer"),
    "negative hang timeout": (["--factory", "tiny", "trainer.hang_timeout=-1"],
                              "error: trainer.hang_timeout=-1.0: must be a number of seconds >= 0"),
    "layout larger than the world": (["--factory", "tiny", "trainer.strategy.tensor_model_parallel_size=2"],
                                     "= 2 ranks per model replica do not divide the 1 processes"),
    "virtual pipeline without a pipeline": (
        ["--factory", "tiny", "trainer.strategy.virtual_pipeline_model_parallel_size=2"],
        "error: trainer.strategy.virtual_pipeline_model_parallel_size=2: interleaves pipeline stages"),
}


@pytest.fixture
def command(monkeypatch, tmp_path):
    """falcon_h1.cli.main in this process, leaving the environment and nemo-run's home as they were."""
    from falcon_h1.cli import main

    for name in ("PATH", "LOGLEVEL", "NEMORUN_SHOW_WARNINGS"):
        monkeypatch.setenv(name, os.environ.get(name, "WARNING" if name == "LOGLEVEL" else "0"))
    monkeypatch.setattr("nemo_run.config._NEMORUN_HOME", str(tmp_path / "nemorun"))
    return main


@pytest.mark.parametrize("args, names", COMMAND.values(), ids=COMMAND.keys())
def test_command_argument(args, names, command, capfd, tmp_path):
    # --dryrun: a check that let the value through would print the config and succeed.
    code = command(["pretrain", *args, f"trainer.log_dir={tmp_path / 'run'}", "--dryrun"])
    out, err = capfd.readouterr()
    assert code == 2
    assert_one_error_line(code, out, err, names)
    assert not (tmp_path / "run").exists()


def test_command_without_a_terminal_says_to_pass_yes(command, capfd, monkeypatch, tmp_path):
    monkeypatch.setattr("sys.stdin", io.StringIO())  # no terminal
    code = command(["pretrain", "--factory", "tiny", f"trainer.log_dir={tmp_path / 'run'}"])
    out, err = capfd.readouterr()
    assert_one_error_line(code, out, err, "add -y to run without asking")


# As the user runs them: the console script's exit code and streams.

def test_main_job_zero_sequence_length_in_its_own_process(tmp_path):
    done = subprocess.run([sys.executable, "-m", "falcon_h1.train", "--seq-length", "0", "--log-dir", str(tmp_path)],
                          capture_output=True, text=True, cwd=REPO, timeout=120)
    assert done.returncode == 2
    assert_one_error_line(done.returncode, done.stdout, done.stderr, "error: --seq-length 0: must be a positive")


def test_command_misspelled_field_in_its_own_process(tmp_path):
    done = falcon_h1_cli("pretrain", "--factory", "tiny", "trainer.max_stepz=5", "-y", tmp_path=tmp_path, timeout=300)
    assert done.returncode == 2
    assert_one_error_line(done.returncode, done.stdout, done.stderr,
                          "error: trainer.max_stepz: build_trainer has no argument 'max_stepz'; did you mean "
                          "'max_steps'?")
