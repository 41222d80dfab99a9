"""nemo-run's RunContext with three differences for the training entrypoints:

- `--yaml FILE` loads a whole config written by `--to-yaml` (nemo-run's own `--yaml` reads
  only flat override files), then applies the command line's overrides on top;
- `--dryrun` with an executor shows the launch request (the torchrun command, the sbatch script),
  not only the resolved config;
- a run on the local executor that fails is reported as a failure (nemo-run exits 0 whatever
  the task did): the task writes a file when it finishes (a training task LOG_DIR/result.json,
  `bench` its `output` JSON), so its absence after the run means the task failed;
- the executor and the trainer agree on the processes before anything launches: the process count
  named on the command line (`run.executor.ntasks_per_node` / `run.executor.nodes`, or
  `trainer.devices` / `trainer.num_nodes`) sets the other side; named on both sides and different,
  the command fails at once naming both;
- the resolved config is printed with `--dryrun` or `--verbose`, not before every run;
- a Slurm job is named after the recipe, and the command follows it to its end (its state, its
  log as it grows) and exits non-zero, naming the log, unless it ends COMPLETED (`--detach`:
  submit and return);
- without `-y` and without a terminal to answer "Continue?", the command says to add `-y`;
- a bad command line or config value fails before anything is built or launched, in one line
  (`error: trainer.max_stepz: build_trainer has no argument 'max_stepz'; did you mean 'max_steps'?`,
  `error: data.seq_length=0: must be a positive integer ...`), with exit code 2.
"""

import copy
import dataclasses
import difflib
import inspect
import logging
import os
import sys
import time
import types
from inspect import signature
from pathlib import Path

import catalogue
import fiddle as fdl

import nemo_run as run
from nemo_run.cli.api import RunContext, RunContextError
from nemo_run.cli.cli_parser import CLIException, ParseError, parse_cli_args, type_parser
from nemo_run.cli.config import ConfigSerializer
from nemo_run.config import get_type_namespace

from falcon_h1.arguments import check_batch_sizes, check_learning_rates, check_parallel_sizes, check_trainer_arguments
from falcon_h1.slurm import SubmitError, name_job, submit
from falcon_h1.training.checkpoint_io import CheckpointError

# nemo-run 0.11 parses typing.Union / Optional but not the `int | None` unions of our signatures.
type_parser.register_parser(types.UnionType)(lambda value, annotation: type_parser.parse_union(value, annotation))


class TaskFailed(RunContextError):
    pass


class BadConfig(RunContextError):
    """A bad command line or config value, found before anything runs: one line, exit code 2."""


