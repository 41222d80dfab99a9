"""Pretrain a Falcon-H1 model: `python -m falcon_h1.train --help`.

Without arguments it runs the tiny recipe (recipes/tiny.py, where the defaults come from): the
`tiny` preset on the bundled corpus (the Python standard library, tokenized once and cached) for
300 steps - on the GPU if there is one, else on the CPU in a few minutes - and prints where the
checkpoint, the logs and the loss plot are. Run it again with the same --log-dir and it resumes
from the latest complete checkpoint. Under torchrun, every process runs this same command (e.g.
`torchrun --nproc-per-node 2 -m falcon_h1.train --tp 2`).
"""

from __future__ import annotations

import argparse
import functools
import os
import sys

# The flag of each checked argument (falcon_h1.arguments names arguments as the recipes do).
FLAGS = {"num_layers": "--num-layers", "seq_length": "--seq-length", "micro_batch_size": "--micro-batch-size",
         "global_batch_size": "--global-batch-size", "max_steps": "--max-steps", "lr": "--lr",
         "val_check_interval": "--val-every", "limit_val_batches": "--val-batches", "log_every_n_steps": "--log-every",
         "checkpoint_every_n_steps": "--checkpoint-every", "keep_last_k": "--keep-last",
         "hang_timeout": "--hang-timeout", "tensor_model_parallel_size": "--tp",
         "pipeline_model_parallel_size": "--pp", "virtual_pipeline_model_parallel_size": "--vpp",
         "context_parallel_size": "--cp"}


class _ArgumentParser(argparse.ArgumentParser):
    def error(self, message):  # one line, as every other bad input of the main job
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")


@functools.cache
def tiny_recipe():
    """The tiny recipe's config (recipes/tiny.py): the main job's defaults, optimizer and schedule."""
    from recipes import tiny

    return tiny.pretrain_recipe()


def recipe_defaults() -> dict:
    """The value of each flag left unset: the tiny recipe's."""
    from falcon_h1.data.pretraining import DEFAULT_SPLIT
    from recipes import tiny

    recipe = tiny_recipe()
    trainer, data, model = recipe.trainer, recipe.data, recipe.model
    strategy = trainer.strategy
    return dict(preset=tiny.SIZE.preset, seq_length=data.seq_length, micro_batch_size=data.micro_batch_size,
                global_batch_size=data.global_batch_size, split=DEFAULT_SPLIT, seed=data.seed,
                max_steps=trainer.max_steps, log_dir=trainer.log_dir, lr=model.optimizer.lr,
                lr_decay=model.lr_schedule.decay_style, val_every=trainer.val_check_interval,
                val_batches=trainer.limit_val_batches, log_every=trainer.log_every_n_steps,
                checkpoint_every=trainer.checkpoint_every_n_steps, keep_last=trainer.keep_last_k,
                tp=strategy.tensor_model_parallel_size, pp=strategy.pipeline_model_parallel_size,
                vpp=strategy.virtual_pipeline_model_parallel_size, cp=strategy.context_parallel_size,
                sp=strategy.sequence_parallel)


