"""Convergence on a real corpus: the Falcon-H1 hybrid against an attention-only and a Mamba-only
model of the same size, trained on the same tokens of a code corpus, validated on held-out packages.

The hybrid is Falcon-H1-0.5B's layer - 8 attention heads and 24 Mamba-2 heads of 64 channels, MLP
2048, so attention:SSM:MLP channels 1:3:4 as released - at half its depth (18 layers), with the
corpus's 32768-token vocabulary: 294M parameters. The attention-only model makes all 16 heads
attention heads and widens its MLP, the Mamba-only model has 32 Mamba-2 heads (expansion 2) and a
narrower MLP, each within 1% of the hybrid's parameter count (presets.attention_only_fields,
presets.mamba_only_fields). All else is equal: the data and its order, 2048-token sequences, 64 per
step, AdamW at peak LR 6e-4, WSD (10% warm-up, exponential decay over the last 10%), 250 steps
(32.8M tokens), validation every 25 steps on 8 batches of the held-out packages.

    python -m falcon_h1.data.code_corpus --root SITE_PACKAGES --output data/site_packages --workers 16
    python -m recipes.convergence --corpus data/site_packages --dir runs/convergence

At the end --dir holds convergence.md (tokens/s, final validation loss, validation loss at equal
training time), convergence.json and convergence.png (validation loss against tokens and against
training time). One run alone: `pretrain_recipe(variant="mamba", corpus=...)`, or
`falcon-h1 pretrain --factory "convergence(variant=mamba,corpus=data/site_packages)"`.
"""

import csv
import dataclasses
import json
from pathlib import Path

import nemo_run as run
import torch

from falcon_h1.api import pretrain
from falcon_h1.data.code_corpus import code_corpus_data
from falcon_h1.model.config import FalconH1Config
from falcon_h1.model.param_count import parameter_count
from falcon_h1.model.presets import attention_only_fields, mamba_only_fields, preset_fields
from recipes import common

NAME = "convergence"
BASE = "0.5b"
# The code corpus's tokenizer (code_corpus --vocab-size): one <|endoftext|>, id 0, is bos, eos and pad.
VOCAB = dict(vocab_size=32768, pad_token_id=0, bos_token_id=0, eos_token_id=0)
VARIANTS = {
    "hybrid": ("Falcon-H1 hybrid (8 attention + 24 Mamba-2 heads)", preset_fields),
    "attention": ("attention only (16 heads)", attention_only_fields),
    "mamba": ("Mamba-2 only (32 heads)", mamba_only_fields),
}
SIZE = common.Size(preset=BASE, seq_length=2048, global_batch_size=64, micro_batch_size=16, num_gpus_per_node=1,
                   lr=6e-4, warmup_fraction=0.1, max_steps=250, val_check_interval=25, limit_val_batches=8,
                   log_every_n_steps=10, checkpoint_every_n_steps=250, keep_last_k=1)
NUM_LAYERS = 18


def variant_fields(variant: str, num_layers: int = NUM_LAYERS, **overrides) -> dict:
    """The FalconH1Config fields of one variant: 0.5B's layer at `num_layers`, its mixer per `variant`."""
    if variant not in VARIANTS:
        raise ValueError(f"variant={variant!r}: choose one of {list(VARIANTS)}")
    return VARIANTS[variant][1](BASE, num_layers=num_layers, **VOCAB, **overrides)


@run.cli.factory(target=pretrain, name=NAME)
def pretrain_recipe(variant: str = "hybrid", corpus: str = "data/site_packages", dir: str | None = None,
                    max_steps: int = SIZE.max_steps, num_layers: int = NUM_LAYERS, seq_length: int = SIZE.seq_length,
                    global_batch_size: int = SIZE.global_batch_size, micro_batch_size: int = SIZE.micro_batch_size,
                    num_gpus_per_node: int = SIZE.num_gpus_per_node, cuda_graphs: bool | None = None) -> run.Partial:
    """One run of the convergence comparison: `variant` (hybrid, attention or mamba) trained from
    scratch on the code corpus in `corpus` (python -m falcon_h1.data.code_corpus). cuda_graphs None:
    per-layer CUDA graphs when the machine making the recipe has a GPU."""
    size = dataclasses.replace(SIZE, max_steps=max_steps, seq_length=seq_length, global_batch_size=global_batch_size,
                               micro_batch_size=micro_batch_size, num_gpus_per_node=num_gpus_per_node,
                               checkpoint_every_n_steps=max_steps)
    graphs = torch.cuda.is_available() if cuda_graphs is None else cuda_graphs
    config = run.Config(FalconH1Config, **variant_fields(variant, num_layers,
                                                         **({"cuda_graph_impl": "local"} if graphs else {})))
    data = run.Config(code_corpus_data, corpus=corpus, **common.sizes(size))
    recipe = common.pretrain_task(common.lightning_module(config, size.lr, size.warmup_fraction),
                                  common.trainer_config(size, dir or f"runs/{NAME}/{variant}"), data)
    recipe.resume.resume_if_exists = False  # every run starts from the same initialization
    return recipe