class FalconRunContext(RunContext):
    def cli_execute(self, fn, args, entrypoint_type="task"):
        try:
            return super().cli_execute(fn, args, entrypoint_type)
        except BadConfig as error:  # (nemo-run would print it as an "Error: " line and exit 1)
            print(f"error: {error}", file=sys.stderr)
            raise SystemExit(2) from None
        except CheckpointError as error:  # a task run in this process: a damaged checkpoint, a failed save
            print(f"error: {error}", file=sys.stderr)  # (nemo-run would say "Unexpected error")
            raise SystemExit(1) from None

    def parse_fn(self, fn, args, **default_kwargs):
        recipe = self._parse_quietly(fn, [], **default_kwargs)
        if not args:
            return recipe
        # A copy: nemo-run's YAML loader hands out the same objects again on the next load.
        recipe = copy.deepcopy(recipe)
        # `data=NAME` on the command line keeps the recipe's sizes that it does not set.
        return inherit_data_sizes(self._parse_quietly(fn, args, recipe=recipe, **default_kwargs), recipe)

    def _parse_quietly(self, fn, args, recipe=None, **default_kwargs):
        """_parse with nemo-run's errors as one line: its own log line of a bad override holds the
        whole config (~130 lines for a recipe); ours names the key and the argument it meant."""
        parser_log = logging.getLogger("nemo_run.cli.cli_parser")
        parser_log.disabled = True
        try:
            return self._parse(fn, args, **default_kwargs)
        except CLIException as error:
            cause = error.__cause__
            if isinstance(cause, ValueError) and not isinstance(cause, CLIException):
                raise BadConfig(factory_error(str(cause), fn)) from None  # a recipe's own check, a factory
            raise BadConfig(override_error(error, recipe, args, self.factory, fn)) from None
        except ValueError as error:  # --factory NAME that is not one
            raise BadConfig(factory_error(str(error), fn)) from None
        finally:
            parser_log.disabled = False

    def _parse(self, fn, args, **default_kwargs):
        if not self.yaml or Path(self.yaml).suffix.lower() not in (".yaml", ".yml"):
            return super().parse_fn(fn, args, **default_kwargs)
        task = ConfigSerializer().load_yaml(self.yaml)
        if getattr(task, "__fn_or_cls__", None) is not fn:
            target = getattr(getattr(task, "__fn_or_cls__", None), "__name__", type(task).__name__)
            raise RunContextError(f"{self.yaml} configures {target}, not {fn.__name__}")
        return parse_cli_args(task, args) if args else task

    def parse_args(self, args, lazy: bool = False):
        # nemo-run reads `executor=NAME` only up to the next "=", which cuts a factory call such as
        # `executor=slurm(account=proj)`: the executor is parsed here, the rest by nemo-run.
        call = next((arg.split("=", 1)[1] for arg in reversed(args) if arg.startswith("executor=")), None)
        fields = [arg[len("executor."):] for arg in args if arg.startswith("executor.")]
        # The executor's settings as typed (fields, and the factory call's arguments): which the user named.
        self.run_args = [*(f"executor.{name}=" for name in call_arguments(call)), *args]
        if call is None:
            return super().parse_args(args, lazy)
        remaining = super().parse_args([arg for arg in args if not arg.startswith("executor")], lazy)
        self.executor = fdl.build(self.parse_executor(call, *fields))
        return remaining

    def _execute_task(self, fn, task_args):
        if self.repl or any([self.to_yaml, self.to_toml, self.to_json]):
            return super()._execute_task(fn, task_args)
        task = self.parse_fn(fn, task_args)
        if self.name == fn.__name__ and self.factory:  # no --name: the recipe's name
            self.name = self.factory.split("(")[0].strip()
        if isinstance(self.executor, run.SlurmExecutor):
            check_slurm_executor(self.executor)
            name_job(self.executor, self.name)  # the sbatch of --dryrun shows it too
        if self.executor is not None and getattr(task, "trainer", None) is not None:
            match_processes(task.trainer, self.executor, self.run_args, task_args, self.factory)
        try:
            check_task_arguments(task)  # with the process count settled
        except ValueError as error:
            raise BadConfig(str(error)) from None
        # nemo-run keeps its --verbose flag only as the level of the torchx logger.
        if self.dryrun or logging.getLogger("torchx").isEnabledFor(logging.INFO):
            run.dryrun_fn(task, executor=self.executor)
        if self.dryrun:
            if self.executor is not None:  # the launch request: the torchrun command, the sbatch script
                run.run(task, executor=self.executor, dryrun=True, name=self.name)
            return
        if not self.skip_confirmation and "WORLD_SIZE" not in os.environ and not sys.stdin.isatty():
            raise RunContextError("there is no terminal to answer 'Continue?': add -y to run without asking")
        if not self._should_continue(self.skip_confirmation):
            return
        if isinstance(self.executor, run.SlurmExecutor):
            return self._submit_to_slurm(task)
        watch = not self.detach and isinstance(self.executor, run.LocalExecutor)
        started = time.time()
        run.run(task, name=self.name, executor=self.executor, plugins=self.plugins,
                direct=self.direct or self.executor is None, detach=self.detach)
        if watch:
            result = completion_file(task)
            if result is not None and (not result.exists() or result.stat().st_mtime < started):
                raise TaskFailed(f"the {self.name} task failed: it did not write {result}; its log is above")

    def _submit_to_slurm(self, task) -> None:
        try:
            ended = submit(task, self.executor, self.name, detach=self.detach)
        except SubmitError as error:
            raise RunContextError(str(error)) from None
        if ended is None:  # --detach
            return
        if ended.state != "COMPLETED":
            raise TaskFailed(f"Slurm job {ended.job_id} ({self.name}) ended {ended.state} "
                             f"(exit code {ended.exit_code}); its log: {ended.log}")
        print(f"[slurm] job {ended.job_id} completed; its log: {ended.log}", flush=True)


