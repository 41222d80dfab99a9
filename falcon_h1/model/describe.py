"""Print what the model modules compute for the presets, without building a model:

    python -m falcon_h1.model.describe parameters        # the parameter table of docs/models.md
    python -m falcon_h1.model.describe layout PRESET TP  # each TP rank's fused-projection layout

A module of its own, above presets.py: layout.py and param_count.py stay below the config and
the presets that are made from them.
"""

from __future__ import annotations

import argparse

from falcon_h1.model.layout import mixer_layout
from falcon_h1.model.param_count import parameter_count
from falcon_h1.model.presets import PRESETS, preset_config


def print_parameters() -> None:
    """The parameter table of the released shapes (docs/models.md)."""
    print("| preset | total | embedding | attention | Mamba | MLP | lm_head |")
    print("|---|---|---|---|---|---|---|")
    for name in PRESETS:
        c = parameter_count(preset_config(name))
        cells = [c[k] / 1e6 for k in ("total", "embedding", "attention", "ssm", "mlp", "lm_head")]
        print(f"| {name} | " + " | ".join(f"{v:,.1f}M" for v in cells) + " |")


def print_layout(preset: str, tp: int) -> None:
    """Each rank's fused-projection layout of `preset` at TP size `tp` (layout.py)."""
    config = preset_config(preset, tensor_model_parallel_size=tp)
    print(f"{preset} at TP={tp}: in_proj rows per rank as canonical[offset:offset+rows] "
          f"(xN = held by N ranks); out_proj columns")
    for rank in range(tp):
        layout = mixer_layout(config, tp, rank)
        rows = "  ".join(f"{s.name}[{s.offset}:{s.offset + s.rows}]" + (f"x{s.replicas}" if s.replicas > 1 else "")
                         for s in layout.in_proj)
        heads = layout.attention_heads
        shard = rank // layout.attention_replicas
        dims = layout.attention_out_dims
        cols = (f"attn heads {shard * heads}-{shard * heads + heads - 1} dims {dims.start}:{dims.stop} | "
                f"ssm [{layout.mamba_head_offset * layout.mamba_head_dim}:"
                f"{(layout.mamba_head_offset + layout.mamba_heads) * layout.mamba_head_dim}]")
        print(f"rank {rank}: {rows}\n        out_proj: {cols}")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m falcon_h1.model.describe", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("parameters", help=print_parameters.__doc__)
    layout = commands.add_parser("layout", help=print_layout.__doc__)
    layout.add_argument("preset")
    layout.add_argument("tp", type=int)
    args = parser.parse_args(argv)
    if args.command == "parameters":
        print_parameters()
    else:
        print_layout(args.preset, args.tp)


if __name__ == "__main__":
    main()