def read_run(dir: Path) -> dict:
    """One finished run: its result.json and its loss.csv as (step, tokens, train_seconds, loss) points."""
    result = common.run_result(dir, dir.name)  # written after loss.csv: both are there
    points = {"train": [], "val": []}
    with (dir / "loss.csv").open(newline="") as handle:
        for row in csv.DictReader(handle):
            points[row["split"]].append((int(row["step"]), int(row["tokens"] or 0),
                                         float(row["train_seconds"] or "nan"), float(row["loss"])))
    return {"result": result, "train": sorted(points["train"]),
            "val": sorted(points["val"])}


def loss_at(points: list[tuple], seconds: float) -> float:
    """The validation loss at `seconds` of training, linear between the validations around it."""
    for (_, _, t0, l0), (_, _, t1, l1) in zip(points, points[1:]):
        if t0 <= seconds <= t1:
            return l0 if t1 == t0 else l0 + (l1 - l0) * (seconds - t0) / (t1 - t0)
    raise ValueError(f"{seconds:.1f} s is outside the run's validations")


def spikes(train: list[tuple], window: int = 10) -> dict:
    """The training loss's largest spike (a step's loss above the mean of the `window` steps before
    it) and whether the run ends at its lowest: the last `window` steps' mean below every earlier
    window's (batches differ, so single steps are noisy; windows are not)."""
    losses = [loss for *_, loss in train]
    means = [sum(losses[i - window:i]) / window for i in range(window, len(losses) + 1)]
    largest = max((losses[i] - means[i - window] for i in range(window, len(losses))), default=0.0)
    return {"largest_spike": largest, "ends_lowest": means[-1] <= min(means) if means else None}


def summarize(dir: str, variants=tuple(VARIANTS), num_layers: int = NUM_LAYERS) -> dict:
    """Read each run under `dir`; write convergence.json, .md and .png there."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    runs = {variant: read_run(Path(dir) / variant) for variant in variants}
    equal_time = min(run_["val"][-1][2] for run_ in runs.values())  # the fastest run's training time
    rows = []
    for variant, run_ in runs.items():
        throughput = run_["result"].get("throughput") or {}
        step, tokens, seconds, final = run_["val"][-1]
        rows.append({"variant": variant, "model": VARIANTS[variant][0], "steps": step, "tokens": tokens,
                     "parameters": parameter_count(FalconH1Config(**variant_fields(variant, num_layers)))["total"],
                     "tokens_per_sec_per_gpu": throughput.get("throughput/tokens_per_sec_per_gpu"),
                     "train_seconds": seconds, "final_val_loss": final,
                     "val_loss_at_equal_time": loss_at(run_["val"], equal_time),
                     "final_train_loss": run_["result"]["train_loss"], **spikes(run_["train"])})
    out = Path(dir)
    (out / "convergence.json").write_text(json.dumps({"equal_time_s": equal_time, "rows": rows}, indent=2) + "\n")
    lines = ["| model | parameters | tokens | tokens/s | training time | final validation loss | "
             f"validation loss at {equal_time:.0f} s | largest training-loss spike |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        tps = f"{r['tokens_per_sec_per_gpu']:,.0f}" if r["tokens_per_sec_per_gpu"] else "-"
        not_lowest = " (does not end at its lowest)" if r["ends_lowest"] is False else ""
        lines.append(f"| {r['model']} | {r['parameters'] / 1e6:.1f}M | {r['tokens'] / 1e6:.1f}M | {tps} | "
                     f"{r['train_seconds']:.0f} s | {r['final_val_loss']:.4f} | {r['val_loss_at_equal_time']:.4f} | "
                     f"{r['largest_spike']:+.3f}{not_lowest} |")
    (out / "convergence.md").write_text("\n".join(lines) + "\n")

    figure = Figure(figsize=(11, 4.2), dpi=120)
    FigureCanvasAgg(figure)
    by_tokens, by_time = figure.subplots(1, 2, sharey=True)
    for (variant, run_), color in zip(runs.items(), ("C0", "C1", "C2")):
        val = [p for p in run_["val"] if p[0] > 0]  # step 0: every model starts near ln(vocab)
        label = VARIANTS[variant][0]
        by_tokens.plot([p[1] / 1e6 for p in run_["train"]], [p[3] for p in run_["train"]], color=color, alpha=0.25,
                       linewidth=0.7)
        by_tokens.plot([p[1] / 1e6 for p in val], [p[3] for p in val], "o-", color=color, markersize=3, label=label)
        by_time.plot([p[2] for p in val], [p[3] for p in val], "o-", color=color, markersize=3, label=label)
    highest = max(p[3] for run_ in runs.values() for p in run_["val"] if p[0] > 0)
    lowest = min(p[3] for run_ in runs.values() for p in run_["val"])
    by_tokens.set_ylim(lowest - 0.1, highest + 0.2)
    by_tokens.set_xlabel("training tokens (M); faint: training loss")
    by_tokens.set_ylabel("validation loss (held-out packages)")
    by_time.set_xlabel("training time (s, steps after the first two)")
    by_time.axvline(equal_time, color="grey", linewidth=0.7, linestyle="--")
    for axes in (by_tokens, by_time):
        axes.grid(alpha=0.3)
    by_time.legend(loc="upper right")
    figure.suptitle("Same size, same tokens: hybrid vs attention-only vs Mamba-only")
    figure.tight_layout()
    figure.savefig(out / "convergence.png")
    return {"rows": rows, "equal_time_s": equal_time, "table": out / "convergence.md", "plot": out / "convergence.png"}