def check_slurm_executor(executor) -> None:
    """The job must find the project where it runs: a venv to activate or an image that has it."""
    if not executor.container_image and not executor.setup_lines:
        raise RunContextError(
            "the Slurm job has no environment with falcon-h1 installed: name the cluster's virtual environment, "
            "run.executor=slurm(venv=/path/to/.venv), or an image that has the project, "
            "run.executor.container_image=IMAGE (docs/recipes.md, 'Running on Slurm')")


# What a data module takes from its recipe: a data factory on the command line (`data=mock`) does
# not know the recipe it goes into, so the sizes it leaves unset are the recipe's.
DATA_SIZES = ("seq_length", "micro_batch_size", "global_batch_size")


def inherit_data_sizes(task, recipe):
    """Give `task`'s data (set on the command line: `data=mock`, `data=pretraining(...)`) the
    sequence length and batch sizes of `recipe`'s data (the recipe before the command line's
    overrides) where it sets none itself; sizes it sets (`data.seq_length=64`) stay."""
    data, recipe_data = getattr(task, "data", None), getattr(recipe, "data", None)
    if not isinstance(data, fdl.Buildable) or not isinstance(recipe_data, fdl.Buildable):
        return task
    accepted = signature(data.__fn_or_cls__).parameters
    for name in DATA_SIZES:
        if name in accepted and name not in data.__arguments__ and name in recipe_data.__arguments__:
            setattr(data, name, recipe_data.__arguments__[name])
    return task


def _names_processes(args: list[str], prefix: str, fields) -> bool:
    """Whether one of `args` (KEY=VALUE overrides) sets one of `prefix` + `fields`."""
    keys = {arg.split("=", 1)[0].strip() for arg in args}
    return any(prefix + field in keys for field in fields)


def call_arguments(call: str | None) -> list[str]:
    """The keyword arguments a factory call names: "tiny(num_nodes=2,dir=x)" -> ["num_nodes", "dir"]."""
    if not call or "(" not in call:
        return []
    inside = call[call.index("(") + 1:call.rindex(")") if ")" in call else len(call)]
    return [part.split("=", 1)[0].strip() for part in inside.split(",") if "=" in part]


def match_processes(trainer, executor, run_args: list[str], task_args: list[str], factory: str | None) -> None:
    """Make the trainer's devices x num_nodes equal the executor's tasks per node x nodes. The side
    the command line named sets the other (the trainer, i.e. the recipe, when neither was named);
    both named and different is an error, raised before anything launches."""
    if getattr(executor, "gpus_per_node", None) and _names_processes(run_args, "executor.", ("gpus_per_node",)) \
            and not _names_processes(run_args, "executor.", ("ntasks_per_node",)):
        executor.ntasks_per_node = executor.gpus_per_node  # Slurm: one task per GPU
    executor_named = _names_processes(run_args, "executor.", ("ntasks_per_node", "nodes", "gpus_per_node", "devices"))
    trainer_named = _names_processes(task_args, "trainer.", ("devices", "num_nodes")) or \
        bool({"num_gpus_per_node", "num_nodes"} & set(call_arguments(factory)))
    for trainer_field, executor_field in (("devices", "ntasks_per_node"), ("num_nodes", "nodes")):
        ours, theirs = getattr(trainer, trainer_field), getattr(executor, executor_field)
        if trainer_named and executor_named and ours != theirs:
            raise RunContextError(
                f"trainer.{trainer_field}={ours} but run.executor.{executor_field}={theirs}: the executor would "
                f"start {theirs} and the trainer expects {ours}; set one of them (the other follows)")
        if executor_named or ours is None:
            setattr(trainer, trainer_field, theirs)
        else:
            setattr(executor, executor_field, ours)
    if getattr(executor, "gpus_per_node", None):  # Slurm: one GPU per task
        executor.gpus_per_node = executor.ntasks_per_node
    elif hasattr(executor, "gpus_per_node"):  # gpus_per_node=0: CPU tasks, no GPU request
        executor.gpus_per_node = None


