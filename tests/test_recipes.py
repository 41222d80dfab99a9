"""Recipes and the falcon-h1 command line.

Every recipe builds and validates at its declared size and layout without allocating weights;
--dryrun shows the torchrun command / sbatch script; the tiny recipe trains end to end through
the CLI on CPU (asserted on its files, not on nemo-run's exit code) and its --to-yaml config runs
back unchanged; typos and failed tasks exit non-zero naming the problem.
"""

import json
import os
import subprocess
import sys

import fiddle as fdl
import pytest
import torch

import recipes
from falcon_h1.model.param_count import parameter_count
from falcon_h1.run_context import check_task_arguments
from falcon_h1.model.presets import NOMINAL_SIZES, preset_config
from recipes import attention_baseline, convergence, long_context, ratio_sweep, tiny
from tests.conftest import REPO, falcon_h1_cli

def built_config(recipe):
    """The FalconH1Config of a recipe at the recipe's parallel layout (validated by the config)."""
    import torch

    strategy = recipe.trainer.strategy
    pipeline = strategy.pipeline_model_parallel_size
    return fdl.build(fdl.copy_with(
        recipe.model.config, tensor_model_parallel_size=strategy.tensor_model_parallel_size,
        pipeline_model_parallel_size=pipeline, context_parallel_size=strategy.context_parallel_size,
        virtual_pipeline_model_parallel_size=strategy.virtual_pipeline_model_parallel_size,
        sequence_parallel=strategy.sequence_parallel, pipeline_dtype=torch.bfloat16 if pipeline > 1 else None))


def check_layout(recipe):
    """The recipe against the rules a job is held to before it starts: `falcon-h1`'s checks of a
    task (model replicas that fill the processes, whole micro-batches on every data-parallel rank,
    the trainer's numbers, LR and schedule) and the model config's at the layout (heads per TP and
    CP rank, layers per pipeline stage). Either raises, naming the field, where a rule is broken."""
    check_task_arguments(recipe)
    return built_config(recipe)


@pytest.mark.parametrize("field, value, message", [
    ("trainer.devices", 3, "8 ranks per model replica do not divide the 12 processes"),
    ("data.global_batch_size", 130, "data.global_batch_size=130: must be a multiple of data.micro_batch_size=1 x 4 "
                                    "data-parallel ranks"),
    ("trainer.strategy.virtual_pipeline_model_parallel_size", 5, "model.config.num_layers=72: must be divisible by"),
    ("trainer.strategy.context_parallel_size", 2, "context_parallel_size=2 does not divide the 5 query heads"),
])
def test_check_layout_fails_on_a_layout_that_breaks_a_rule(field, value, message):
    """check_layout holds the recipes to rules that can fail: the 34B's layout (TP 4, PP 2 x VPP 2,
    4 nodes of 8 GPUs) with one field changed."""
    from nemo_run.cli.cli_parser import parse_cli_args

    recipe = parse_cli_args(recipes.SIZES["falcon_h1_34b"].pretrain_recipe(), [f"{field}={value}"])
    with pytest.raises(ValueError, match=message):
        check_layout(recipe)


@pytest.mark.parametrize("name", sorted(recipes.SIZES))
def test_recipe_builds_at_its_declared_size(name):
    module = recipes.SIZES[name]
    recipe = module.pretrain_recipe()
    config = check_layout(recipe)
    count = parameter_count(config)["total"]
    nominal = NOMINAL_SIZES[module.SIZE.preset]
    assert abs(count - nominal) <= 0.1 * nominal, (name, count, nominal)
    lightning_module = fdl.build(recipe.model)
    assert lightning_module.chunks is None  # no weights until configure_model on the training job
    if recipe.data.__fn_or_cls__.__name__ == "MockDataModule":
        assert fdl.build(recipe.data).vocab_size is None  # the model's, taken when the run starts
    lora = module.finetune_recipe(checkpoint="ckpts/x", data="sft.jsonl")
    assert lora.resume.restore_weights_from == "ckpts/x" and lora.data.train_path == "sft.jsonl"
    assert lora.data.tokenizer_dir is None  # the checkpoint's, filled in by finetune
    assert lora.model.optimizer.weight_decay == 0.0 and lora.model.lr_schedule.decay_style == "WSD"
    assert fdl.build(lora.model.peft).target_modules == ["in_proj", "out_proj", "linear_fc1", "linear_fc2"]
    full = module.finetune_recipe(checkpoint="ckpts/x", peft_scheme="none")
    assert full.model.peft is None and full.model.optimizer.lr < lora.model.optimizer.lr


