"""`falcon-h1 preprocess`: tokenize inputs into shards with N tasks of a nemo-run executor.

    falcon-h1 preprocess --input web/*.parquet --output-prefix data/web --tokenizer tok/ --shard-size 2GB --tasks 8
    falcon-h1 preprocess --input docs/ --output-prefix data/docs --train-bpe 8192 --shard-size 50M --tasks 2
    falcon-h1 preprocess --input /shared/web/ --output-prefix /shared/data/web --tokenizer /shared/tok \
        --shard-size 2GB --tasks 64 --executor slurm --nodes 4 --account proj --partition cpu --time 08:00:00

The steps of falcon_h1/data/preprocess.py's task runner, run from here: with --train-bpe the
tokenizer is trained once, in this process (a tokenizer trained by an earlier run of the same
prefix is kept: finished inputs were made with it); then N tasks run side by side as one nemo-run
experiment on the local executor, task K tokenizing the inputs i with i % N == K into their shards
and completion records, its progress lines in its own log; when they have all ended, this process
writes PREFIX.manifest.json, last. A re-run of the same command skips the inputs whose completion
record exists, so a run that was interrupted or had a task fail resumes where it stopped.

With --executor slurm (on a login node: the file system is shared with the compute nodes) the N
tasks are one Slurm job without GPUs, N srun tasks over --nodes nodes, each taking its task index
from SLURM_PROCID; the job activates the virtual environment this command runs from. This process
follows the job (its state and log, each line labelled with its srun task), then writes the
manifest as above.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import shlex
import signal
import sys
import threading
import time
from pathlib import Path

from falcon_h1.data.preprocess import prepare_tokenizer, trained_tokenizer_dir, write_dataset_manifest
from falcon_h1.data.readers import input_files, input_units
from falcon_h1.data.shards import parse_shard_size, read_record

EXECUTORS = ("local", "slurm")
# The task indices of a Slurm job's srun tasks, by SLURM_PROCID (a re-run starts only those with work left).
SLURM_TASKS_VAR = "FALCON_H1_PREPROCESS_TASKS"


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, not argparse's usage block
        print(f"error: {message} (falcon-h1 preprocess --help)", file=sys.stderr)
        raise SystemExit(2)


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="falcon-h1 preprocess", description=__doc__,
                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", nargs="+", required=True,
                        help="data files (.parquet, .arrow, .jsonl[.gz|.zst], text) or directories")
    parser.add_argument("--output-prefix", required=True,
                        help="writes PREFIX_*.bin/.idx, PREFIX_*.done.json and PREFIX.manifest.json")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--tokenizer", help="Hugging Face tokenizer directory")
    source.add_argument("--train-bpe", type=int, metavar="VOCAB",
                        help="train a byte-level BPE of this size once, before the tasks")
    parser.add_argument("--shard-size", required=True, metavar="SIZE",
                        help="shards of this many tokens (50M, 1000000) or bytes (512MB, 2GB, 1GiB)")
    parser.add_argument("--tasks", type=int, default=1, metavar="N", help="tasks sharing the inputs (default: 1)")
    parser.add_argument("--workers", type=int, default=1, help="tokenizing processes per task (default: 1)")
    parser.add_argument("--executor", choices=EXECUTORS, default="local",
                        help="where the tasks run (default: local, side by side on this machine; slurm: "
                             "one Slurm job of N CPU tasks, submitted from this machine, a login node)")
    slurm = parser.add_argument_group("with --executor slurm")
    slurm.add_argument("--account", default="", help="Slurm account (default: the cluster's default)")
    slurm.add_argument("--partition", help="Slurm partition (default: the cluster's default)")
    slurm.add_argument("--time", default="04:00:00", help="the job's time limit (default: 04:00:00)")
    slurm.add_argument("--nodes", type=int, default=1, help="nodes the N tasks spread over (default: 1)")
    slurm.add_argument("--venv", help="the virtual environment the job activates (default: this command's)")
    parser.add_argument("--text-key", "--json-key", dest="text_key", default="text",
                        help="the text column (Parquet, Arrow) or field (.jsonl) (default: text)")
    parser.add_argument("--glob", default="*", help="file pattern inside input directories (default: all)")
    parser.add_argument("--log-every", type=float, default=5.0, metavar="SECONDS",
                        help="seconds between a task's progress lines in its log, 0 for none (default: 5)")
    return parser


def main(argv: list[str] | None = None, slurm_executor=None) -> int:
    """`slurm_executor`: the factory of the executor --executor slurm submits to (the recipes'
    `slurm` executor, which the falcon-h1 command passes in: only the entry points import recipes)."""
    args = _parser().parse_args(argv)
    try:
        if args.executor == "slurm" and slurm_executor is None:
            raise ValueError("--executor slurm: run it as `falcon-h1 preprocess`, which gives it the Slurm executor")
        return _run(args, slurm_executor)
    except (OSError, ValueError) as error:  # bad inputs, flags or records: what preprocess says, in one line
        print(f"error: {error}", file=sys.stderr)
        return 2


def _check(args) -> None:
    if args.tasks < 1:
        raise ValueError(f"--tasks {args.tasks}: give at least 1 (the number of tasks sharing the inputs)")
    if args.workers < 1:
        raise ValueError(f"--workers {args.workers}: give at least 1 (tokenizing processes per task)")
    if args.nodes < 1:
        raise ValueError(f"--nodes {args.nodes}: give at least 1 (nodes of the Slurm job)")
    if args.train_bpe is not None and args.train_bpe < 1:
        raise ValueError(f"--train-bpe {args.train_bpe}: give the vocabulary size, a positive number")
    parse_shard_size(args.shard_size)
    if args.tokenizer is not None and not Path(args.tokenizer).is_dir():
        raise FileNotFoundError(f"--tokenizer {args.tokenizer}: no such directory (a Hugging Face tokenizer "
                                f"directory, or --train-bpe VOCAB to train one)")


def _run(args, slurm_executor) -> int:
    _check(args)
    # Absolute paths: the tasks need not run in this directory, and the records name absolute paths.
    inputs = [str(Path(p).resolve()) for p in args.input]
    prefix = str(Path(args.output_prefix).resolve())
    units = input_units(input_files(inputs, args.glob))  # fails here, before any task, on a missing input
    Path(prefix).parent.mkdir(parents=True, exist_ok=True)
    tokenizer = args.tokenizer and str(Path(args.tokenizer).resolve())
    if args.train_bpe is not None:
        tokenizer = str(trained_tokenizer_dir(prefix))
        if (Path(tokenizer) / "tokenizer_config.json").is_file():
            print(f"using the tokenizer trained earlier: {tokenizer} (delete it to train again)", flush=True)
        else:
            print(f"training a {args.train_bpe}-token BPE on {len(units)} inputs ...", flush=True)
            prepare_tokenizer(inputs, prefix, args.train_bpe, args.text_key, args.glob)
    # Checked here too so that a record of another tokenizer or shard size fails once, in one line.
    shard_size = parse_shard_size(args.shard_size)
    complete = [i for i, unit in enumerate(units) if read_record(prefix, i, unit.files, tokenizer, shard_size)]
    todo = sorted(set(range(len(units))) - set(complete))
    tasks = [k for k in range(args.tasks) if any(i % args.tasks == k for i in todo)]
    print(f"preprocess: {len(units)} inputs into {prefix}_*; {len(todo)} to do in {len(tasks)} of {args.tasks} "
          f"{args.executor} tasks, skipped {len(complete)} inputs already complete", flush=True)
    if tasks:
        if args.executor == "slurm":
            logs = _run_slurm_tasks(args, slurm_executor, inputs, prefix, tokenizer, tasks)
        else:
            logs = {k: (log, None) for k, log in _run_local_tasks(args, inputs, prefix, tokenizer, tasks).items()}
        failed = {k: logs[k] for k in tasks
                  if any(read_record(prefix, i, units[i].files) is None for i in todo if i % args.tasks == k)}
        if failed:
            for k, (log, label) in failed.items():
                print(f"task {k} failed: {_last_line(log, label)}; its log: {log}", file=sys.stderr)
            print(f"error: {len(failed)} of {len(tasks)} tasks failed (logs above); the inputs they finished are "
                  f"kept: run the same command again to resume", file=sys.stderr)
            return 1
    result = write_dataset_manifest(inputs, prefix, args.glob)
    print(f"wrote {result.manifest}: {result.documents} documents, {result.tokens} tokens in the shards "
          f"{prefix}_*.bin/.idx (tokenizer: {result.tokenizer_dir}); processed {len(todo)} inputs, "
          f"skipped {len(complete)} inputs already complete", flush=True)
    return 0


def _last_line(log: str, label: str | None = None) -> str:
    """A failed task's last log line: preprocess's one-line error, or the end of a traceback. In a
    Slurm job's log (all its tasks, srun --label) the lines that start with the task's `label`."""
    try:
        lines = [line.strip() for line in Path(log).read_text(errors="replace").splitlines() if line.strip()]
    except OSError:
        return "it left no log"
    if label is not None:  # srun --label: "K: line", K padded to the width of the last task's number
        labelled = [line.partition(": ") for line in lines]
        lines = [rest.strip() for task, _, rest in labelled if task.strip().isdigit() and int(task) == int(label)]
    return lines[-1] if lines else "its log is empty"


def _task_args(args, inputs: list[str], prefix: str, tokenizer: str, task: int | None) -> list[str]:
    """A task's flags; without a task index (Slurm) the task finds its own (_task_index_from_slurm)."""
    return ["--input", *inputs, "--output-prefix", prefix, "--tokenizer", tokenizer, "--shard-size", args.shard_size,
            *(["--task-index", str(task)] if task is not None else []), "--num-tasks", str(args.tasks),
            "--workers", str(args.workers), "--text-key", args.text_key, "--glob", args.glob,
            "--log-every", str(args.log_every)]


