"""Convert between Hugging Face Falcon-H1 directories and falcon_h1 checkpoints.

    python -m falcon_h1.convert import HF_DIR CHECKPOINT_DIR
    python -m falcon_h1.convert export CHECKPOINT_DIR HF_DIR
    python -m falcon_h1.convert merge-lora ADAPTER_CHECKPOINT_DIR CHECKPOINT_DIR
"""

from __future__ import annotations

import argparse
import sys
import warnings

DTYPES = ("bfloat16", "float16", "float32")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m falcon_h1.convert",
        description="Convert Falcon-H1 weights between Hugging Face format and falcon_h1 checkpoints. "
                    "Both directions stream one tensor at a time and write the output under a temporary "
                    "name, renamed only when complete.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="{import,export,merge-lora}")

    imp = commands.add_parser(
        "import", help="Hugging Face directory -> falcon_h1 checkpoint",
        description="Convert a local Hugging Face Falcon-H1 directory (config.json, safetensors, tokenizer "
                    "files; e.g. from `huggingface-cli download tiiuae/Falcon-H1-1.5B-Base --local-dir DIR`) "
                    "into a weights-only falcon_h1 checkpoint that loads at any TP/PP/CP layout. A run starts "
                    "from it with AutoResume(restore_weights_from=CHECKPOINT) (docs/conversion.md).")
    imp.add_argument("hf_dir", help="the Hugging Face model directory")
    imp.add_argument("output", help="the checkpoint directory to create")
    imp.add_argument("--dtype", choices=DTYPES, help="dtype of the stored weights (default: as in the HF files)")

    exp = commands.add_parser(
        "export", help="falcon_h1 checkpoint -> Hugging Face directory",
        description="Write a falcon_h1 checkpoint (from any parallel layout) as a Hugging Face Falcon-H1 "
                    "directory that FalconH1ForCausalLM.from_pretrained, vLLM and other tools load: "
                    "config.json, safetensors shards with their index, and the checkpoint's tokenizer files.")
    exp.add_argument("checkpoint", help="a checkpoint directory (holding weights/ and context/), "
                                        "e.g. RUN/checkpoints/step=0001000")
    exp.add_argument("output", help="the Hugging Face directory to create")
    exp.add_argument("--dtype", choices=DTYPES, help="dtype of the exported tensors (default: as stored)")
    exp.add_argument("--max-shard-size", default="5GB", help="largest safetensors shard, e.g. 5GB, 500MB (default 5GB)")

    merge = commands.add_parser(
        "merge-lora", help="LoRA adapter checkpoint -> full checkpoint",
        description="Fold the LoRA adapters of a LoRA run's checkpoint into the base checkpoint they were "
                    "trained on (named in its context/run.json) and write a full weights-only checkpoint. "
                    "`export` does this by itself when given adapters; merge to keep the merged model.")
    merge.add_argument("checkpoint", help="an adapter checkpoint of a LoRA run, e.g. RUN/checkpoints/step=0000500")
    merge.add_argument("output", help="the checkpoint directory to create")
    merge.add_argument("--dtype", choices=DTYPES, help="dtype of the stored weights (default: the base's)")

    for sub in (imp, exp, merge):
        sub.add_argument("--overwrite", action="store_true", help="replace the output directory if it exists")
        sub.add_argument("--quiet", action="store_true", help="no progress lines")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    warnings.filterwarnings("ignore")
    import torch

    from falcon_h1.convert.hf_export import export_hf_checkpoint
    from falcon_h1.convert.hf_import import import_hf_checkpoint
    from falcon_h1.convert.merge_lora import merge_lora_checkpoint
    from falcon_h1.convert.safetensors_io import HFCheckpointError
    from falcon_h1.training.checkpoint_io import CheckpointError

    dtype = getattr(torch, args.dtype) if args.dtype else None
    try:
        if args.command == "import":
            path = import_hf_checkpoint(args.hf_dir, args.output, dtype=dtype, overwrite=args.overwrite,
                                        progress=not args.quiet)
            print(f"checkpoint written to {path} (weights only; start a run from it with "
                  f"AutoResume(restore_weights_from={str(path)!r}))")
        elif args.command == "merge-lora":
            path = merge_lora_checkpoint(args.checkpoint, args.output, overwrite=args.overwrite, dtype=dtype)
            print(f"merged checkpoint written to {path}")
        else:
            path = export_hf_checkpoint(args.checkpoint, args.output, dtype=dtype, max_shard_size=args.max_shard_size,
                                        overwrite=args.overwrite, progress=not args.quiet)
            print(f"Hugging Face model written to {path}; load it with "
                  f"FalconH1ForCausalLM.from_pretrained({str(path)!r})")
    except (HFCheckpointError, CheckpointError, FileExistsError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