@pytest.mark.parametrize("name", sorted(recipes.SIZES))
def test_a_size_module_is_data_and_gets_its_four_factories_registered(name):
    """NAME and SIZE are all a size module sets; its model, trainer, pretrain_recipe and
    finetune_recipe (recipes.common.size_factories) are nemo-run's `NAME` factories and, to
    inspect, pickle and the help tables, functions of that module with a help text."""
    import pickle

    import nemo_run as run
    import pytorch_lightning as pl

    from falcon_h1.api import finetune, pretrain
    from falcon_h1.run_context import registered_recipes

    module = recipes.SIZES[name]
    assert module.NAME == name == module.__name__.rsplit(".", 1)[1]
    assert registered_recipes(pretrain)[name] is module.pretrain_recipe
    assert registered_recipes(finetune)[name] is module.finetune_recipe
    assert run.cli.resolve_factory(pl.LightningModule, name) is module.model
    assert run.cli.resolve_factory(pl.Trainer, name) is module.trainer
    title = module.__doc__.splitlines()[0].rstrip(".")
    for factory in (module.model, module.trainer, module.pretrain_recipe, module.finetune_recipe):
        assert (factory.__module__, factory.__qualname__) == (module.__name__, factory.__name__)
        assert pickle.loads(pickle.dumps(factory)) is factory
        assert factory.__doc__.startswith(title), factory.__doc__
    size = module.SIZE
    trainer = module.trainer(dir="runs/x", max_steps=7)
    assert (trainer.log_dir, trainer.max_steps, trainer.devices, trainer.num_nodes) == (
        "runs/x", 7, size.num_gpus_per_node, size.num_nodes)
    assert (trainer.val_check_interval, trainer.limit_val_batches, trainer.checkpoint_every_n_steps) == (
        size.val_check_interval, size.limit_val_batches, size.checkpoint_every_n_steps)
    data = module.pretrain_recipe().data.__fn_or_cls__.__name__
    assert data == {"mock": "MockDataModule", "corpus": "default_corpus_data"}[size.data]


