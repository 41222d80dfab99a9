"""nemo-run's RunContext with three differences for the training entrypoints:

- `--yaml FILE` loads a whole config written by `--to-yaml` (nemo-run's own `--yaml` reads
  only flat override files), then applies the command line's overrides on top;
- `--dryrun` with an executor shows the launch request (the torchrun command, the sbatch script),
  not only the resolved config;
- a run on the local executor that fails is reported as a failure (nemo-run exits 0 whatever
  the task did): the task writes a file when it finishes (a training task LOG_DIR/result.json,
  `bench` its `output` JSON), so its absence after the run means the task failed.
"""

import time
import types
from pathlib import Path

import nemo_run as run
from nemo_run.cli.api import RunContext, RunContextError
from nemo_run.cli.cli_parser import parse_cli_args, type_parser
from nemo_run.cli.config import ConfigSerializer

# nemo-run 0.11 parses typing.Union / Optional but not the `int | None` unions of our signatures.
type_parser.register_parser(types.UnionType)(lambda value, annotation: type_parser.parse_union(value, annotation))


class TaskFailed(RunContextError):
    pass


class FalconRunContext(RunContext):
    def parse_fn(self, fn, args, **default_kwargs):
        if not self.yaml or Path(self.yaml).suffix.lower() not in (".yaml", ".yml"):
            return super().parse_fn(fn, args, **default_kwargs)
        task = ConfigSerializer().load_yaml(self.yaml)
        if getattr(task, "__fn_or_cls__", None) is not fn:
            target = getattr(getattr(task, "__fn_or_cls__", None), "__name__", type(task).__name__)
            raise RunContextError(f"{self.yaml} configures {target}, not {fn.__name__}")
        return parse_cli_args(task, args) if args else task

    def _execute_task(self, fn, task_args):
        exporting = any([self.to_yaml, self.to_toml, self.to_json])
        if self.dryrun and self.executor is not None and not exporting:
            task = self.parse_fn(fn, task_args)
            run.run(task, executor=self.executor, dryrun=True, name=self.name)
            return
        watch = (not exporting and not self.dryrun and not self.repl and not self.detach
                 and isinstance(self.executor, run.LocalExecutor))
        started = time.time()
        super()._execute_task(fn, task_args)
        if watch:
            result = completion_file(self.parse_fn(fn, task_args))
            if result is not None and (not result.exists() or result.stat().st_mtime < started):
                raise TaskFailed(f"the {self.name} task failed: it did not write {result}; its log is above")


def completion_file(task) -> Path | None:
    """The file a task writes when it succeeds, if it has one."""
    if getattr(task, "trainer", None) is not None:
        return Path(task.trainer.log_dir) / "result.json"
    output = getattr(task, "output", None)
    return Path(output) if isinstance(output, str) else None
