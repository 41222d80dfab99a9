"""`python -m recipes.convergence`: the three runs of the convergence comparison, then its table
and plot (recipes/convergence/__init__.py says what is compared)."""

import argparse
import sys

import nemo_run as run

from falcon_h1.data.code_corpus import missing_corpus

from recipes import common, convergence
from recipes.convergence import NAME, NUM_LAYERS, SIZE, VARIANTS, pretrain_recipe, summarize
from recipes.executors import use_this_pythons_torchrun


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m recipes.convergence", description=convergence.__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--corpus", default="data/site_packages", help="a corpus made by falcon_h1.data.code_corpus")
    parser.add_argument("--dir", default=f"runs/{NAME}", help="where the runs and the summary go")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--max-steps", type=int, default=SIZE.max_steps)
    parser.add_argument("--num-layers", type=int, default=NUM_LAYERS)
    parser.add_argument("--seq-length", type=int, default=SIZE.seq_length)
    parser.add_argument("--global-batch-size", type=int, default=SIZE.global_batch_size)
    parser.add_argument("--micro-batch-size", type=int, default=SIZE.micro_batch_size)
    parser.add_argument("--devices", type=int, default=1, help="GPUs per run (torchrun processes)")
    parser.add_argument("--summarize-only", action="store_true", help="only rebuild the table and plot")
    args = parser.parse_args(argv)
    if not args.summarize_only:
        problem = missing_corpus(args.corpus)
        if problem:  # before nemo-run starts anything
            print(f"error: --corpus {args.corpus}: {problem}", file=sys.stderr)
            return 2
        use_this_pythons_torchrun()
        tasks = {variant: pretrain_recipe(variant, args.corpus, f"{args.dir}/{variant}", args.max_steps,
                                          args.num_layers, args.seq_length, args.global_batch_size,
                                          args.micro_batch_size, args.devices) for variant in args.variants}
        common.run_in_turn(NAME, common.unfinished(tasks, args.dir),
                           run.LocalExecutor(ntasks_per_node=args.devices, launcher="torchrun"))
    summary = summarize(args.dir, args.variants, args.num_layers)
    print(summary["table"].read_text())
    print(f"plot: {summary['plot']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