def _task_index_from_slurm(argv: list[str]) -> list[str]:
    """An srun task of `falcon-h1 preprocess --executor slurm` is given no --task-index: its index is
    the SLURM_PROCID-th of the job's tasks (FALCON_H1_PREPROCESS_TASKS)."""
    if "--task-index" in argv or "SLURM_PROCID" not in os.environ or SLURM_TASKS_VAR not in os.environ:
        return argv
    tasks = os.environ[SLURM_TASKS_VAR].split(",")
    return [*argv, "--task-index", tasks[int(os.environ["SLURM_PROCID"])]]


def _run_local_tasks(args, inputs, prefix, tokenizer, tasks: list[int]) -> dict[int, str]:
    """Run `tasks` side by side as one nemo-run experiment; the log file of each, by task."""
    import nemo_run as run

    # nemo-run's console output (a launch line per task, a status table, how to inspect the
    # experiment) says nothing the summary does not: kept, and shown only if launching fails.
    launcher_output = io.StringIO()
    with contextlib.redirect_stdout(launcher_output), contextlib.redirect_stderr(launcher_output):
        exp = run.Experiment("preprocess", executor=run.LocalExecutor(), log_level="WARN")
    exp_dir = Path(exp._exp_dir)
    print(f"{len(tasks)} task{'s' if len(tasks) != 1 else ''} running; their logs: "
          f"{exp_dir}/task-K/.../combined.log", flush=True)
    _stop_tasks_with_this_process()
    started = time.time()
    try:
        with contextlib.redirect_stdout(launcher_output), contextlib.redirect_stderr(launcher_output):
            with exp:
                for k in tasks:
                    # -m falcon_h1.preprocess_tasks: the task runner below, which is preprocess's own main.
                    exp.add(run.Script(path="falcon_h1.preprocess_tasks", m=True, entrypoint=sys.executable,
                                       args=_task_args(args, inputs, prefix, tokenizer, k)),
                            name=f"task-{k}", tail_logs=False)
                exp.run(sequential=False, detach=False)
    except Exception:
        sys.stderr.write(launcher_output.getvalue()[-4000:])
        raise
    logs = {k: next(iter(sorted(exp_dir.glob(f"task-{k}/**/combined.log"))), exp_dir / f"task-{k}") for k in tasks}
    print(f"tasks ended in {time.time() - started:.1f} s", flush=True)
    return {k: str(log) for k, log in logs.items()}


