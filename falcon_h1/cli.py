"""The `falcon-h1` command: nemo-run's CLI for the entrypoints of falcon_h1.api.

    falcon-h1 pretrain --factory falcon_h1_1p5b trainer.max_steps=1000 run.executor=local run.executor.devices=8
    falcon-h1 pretrain --factory tiny --dryrun          # print what would run
    falcon-h1 pretrain --factory tiny --to-yaml t.yaml  # the whole config as YAML; run it with --yaml t.yaml
    falcon-h1 finetune --factory falcon_h1_7b resume.restore_weights_from=ckpts/falcon-h1-7b
    falcon-h1 import source=hf/Falcon-H1-7B-Base output=ckpts/falcon-h1-7b
    falcon-h1 export checkpoint=runs/x/checkpoints/step=0001000 output=exports/x
    falcon-h1 preprocess --input web/ --output-prefix data/web --tokenizer tok/ --shard-size 2GB --tasks 8

`nemo falcon ...` is the same (the package registers the namespace with nemo-run). Unlike
nemo-run's own command, this one exits non-zero when the command fails (a typo, a bad value).
"""

import sys

NAMESPACE = "falcon"


def main(argv: list[str] | None = None) -> int:
    import os

    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] == ["preprocess"]:
        # Flags like preprocess.py's (--input A B --shard-size S), not nemo-run's KEY=VALUE: its own parser.
        from falcon_h1.preprocess_tasks import main as preprocess

        return preprocess(args[1:], slurm_executor=_slurm_executor)

    os.environ.setdefault("NEMORUN_SHOW_WARNINGS", "0")
    # torchrun's agent logs at nemo-run's default level INFO: ~45 lines of rendezvous details a run.
    os.environ.setdefault("LOGLEVEL", "WARNING")
    from nemo_run.cli.api import _add_typer_nested, list_entrypoints
    from typer import Typer

    import falcon_h1.api  # noqa: F401  (registers the entrypoints)
    import recipes  # noqa: F401  (registers the recipe and executor factories)
    from recipes.executors import use_this_pythons_torchrun

    use_this_pythons_torchrun()
    # The namespace's commands straight from nemo-run's registry: this works whether or not the
    # package is installed (nemo-run's own `nemo` command finds it through the entry point).
    app = Typer(pretty_exceptions_enable=False)
    _add_typer_nested(app, {NAMESPACE: list_entrypoints()[NAMESPACE]})
    try:
        # sys.argv stays as the user typed it: Lightning starts the other processes of a multi-device
        # run (trainer.devices=N without an executor) by re-running it.
        # nemo-run's errors end as typer.Exit(1): returned here.
        status = app(args=[NAMESPACE, *args], prog_name="falcon-h1", standalone_mode=False)
    except SystemExit as exit:
        return exit.code if isinstance(exit.code, int) else 1
    except KeyboardInterrupt:  # Ctrl-C: what was stopped has said so
        return 130
    except Exception as error:  # click usage errors (an unknown command, a bad option)
        print(f"error: {error}", file=sys.stderr)
        return 2
    return status if isinstance(status, int) else 0


def _slurm_executor(**kwargs):
    """The recipes' Slurm executor, for `preprocess --executor slurm`; imported only then, as importing
    the recipes imports the training stack, which preprocessing does not need."""
    from recipes.executors import slurm_executor

    return slurm_executor(**kwargs)


if __name__ == "__main__":
    sys.exit(main())