def parse_args(argv=None) -> argparse.Namespace:
    """The flags; those not given take the tiny recipe's values (after --help, which needs none)."""
    parser = _ArgumentParser(
        prog="python -m falcon_h1.train", description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    model = parser.add_argument_group("model")
    model.add_argument("--preset", help="model preset (default: tiny; see docs/models.md)")
    model.add_argument("--num-layers", type=int, help="override the preset's number of layers")
    data = parser.add_argument_group("data")
    data.add_argument("--data", nargs="+", metavar="PREFIX",
                      help="indexed dataset prefixes, or WEIGHT PREFIX pairs (default: the bundled corpus)")
    data.add_argument("--tokenizer", help="Hugging Face tokenizer directory of --data")
    data.add_argument("--mock-data", action="store_true", help="random tokens instead of a corpus")
    data.add_argument("--seq-length", type=int)
    data.add_argument("--micro-batch-size", type=int)
    data.add_argument("--global-batch-size", type=int)
    data.add_argument("--split", help="train,validation,test proportions of --data "
                                      "(the bundled corpus has its own validation files)")
    run = parser.add_argument_group("run")
    run.add_argument("--max-steps", type=int)
    run.add_argument("--log-dir", help="checkpoints, TensorBoard logs and the loss plot")
    run.add_argument("--lr", type=float)
    run.add_argument("--warmup-steps", type=int, help="linear LR warm-up (default: 10%% of --max-steps)")
    run.add_argument("--lr-decay", choices=["WSD", "cosine", "linear", "constant"])
    run.add_argument("--precision", choices=["bf16-mixed", "32"], help="default: bf16-mixed on GPU, 32 on CPU")
    run.add_argument("--val-every", type=int, help="validate every N steps")
    run.add_argument("--val-batches", type=int, help="global batches per validation")
    run.add_argument("--log-every", type=int, help="print a progress line every N steps")
    run.add_argument("--checkpoint-every", type=int, help="save every N steps (and at the end)")
    run.add_argument("--keep-last", type=int, help="complete checkpoints to keep")
    run.add_argument("--async-save", action="store_true", help="write checkpoints in the background (GPU)")
    run.add_argument("--seed", type=int)
    run.add_argument("--hang-timeout", type=float, default=1800, metavar="SECONDS",  # watchdog.DEFAULT_HANG_TIMEOUT
                     help="a process without progress (training or validation batch, checkpoint save) for "
                          "this long prints where it is and exits, ending the job (default: %(default).0f; "
                          "0: never)")
    resume = parser.add_argument_group("resume")
    resume.add_argument("--no-resume", action="store_true", help="start over even if --log-dir has checkpoints")
    resume.add_argument("--resume-from", help="continue from this checkpoint")
    resume.add_argument("--restore-weights-from", help="start a new run from this checkpoint's weights")
    resume.add_argument("--fall-back-if-damaged", action="store_true",
                        help="if the latest checkpoint is damaged (its files differ from their checksums), resume "
                             "from the previous complete one, warning, instead of stopping")
    parallel = parser.add_argument_group("parallelism (data parallelism takes the remaining processes)")
    parallel.add_argument("--tp", type=int, help="tensor-parallel size")
    parallel.add_argument("--pp", type=int, help="pipeline-parallel size")
    parallel.add_argument("--vpp", type=int, help="virtual pipeline stages per pipeline rank")
    parallel.add_argument("--cp", type=int, help="context-parallel size")
    parallel.add_argument("--sp", action="store_true", default=None, help="sequence parallelism (with --tp > 1)")
    args = parser.parse_args(argv)
    for name, value in recipe_defaults().items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    return args


def check_arguments(args: argparse.Namespace) -> None:
    """The numeric and layout flags, before anything is built; the same checks run again where the
    values are used (data module, trainer, optimizer), naming the recipe fields."""
    from falcon_h1.arguments import (
        check_batch_sizes,
        check_integer,
        check_learning_rates,
        check_parallel_sizes,
        check_trainer_arguments,
    )

    check_integer("--max-steps", args.max_steps, 1, "the optimizer steps to train")
    if args.warmup_steps is not None:
        check_integer("--warmup-steps", args.warmup_steps, 0, "the steps of the linear LR warm-up")
        if args.warmup_steps >= args.max_steps:
            raise ValueError(f"--warmup-steps {args.warmup_steps}: must be below --max-steps {args.max_steps} "
                             "(the warm-up is part of the run)")
    check_learning_rates(args.lr, name=FLAGS.get)
    check_trainer_arguments(args.max_steps, args.val_every, args.val_batches, args.log_every,
                            args.checkpoint_every, args.keep_last, hang_timeout=args.hang_timeout, name=FLAGS.get)
    # Under torchrun the world is known now: data parallelism takes what the model layout leaves.
    world = int(os.environ.get("WORLD_SIZE", 1))
    check_parallel_sizes(args.tp, args.pp, args.vpp, args.cp, world_size=world, name=FLAGS.get)
    data_parallel = world // (args.tp * args.pp * args.cp)
    check_batch_sizes(args.seq_length, args.micro_batch_size, args.global_batch_size, data_parallel, name=FLAGS.get)
    if args.seq_length % args.cp:
        raise ValueError(f"--seq-length {args.seq_length}: must be a multiple of --cp {args.cp} (every "
                         "context-parallel rank holds an equal part of each sequence)")
    check_integer("--num-layers", args.num_layers, 1, "the model's layers, e.g. 4", optional=True)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        check_arguments(args)
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    from falcon_h1.training.checkpoint_io import CheckpointError

    try:
        return train(args)
    except (ValueError, FileNotFoundError, CheckpointError) as error:
        # Bad input (data path, layout, checkpoint, tokenizer): the message says what and where.
        print(f"error: {error}", file=sys.stderr)
        return 2


def train(args: argparse.Namespace) -> int:
    from falcon_h1.arguments import check_pipeline_split
    from falcon_h1.data.default_corpus import default_corpus
    from falcon_h1.data.pretraining import MockDataModule, PreTrainingDataModule
    from falcon_h1.model.presets import preset_config
    from falcon_h1.training.checkpoint import AutoResume
    from falcon_h1.training.module import FalconH1Module
    import fiddle as fdl

    from falcon_h1.training.pretrain import build_trainer, pretrain
    from falcon_h1.training.strategy import MegatronStrategy

    overrides = {"num_layers": args.num_layers} if args.num_layers is not None else {}
    config = preset_config(args.preset, **overrides)
    if args.pp > 1:  # the preset's layers, or --num-layers
        layers = FLAGS["num_layers"] if args.num_layers is not None else f"the {args.preset} preset's num_layers"
        check_pipeline_split(config.num_layers, args.pp, args.vpp, name={**FLAGS, "num_layers": layers}.get)
    batch = dict(seq_length=args.seq_length, micro_batch_size=args.micro_batch_size,
                 global_batch_size=args.global_batch_size, seed=args.seed)
    if args.mock_data:
        data, tokenizer_dir = MockDataModule(vocab_size=config.vocab_size, **batch), None
    elif args.data:
        if not args.tokenizer:
            sys.exit("--data needs --tokenizer (the tokenizer directory the data was made with)")
        data = PreTrainingDataModule(args.data, args.tokenizer, split=args.split, **batch)
        tokenizer_dir = args.tokenizer
    else:
        corpus = default_corpus()
        data = PreTrainingDataModule(corpus.paths, corpus.tokenizer_dir, **batch)
        tokenizer_dir = corpus.tokenizer_dir

    tiny = tiny_recipe().model  # the tiny recipe's optimizer and schedule, with the flags' values
    module = FalconH1Module(
        config, fdl.build(fdl.copy_with(tiny.optimizer, lr=args.lr)),
        fdl.build(fdl.copy_with(tiny.lr_schedule, warmup_steps=args.warmup_steps, decay_style=args.lr_decay)),
        tokenizer_dir=tokenizer_dir)
    strategy = MegatronStrategy(
        tensor_model_parallel_size=args.tp, pipeline_model_parallel_size=args.pp,
        virtual_pipeline_model_parallel_size=args.vpp, context_parallel_size=args.cp,
        sequence_parallel=args.sp, async_save=args.async_save, seed=args.seed)
    trainer = build_trainer(
        args.log_dir, args.max_steps, strategy, precision=args.precision, val_check_interval=args.val_every,
        limit_val_batches=args.val_batches, log_every_n_steps=args.log_every,
        checkpoint_every_n_steps=args.checkpoint_every, keep_last_k=args.keep_last,
        hang_timeout=args.hang_timeout)
    resume = AutoResume(resume_if_exists=not args.no_resume, resume_from_path=args.resume_from,
                        restore_weights_from=args.restore_weights_from,
                        fall_back_if_damaged=args.fall_back_if_damaged)
    pretrain(module, data, trainer, resume)  # prints the header, progress and where the results are
    return 0


if __name__ == "__main__":
    sys.exit(main())