def test_recipe_help_lists_the_size_factories_with_their_help_texts(tmp_path):
    done = falcon_h1_cli("pretrain", "--factory", "falcon_h1_7b", "--help", "--docs", tmp_path=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    for name in recipes.SIZES:
        for factory in ("pretrain_recipe", "model", "trainer"):
            assert f"recipes.{name}.{factory}" in done.stdout, (name, factory)
    assert "Falcon-H1-7B (7.6B parameters; flagship): pretraining from scratch" in done.stdout
    assert "recipes.attention_baseline.pretrain_recipe" in done.stdout  # --factory attention_baseline
    assert "No docs" not in done.stdout.split("Factory for data")[0]


def every_recipe():
    """(name, recipe factory) of every pretraining and fine-tuning recipe."""
    for name, module in sorted(recipes.SIZES.items()):
        yield f"{name} pretrain", module.pretrain_recipe
        yield f"{name} finetune", lambda module=module: module.finetune_recipe(checkpoint="ckpts/x", data="sft.jsonl")
        yield f"{name} attention_baseline", lambda name=name: attention_baseline.pretrain_recipe(size=name)
    for name in sorted(long_context.LAYOUTS):
        yield f"{name} long_context", lambda name=name: long_context.pretrain_recipe(size=name, checkpoint="ckpts/x")
    for name in ratio_sweep.sweep_tasks(corpus=False):
        yield f"ratio_sweep {name}", lambda name=name: ratio_sweep.sweep_tasks(corpus=False)[name]
    for variant in convergence.VARIANTS:
        yield f"convergence {variant}", lambda variant=variant: convergence.pretrain_recipe(variant, cuda_graphs=False)


def test_every_recipe_scales_its_schedule_to_the_run():
    """Warm-up and decay are fractions of trainer.max_steps and the LR ends at lr / 8 whatever lr
    the command line sets: a recipe at its own length keeps its documented warm-up, at 5 steps it
    still trains, and a new lr moves min_lr with it."""
    from nemo_run.cli.cli_parser import parse_cli_args

    from falcon_h1.training.optim import resolved_min_lr

    warmups = {"tiny pretrain": 30, "falcon_h1_1p5b pretrain": 500, "falcon_h1_7b finetune": 50,
               "falcon_h1_7b long_context": 50, "ratio_sweep attn4_mamba4": 30, "convergence hybrid": 25}
    for name, recipe in every_recipe():
        default = recipe()
        schedule = fdl.build(default.model.lr_schedule)
        steps = schedule.steps(default.trainer.max_steps)
        assert steps.warmup == warmups.get(name, steps.warmup), (name, steps)
        assert 0 < steps.wsd_decay <= 0.1 * default.trainer.max_steps + 1, (name, steps)
        task = parse_cli_args(recipe(), ["trainer.max_steps=5", "model.optimizer.lr=2e-3"])
        assert fdl.build(task.model.lr_schedule).steps(task.trainer.max_steps).decay == 5, name
        assert resolved_min_lr(fdl.build(task.model.optimizer)) == pytest.approx(2e-3 / 8), name
    explicit = parse_cli_args(tiny.pretrain_recipe(), ["model.optimizer.min_lr=1e-5", "model.optimizer.lr=2e-3"])
    assert resolved_min_lr(fdl.build(explicit.model.optimizer)) == 1e-5


def test_every_recipes_dryrun_takes_a_five_step_run(tmp_path):
    """`falcon-h1 pretrain|finetune --factory NAME trainer.max_steps=5 --dryrun` for every size
    (one process, the commands one after the other)."""
    commands = [[task, "--factory", factory, "trainer.max_steps=5", "--dryrun"] for name in sorted(recipes.SIZES)
                for task, factory in (("pretrain", name), ("finetune", f"{name}(checkpoint=ckpts/x, data=sft.jsonl)"))]
    script = ("import json, sys\nfrom falcon_h1.cli import main\n"
              "print('exit codes', [main(command) for command in json.loads(sys.argv[1])])")
    env = dict(os.environ, NEMORUN_HOME=str(tmp_path / "nemorun"), COLUMNS="200", PYTHONWARNINGS="ignore")
    done = subprocess.run([sys.executable, "-c", script, json.dumps(commands)], capture_output=True, text=True,
                          cwd=REPO, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"exit codes {[0] * len(commands)}" in done.stdout, done.stdout[-3000:] + done.stderr[-3000:]
    assert done.stdout.count("max_steps=5,") == len(commands)


@pytest.mark.parametrize("name", sorted(recipes.SIZES))
def test_attention_baseline_has_the_same_size_and_no_mamba(name):
    recipe = attention_baseline.pretrain_recipe(size=name)
    config = check_layout(recipe)
    hybrid = built_config(recipes.SIZES[name].pretrain_recipe())
    assert config.mamba_num_heads == 0 and config.num_attention_heads > 0
    ratio = parameter_count(config)["total"] / parameter_count(hybrid)["total"]
    assert 0.97 <= ratio <= 1.0, ratio


@pytest.mark.parametrize("name", sorted(long_context.LAYOUTS))
def test_long_context_recipe_layout(name):
    recipe = long_context.pretrain_recipe(size=name, checkpoint="ckpts/x")
    config = check_layout(recipe)
    assert recipe.data.seq_length == 131072 and config.max_position_embeddings >= 131072
    assert config.recompute_granularity == "selective" and config.recompute_modules == ["core_attn"]
    assert config.recompute_ssd_scan
    assert recipe.trainer.devices * recipe.trainer.num_nodes >= recipe.trainer.strategy.context_parallel_size
    assert recipe.resume.restore_weights_from == "ckpts/x"


def test_dryrun_with_the_local_executor_prints_the_torchrun_command(tmp_path):
    done = falcon_h1_cli("pretrain", "--factory", "tiny", "--dryrun", "run.executor=local",
                         "run.executor.ntasks_per_node=2", tmp_path=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    words = done.stdout.replace("'", " ").replace(",", " ").split()
    assert "torchrun" in words
    assert words[words.index("--nproc-per-node") + 1] == "2"
    assert "Launching" not in done.stdout


def test_tiny_pretrain_through_the_cli_then_its_yaml_gives_the_same_config(tmp_path):
    run_dir = tmp_path / "tiny"
    overrides = ["trainer.max_steps=5", f"trainer.log_dir={run_dir}", "trainer.val_check_interval=3",
                 "trainer.limit_val_batches=2"]
    done = falcon_h1_cli("pretrain", "--factory", "tiny", *overrides, "-y", "run.executor=local", tmp_path=tmp_path)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    result = json.loads((run_dir / "result.json").read_text())
    assert result["global_step"] == 5 and result["val_loss"] < 8.5
    assert (run_dir / "checkpoints" / "step=0000005" / "weights" / "metadata.json").is_file()
    assert (run_dir / "loss.png").is_file() and list((run_dir / "tensorboard").iterdir())
    assert "step 5/5" in done.stdout

    exported = falcon_h1_cli("pretrain", "--factory", "tiny", *overrides, "--to-yaml", tmp_path / "tiny.yaml",
                             tmp_path=tmp_path)
    assert exported.returncode == 0, exported.stderr[-3000:]
    again = falcon_h1_cli("pretrain", "--yaml", tmp_path / "tiny.yaml", "--to-yaml", tmp_path / "again.yaml",
                          tmp_path=tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    assert (tmp_path / "again.yaml").read_text() == (tmp_path / "tiny.yaml").read_text()
    assert f"log_dir: {run_dir}" in (tmp_path / "tiny.yaml").read_text()


@pytest.mark.parametrize("args, message", [
    (["--factory", "tinyy"], "--factory tinyy: no such recipe of pretrain; did you mean 'tiny'?"),
    (["--factory", "tiny", "trainer.max_stepz=3"], "trainer.max_stepz: build_trainer has no argument 'max_stepz'"),
    (["--factory", "tiny", "trainer.max_steps=abc"], "Failed to parse 'abc'"),
])
def test_cli_typos_fail_naming_the_problem(tmp_path, args, message):
    done = falcon_h1_cli("pretrain", *args, "--dryrun", tmp_path=tmp_path)
    assert done.returncode != 0
    assert message in done.stdout + done.stderr


def test_a_failed_task_fails_the_command(tmp_path):
    # A warm-up set in steps, longer than the run: the job raises before it builds the model.
    done = falcon_h1_cli("pretrain", "--factory", "tiny", "trainer.max_steps=3", "model.lr_schedule.warmup_steps=30",
                         f"trainer.log_dir={tmp_path / 'r'}", "-y", "run.executor=local", tmp_path=tmp_path)
    assert done.returncode != 0
    assert "did not write" in done.stdout + done.stderr
    assert ("LRSchedule.warmup_steps=30 must be below the decay horizon 3 (trainer.max_steps): lower "
            "model.lr_schedule.warmup_steps") in done.stdout + done.stderr


def test_import_and_export_commands(tmp_path):
    from falcon_h1.parity import make_hf_model

    make_hf_model(seed=3).save_pretrained(tmp_path / "hf")
    done = falcon_h1_cli("import", "-y", f"source={tmp_path / 'hf'}", f"output={tmp_path / 'ckpt'}",
                         tmp_path=tmp_path)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    assert (tmp_path / "ckpt" / "weights" / "metadata.json").is_file()
    done = falcon_h1_cli("export", "-y", f"checkpoint={tmp_path / 'ckpt'}", f"output={tmp_path / 'out'}",
                         tmp_path=tmp_path)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    assert (tmp_path / "out" / "model.safetensors").is_file() and (tmp_path / "out" / "config.json").is_file()
    again = falcon_h1_cli("import", "-y", f"source={tmp_path / 'hf'}", f"output={tmp_path / 'ckpt'}",
                          tmp_path=tmp_path)
    assert again.returncode != 0 and "already exists" in again.stdout + again.stderr


def test_nemo_falcon_namespace(tmp_path):
    env = dict(os.environ, NEMORUN_HOME=str(tmp_path), COLUMNS="200")
    nemo = os.path.join(os.path.dirname(sys.executable), "nemo")
    done = subprocess.run([nemo, "falcon", "--help"], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    for command in ("pretrain", "finetune", "import", "export", "merge-lora", "generate", "evaluate", "bench"):
        assert command in done.stdout


def test_bench_times_real_training_steps_through_the_cli(tmp_path):
    out = tmp_path / "bench.json"
    done = falcon_h1_cli("bench", "-y", "preset=tiny", "seq_lengths=[128]", "steps=2", "warmup=1", f"output={out}",
                         tmp_path=tmp_path)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    rows = json.loads(out.read_text())
    stacks = ["falcon_h1", "transformers", "megatron_gpt"]
    assert [(r["stack"], r["seq_length"]) for r in rows] == [(s, 128) for s in stacks]
    assert all(r["steps"] == 2 for r in rows)
    assert all(r["step_time_s"] > 0 and r["tokens_per_sec_per_gpu"] > 0 and r["model_tflops_per_gpu"] > 0
               for r in rows)
    assert all(r["mamba_path"] == "torch" for r in rows if r["stack"] == "transformers")  # no kernels on CPU
    hybrid = parameter_count(preset_config("tiny"))["total"]
    assert all(abs(r["parameters"] - hybrid) <= 0.05 * hybrid for r in rows if r["stack"] == "megatron_gpt")
    assert "| megatron_gpt | tiny | 128 |" in done.stdout


def test_ratio_sweep_runs_and_writes_its_table_and_plot(tmp_path):
    env = dict(os.environ, NEMORUN_HOME=str(tmp_path / "nemorun"), PYTHONWARNINGS="ignore")
    done = subprocess.run(
        [sys.executable, "-m", "recipes.ratio_sweep", "--dir", tmp_path / "sweep", "--max-steps", "4", "--seq-length",
         "128", "--global-batch-size", "4", "--micro-batch-size", "2", "--num-layers", "2", "--hidden-size", "128",
         "--ratios", "8:0", "0:8", "--mock-data"], capture_output=True, text=True, cwd=REPO, env=env, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    rows = json.loads((tmp_path / "sweep" / "ratio_sweep.json").read_text())
    assert [r["ratio"] for r in rows] == ["8:0", "0:8"]
    assert all(r["steps"] == 4 and r["tokens_per_sec_per_gpu"] > 0 for r in rows)
    assert (tmp_path / "sweep" / "ratio_sweep.png").stat().st_size > 1000
    assert "| 0:8 | 4 |" in (tmp_path / "sweep" / "ratio_sweep.md").read_text()


def test_every_sweep_ratio_builds():
    tasks = ratio_sweep.sweep_tasks(dir="runs/sweep")
    assert list(tasks) == ["attn8_mamba0", "attn6_mamba2", "attn4_mamba4", "attn2_mamba6", "attn0_mamba8"]
    for task in tasks.values():
        config = fdl.build(task.model.config)
        assert config.num_attention_heads + config.mamba_num_heads == 8


def test_max_length_doubles_the_sequence_until_a_run_fails(tmp_path):
    """Each length trains in its own process (torchrun for CP=2 on two CPU ranks); the search
    reports the largest length that trained, and stops at the first that does not."""
    def search(*flags):
        out = tmp_path / "rows.json"
        proc = subprocess.run([sys.executable, "-m", "falcon_h1.benchmarks.max_length", "--preset", "tiny",
                               "--num-layers", "2", "--start", "64", "--max", "128", "--steps", "1", "--warmup", "1",
                               "--json", str(out), *flags], capture_output=True, text=True, timeout=600)
        return proc, json.loads(out.read_text())

    proc, rows = search("--nproc", "2", "--cp", "2")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert [(r["seq_length"], r["outcome"]) for r in rows] == [(64, "trained"), (128, "trained")]
    assert rows[-1]["layout"]["cp"] == 2 and rows[-1]["tokens_per_sec_per_gpu"] > 0
    assert "largest trained sequence: 128 tokens" in proc.stdout

    proc, rows = search("--cp", "2")  # one process cannot hold two CP ranks
    assert proc.returncode == 1
    assert [(r["seq_length"], r["outcome"]) for r in rows] == [(64, "failed")]


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU refusal")
def test_cuda_graphs_on_cpu_are_refused_with_the_setting_to_change():
    from falcon_h1.benchmarks.step import bench_training_step

    with pytest.raises(ValueError, match="needs GPUs.*cuda_graph_impl=none in a recipe"):
        bench_training_step("tiny", seq_length=64, steps=1, warmup=0, num_layers=1, cuda_graph_impl="local")
