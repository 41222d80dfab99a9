"""The attention:Mamba head-ratio sweep: one run.Experiment, the same budget at every ratio.

Every run has 8 head slots of width 64 per layer, split between attention heads and Mamba-2 heads
(8:0, 6:2, 4:4, 2:6, 0:8); all else - layers, hidden size, MLP, data, steps, batch, LR - is equal,
so the runs see the same tokens and differ in the mixer alone. At the end the experiment writes
ratio_sweep.json, ratio_sweep.md (a table) and ratio_sweep.png (tokens/s per GPU against final
validation loss) into its directory. In Python: `common.run_in_turn("ratio_sweep", sweep_tasks(...),
executor)`, then `summarize(dir)`.

    python -m recipes.ratio_sweep --dir runs/ratio_sweep --devices 1 --max-steps 300
    python -m recipes.ratio_sweep --help
"""

import argparse
import json
import sys
from pathlib import Path

import nemo_run as run

from recipes import common
from recipes.executors import use_this_pythons_torchrun

RATIOS = ((8, 0), (6, 2), (4, 4), (2, 6), (0, 8))
HEAD_DIM = 64


def ratio_size(seq_length: int, global_batch_size: int, micro_batch_size: int, max_steps: int, lr: float,
               devices: int, corpus: bool = True) -> common.Size:
    """Every ratio's budget: validation 4 times a run, 10 progress lines, one checkpoint at the end."""
    return common.Size(preset="tiny-90m", seq_length=seq_length, global_batch_size=global_batch_size,
                       micro_batch_size=micro_batch_size, num_gpus_per_node=devices, lr=lr,
                       warmup_fraction=0.1, max_steps=max_steps, data="corpus" if corpus else "mock",
                       val_check_interval=max(1, max_steps // 4), limit_val_batches=8,
                       log_every_n_steps=max(1, max_steps // 10), checkpoint_every_n_steps=max_steps, keep_last_k=1)


def ratio_model_config(attention_heads: int, mamba_heads: int, num_layers: int, hidden_size: int) -> run.Config:
    """A Falcon-H1 of `hidden_size` with that many attention and Mamba-2 heads (width 64 each)."""
    return common.model_config(
        "tiny-90m", num_layers=num_layers, hidden_size=hidden_size, ffn_hidden_size=3 * hidden_size,
        num_attention_heads=attention_heads, num_query_groups=min(2, attention_heads), kv_channels=HEAD_DIM,
        mamba_num_heads=mamba_heads, mamba_head_dim=HEAD_DIM, mamba_state_dim=64, mamba_num_groups=1,
        mamba_chunk_size=128)


def ratio_run(attention_heads: int, mamba_heads: int, dir: str, size: common.Size, num_layers: int,
              hidden_size: int, data: run.Config) -> run.Partial:
    config = ratio_model_config(attention_heads, mamba_heads, num_layers, hidden_size)
    trainer = common.trainer_config(size, f"{dir}/attn{attention_heads}_mamba{mamba_heads}")
    recipe = common.pretrain_task(common.lightning_module(config, size.lr, size.warmup_fraction), trainer, data)
    recipe.resume.resume_if_exists = False
    return recipe


def sweep_tasks(dir: str = "runs/ratio_sweep", devices: int = 1, max_steps: int = 300, seq_length: int = 1024,
                global_batch_size: int = 32, micro_batch_size: int = 8, lr: float = 1e-3, num_layers: int = 8,
                hidden_size: int = 512, ratios=RATIOS, corpus: bool = True) -> dict[str, run.Partial]:
    """One pretraining run per ratio, by name (attn6_mamba2, ...). Data: the bundled corpus
    (corpus=False: random tokens)."""
    size = ratio_size(seq_length, global_batch_size, micro_batch_size, max_steps, lr, devices, corpus)
    data = common.default_data(size)
    return {f"attn{a}_mamba{m}": ratio_run(a, m, dir, size, num_layers, hidden_size, data) for a, m in ratios}


def summarize(dir: str, ratios=RATIOS) -> dict:
    """Read each run's result.json; write ratio_sweep.json, .md and .png into `dir`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = []
    for attention_heads, mamba_heads in ratios:
        result = common.run_result(Path(dir) / f"attn{attention_heads}_mamba{mamba_heads}",
                                   f"{attention_heads}:{mamba_heads}")
        throughput = result.get("throughput") or {}
        rows.append({"ratio": f"{attention_heads}:{mamba_heads}", "steps": result["global_step"],
                     "val_loss": result["val_loss"], "train_loss": result["train_loss"],
                     "tokens_per_sec_per_gpu": throughput.get("throughput/tokens_per_sec_per_gpu"),
                     "step_time_s": throughput.get("throughput/step_time_s")})
    out = Path(dir)
    (out / "ratio_sweep.json").write_text(json.dumps(rows, indent=2) + "\n")
    lines = ["| attention:Mamba heads | steps | validation loss | train loss | tokens/s per GPU |",
             "| --- | --- | --- | --- | --- |"]
    for r in rows:
        tps = f"{r['tokens_per_sec_per_gpu']:.0f}" if r["tokens_per_sec_per_gpu"] else "-"
        lines.append(f"| {r['ratio']} | {r['steps']} | {r['val_loss']:.4f} | {r['train_loss']:.4f} | {tps} |")
    (out / "ratio_sweep.md").write_text("\n".join(lines) + "\n")
    figure, axis = plt.subplots(figsize=(6, 4))
    for r in rows:
        axis.scatter(r["tokens_per_sec_per_gpu"] or 0.0, r["val_loss"], s=40)
        axis.annotate(r["ratio"], (r["tokens_per_sec_per_gpu"] or 0.0, r["val_loss"]), textcoords="offset points",
                      xytext=(5, 5))
    axis.set_xlabel("training tokens/s per GPU")
    axis.set_ylabel("final validation loss")
    axis.set_title("attention:Mamba head ratio, equal budget")
    axis.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(out / "ratio_sweep.png", dpi=120)
    plt.close(figure)
    return {"rows": rows, "table": out / "ratio_sweep.md", "plot": out / "ratio_sweep.png"}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m recipes.ratio_sweep", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dir", default="runs/ratio_sweep", help="where the runs and the summary go")
    parser.add_argument("--devices", type=int, default=1, help="GPUs per run (torchrun processes)")
    parser.add_argument("--max-steps", type=int, default=300)
    parser.add_argument("--seq-length", type=int, default=1024)
    parser.add_argument("--global-batch-size", type=int, default=32)
    parser.add_argument("--micro-batch-size", type=int, default=8)
    parser.add_argument("--num-layers", type=int, default=8)
    parser.add_argument("--hidden-size", type=int, default=512)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--ratios", nargs="+", default=[f"{a}:{m}" for a, m in RATIOS],
                        help="attention:mamba head counts (of 8 slots), e.g. 8:0 4:4 0:8")
    parser.add_argument("--mock-data", action="store_true", help="random tokens instead of the bundled corpus")
    parser.add_argument("--summarize-only", action="store_true", help="only rebuild the table and plot")
    args = parser.parse_args(argv)
    ratios = tuple(tuple(int(x) for x in r.split(":")) for r in args.ratios)
    use_this_pythons_torchrun()
    if not args.summarize_only:
        tasks = sweep_tasks(args.dir, args.devices, args.max_steps, args.seq_length, args.global_batch_size,
                            args.micro_batch_size, args.lr, args.num_layers, args.hidden_size, ratios,
                            corpus=not args.mock_data)
        common.run_in_turn("ratio_sweep", common.unfinished(tasks, args.dir),
                           run.LocalExecutor(ntasks_per_node=args.devices, launcher="torchrun"))
    summary = summarize(args.dir, ratios)
    print((Path(args.dir) / "ratio_sweep.md").read_text())
    print(f"plot: {summary['plot']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