def override_error(error: CLIException, recipe, args: list[str], factory: str | None = None, fn=None) -> str:
    """nemo-run's error of a bad override as "KEY: what is wrong; did you mean ...?", the
    suggestion from the argument names of what KEY's parent configures in `recipe`; without a
    recipe (its own call failed: --factory "NAME(ARG=...)"), from the arguments of recipe `factory`
    of entrypoint `fn`."""
    if isinstance(error, ParseError):  # a value of the wrong type; nemo-run wraps it twice
        while isinstance(error.__cause__, ParseError):
            error = error.__cause__
        override = next((arg for arg in args if arg.split("=", 1)[-1] == error.arg),
                        f"--factory {factory}" if factory and recipe is None else error.arg)
        return f"{override}: {error.args[0].split(' (Argument: ')[0]}"
    key = error.context.get("key") or error.arg.split("=", 1)[0].rstrip("+-*/|&")
    message = str(error.args[0]).split(" (Argument: ")[0]
    if "No parameter named" not in message and "Invalid attribute" not in message:
        return f"{error.arg}: {message}"  # a value nemo-run cannot parse, an operation on an unset field
    recipes, recipe_name = registered_recipes(fn), (factory or "").split("(")[0].strip()
    if recipe is None and recipe_name in recipes:
        return f"--factory {factory}: {_no_argument(f'recipe {recipe_name}', key, _parameters(recipes[recipe_name]))}"
    node, walked = recipe, []
    for name in key.split("."):
        if not isinstance(node, fdl.Buildable):
            break
        accepted = _parameters(node.__fn_or_cls__)
        if name not in accepted:
            where = getattr(node.__fn_or_cls__, "__name__", str(node.__fn_or_cls__))
            return f"{'.'.join([*walked, name])}: {_no_argument(where, name, accepted)}"
        node, walked = getattr(node, name), [*walked, name]
    return f"{key}: no such field"


def _no_argument(where: str, name: str, accepted) -> str:
    close = difflib.get_close_matches(name, list(accepted), n=1)
    hint = f"did you mean '{close[0]}'?" if close else f"it takes {', '.join(accepted)}"
    return f"{where} has no argument '{name}'; {hint}"


def _parameters(fn_or_cls) -> dict:
    """The arguments a fiddle Buildable of `fn_or_cls` takes (a class's __init__, a dataclass's fields)."""
    try:
        parameters = inspect.signature(fn_or_cls).parameters
    except (TypeError, ValueError):
        return {}
    return {name: p for name, p in parameters.items() if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)}


def factory_error(message: str, fn) -> str:
    """"No matching factory found for: NAME" with the nearest registered recipe of `fn`."""
    if not message.startswith("No matching factory found for: "):
        return message
    name = message.rsplit(": ", 1)[1]
    recipes = list(registered_recipes(fn))
    close = difflib.get_close_matches(name.split("(")[0], recipes, n=1)
    hint = f"did you mean '{close[0]}'?" if close else f"the recipes are {', '.join(sorted(recipes))}"
    return f"--factory {name}: no such recipe of {fn.__name__}; {hint}"


def registered_recipes(fn) -> dict:
    """The recipes (`--factory NAME`) of entrypoint `fn` by name."""
    return {key[-1]: recipe for key, recipe in catalogue._get_all((get_type_namespace(fn),)).items()}