def _run_slurm_tasks(args, slurm_executor, inputs, prefix, tokenizer, tasks: list[int]
                     ) -> dict[int, tuple[str, str | None]]:
    """Run `tasks` as one Slurm job of len(tasks) srun tasks (no GPUs) and follow it to its end; the
    job's log and each task's label in it (srun --label: "PROCID: "), by task."""
    import fiddle as fdl
    import nemo_run as run

    from falcon_h1.slurm import SubmitError, submit

    per_node = -(-len(tasks) // args.nodes)
    nodes = -(-len(tasks) // per_node)  # no node without a task
    executor = fdl.build(slurm_executor(account=args.account, partition=args.partition, nodes=nodes, gpus_per_node=0,
                                        ntasks_per_node=per_node, time=args.time, venv=args.venv,
                                        env_vars={SLURM_TASKS_VAR: ",".join(map(str, tasks))}))
    if not executor.setup_lines:
        raise ValueError("the Slurm job has no virtual environment with falcon-h1 to activate: give --venv PATH "
                         "(the cluster's, on the shared file system)")
    # Exactly len(tasks) tasks, each line of the log labelled; a failed task does not end the others
    # (what they finish is kept for a re-run): the last --kill-on-bad-exit wins over nemo-run's and the recipes'.
    executor.srun_args = [arg for arg in executor.srun_args if not arg.startswith("--kill-on-bad-exit")]
    executor.srun_args += [f"--ntasks={len(tasks)}", "--label", "--kill-on-bad-exit=0"]
    # The sbatch script has the arguments as they are given: quoted here (--glob *, paths with spaces).
    task = run.Script(path="falcon_h1.preprocess_tasks", m=True, entrypoint="python",
                      args=[shlex.quote(arg) for arg in _task_args(args, inputs, prefix, tokenizer, None)])
    started = time.time()
    try:
        ended = submit(task, executor, "preprocess")
    except SubmitError as error:
        raise OSError(f"submitting the Slurm job failed: {error}") from None
    print(f"[slurm] job {ended.job_id} ended {ended.state} (exit code {ended.exit_code}) in "
          f"{time.time() - started:.1f} s; its log: {ended.log}", flush=True)
    return {k: (ended.log, str(procid)) for procid, k in enumerate(tasks)}


def _stop_tasks_with_this_process() -> None:
    """Ctrl-C or a kill of this command ends its tasks too: nemo-run's local tasks run in sessions of
    their own (a ^C does not reach them) and its wait ignores a ^C. This process exits at once on
    SIGINT/SIGTERM, and each task stops when it sees its parent gone (_exit_when_orphaned)."""
    def stop(signum, _frame):
        print(f"\ninterrupted ({signal.Signals(signum).name}): the tasks stop; the inputs they finished are kept: "
              f"run the same command again to resume", file=sys.__stderr__, flush=True)
        os._exit(130)

    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)


def _exit_when_orphaned(interval: float = 0.1) -> None:
    """A task of the local executor ends itself once `falcon-h1 preprocess` (its parent) is gone,
    killed with SIGKILL included: a re-run must not find tasks of the last run still writing."""
    parent = os.getppid()

    def watch():
        while os.getppid() == parent:
            time.sleep(interval)
        os.kill(os.getpid(), signal.SIGTERM)  # an input not finished leaves only temporary files

    threading.Thread(target=watch, daemon=True).start()


if __name__ == "__main__":  # one task: `python -m falcon_h1.preprocess_tasks ARGS` = preprocess's task runner
    from falcon_h1.data import preprocess

    _exit_when_orphaned()
    sys.exit(preprocess.main(_task_index_from_slurm(sys.argv[1:])))