def check_task_arguments(task) -> None:
    """The checks the trainer, the strategy, the data module and the optimizer run when they are
    built, run on the task's config before anything is built or launched: a bad value fails here
    in one line, not in the log of a job that has started."""
    check_argument_names(task)
    trainer, data, model = (getattr(task, name, None) for name in ("trainer", "data", "model"))
    if _configures(trainer, "max_steps", "val_check_interval", "limit_val_batches", "log_every_n_steps"):
        check_trainer_arguments(trainer.max_steps, trainer.val_check_interval, trainer.limit_val_batches,
                                trainer.log_every_n_steps, getattr(trainer, "checkpoint_every_n_steps", None),
                                getattr(trainer, "keep_last_k", None), getattr(trainer, "devices", None),
                                getattr(trainer, "num_nodes", 1), getattr(trainer, "hang_timeout", None))
    strategy = getattr(trainer, "strategy", None)
    sizes = ("tensor_model_parallel_size", "pipeline_model_parallel_size", "virtual_pipeline_model_parallel_size",
             "context_parallel_size")
    data_parallel = None
    if _configures(strategy, *sizes):
        devices, nodes = getattr(trainer, "devices", None), getattr(trainer, "num_nodes", 1)
        world = devices * nodes if isinstance(devices, int) and isinstance(nodes, int) else None
        check_parallel_sizes(*(getattr(strategy, size) for size in sizes), world_size=world)
        replica = strategy.tensor_model_parallel_size * strategy.pipeline_model_parallel_size \
            * strategy.context_parallel_size
        data_parallel = world // replica if world else None
    if _configures(data, "seq_length", "micro_batch_size", "global_batch_size"):
        check_batch_sizes(data.seq_length, data.micro_batch_size, data.global_batch_size, data_parallel)
        if _configures(strategy, "context_parallel_size") and data.seq_length % strategy.context_parallel_size:
            raise ValueError(f"data.seq_length={data.seq_length} cannot be split over trainer.strategy."
                             f"context_parallel_size={strategy.context_parallel_size}: make it a multiple")
    optimizer = getattr(model, "optimizer", None)
    if _configures(optimizer, "lr", "min_lr"):
        check_learning_rates(optimizer.lr, optimizer.min_lr)
    schedule = getattr(model, "lr_schedule", None)
    if isinstance(schedule, fdl.Buildable) and dataclasses.is_dataclass(schedule.__fn_or_cls__):
        schedule.__fn_or_cls__(**schedule.__arguments__)  # a dataclass of numbers that checks them when made


def check_argument_names(node, path: str = "") -> None:
    """Every argument set in the config tree under `node` is one its class names somewhere along
    its bases: nemo-run lets a class that takes **kwargs take any name, and MegatronStrategy's pass
    to Lightning's DDPStrategy, so a typo there (trainer.strategy.tensor_paralel=2) would be ignored."""
    if not isinstance(node, fdl.Buildable):
        return
    target = node.__fn_or_cls__
    if inspect.isclass(target):
        known = {name for cls in target.__mro__ if "__init__" in vars(cls) for name in _parameters(cls.__init__)}
        for name in node.__arguments__:
            if name not in known:
                raise ValueError(f"{path}{name}: {_no_argument(target.__name__, name, sorted(known))}")
    for name, value in node.__arguments__.items():
        check_argument_names(value, f"{path}{name}.")


def _configures(node, *fields) -> bool:
    """Whether `node` is a fiddle config of something that takes all of `fields`."""
    return isinstance(node, fdl.Buildable) and all(field in _parameters(node.__fn_or_cls__) for field in fields)


def completion_file(task) -> Path | None:
    """The file a task writes when it succeeds, if it has one."""
    if getattr(task, "trainer", None) is not None:
        return Path(task.trainer.log_dir) / "result.json"
    output = getattr(task, "output", None)
    return Path(output) if isinstance(output, str) else None
