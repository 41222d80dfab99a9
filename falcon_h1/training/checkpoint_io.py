"""Checkpoint directories: layout, the unfinished marker, and finding the latest good one.

    <checkpoints>/step=0000200/
        weights/     Megatron torch_dist sharded checkpoint: model (canonical HF tensor layout),
                     optimizer, LR schedule, loop progress, consumed samples
        context/     config.json (the model as a Hugging Face Falcon-H1 config), run.json
                     (step, consumed samples, parallel layout), tokenizer/ (tokenizer files)
        checksums.json  size and digest of every file above (checksums.py)
    <checkpoints>/step=0000200-unfinished    present while that save is in progress

A save creates the marker first and removes it only after every rank (and, for async saves,
every background writer) has finished, so a checkpoint interrupted at any point - killed during
the write, out of disk, node failure - is never taken for a good one. Older checkpoints are
deleted only after a newer one is complete.

A finished checkpoint whose files were changed afterwards (a flipped byte, a truncated, missing
or deleted file) is "damaged": the error names the file and the previous complete checkpoint to
resume from instead.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from pathlib import Path

from falcon_h1.training import checksums

log = logging.getLogger(__name__)

WEIGHTS_DIR = "weights"
CONTEXT_DIR = "context"
UNFINISHED_SUFFIX = "-unfinished"
_STEP_NAME = re.compile(r"^step=(\d+)$")


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used: missing, unfinished, corrupt or for another model."""


class DamagedCheckpoint(CheckpointError):
    """A checkpoint whose save finished but whose files changed since: missing, truncated or with
    other content than was written. `what` says so without the advice."""

    def __init__(self, path: Path, what: str, advice: str):
        super().__init__(f"{what}; {advice}")
        self.path = path
        self.what = what


def checkpoint_name(step: int) -> str:
    return f"step={step:07d}"


def unfinished_marker(path: str | os.PathLike) -> Path:
    path = Path(path)
    return path.with_name(path.name + UNFINISHED_SUFFIX)


def mark_unfinished(path: str | os.PathLike) -> None:
    """Create the marker durably before anything of the checkpoint is written."""
    marker = unfinished_marker(path)
    if marker.exists():
        return
    marker.parent.mkdir(parents=True, exist_ok=True)
    with open(marker, "w") as f:
        f.write("a save of this checkpoint started and has not finished\n")
        f.flush()
        os.fsync(f.fileno())
    _fsync_dir(marker.parent)


def begin_save(path: str | os.PathLike) -> None:
    """Rank 0, before a save: the marker, then an empty checkpoint directory (a directory left by
    an interrupted save of the same step is replaced; a finished one too, saying so)."""
    path = Path(path)
    if path.is_dir() and not unfinished_marker(path).exists():
        log.warning("warning: replacing checkpoint %s (this run resumed from an earlier step and has reached it "
                    "again)", path)
    mark_unfinished(path)
    shutil.rmtree(path, ignore_errors=True)
    (path / WEIGHTS_DIR).mkdir(parents=True)


def finish_save(path: str | os.PathLike) -> None:
    """Rank 0, once every rank has written its files: the checksums, then the marker removed."""
    checksums.write_manifest(path)
    mark_finished(path)


def mark_finished(path: str | os.PathLike) -> None:
    unfinished_marker(path).unlink(missing_ok=True)
    _fsync_dir(Path(path).parent)


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def is_complete(path: str | os.PathLike) -> bool:
    path = Path(path)
    return (path / WEIGHTS_DIR / "metadata.json").is_file() and not unfinished_marker(path).exists()


def checkpoint_step(path: str | os.PathLike) -> int | None:
    match = _STEP_NAME.match(Path(path).name)
    return int(match.group(1)) if match else None


def is_weights_only(path: str | os.PathLike) -> bool:
    """Saved without optimizer and loop state (e.g. the initial weights): not a point to resume from."""
    try:
        return bool(json.loads((Path(path) / CONTEXT_DIR / "run.json").read_text()).get("weights_only"))
    except (OSError, json.JSONDecodeError):
        return False


def finished_checkpoints(directory: str | os.PathLike, resumable: bool = False) -> list[Path]:
    """Checkpoints under `directory` whose save finished (no marker), oldest first, damaged or not
    (with resumable: not weights-only)."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    found = [p for p in directory.iterdir() if p.is_dir() and checkpoint_step(p) is not None
             and not unfinished_marker(p).exists() and not (resumable and is_weights_only(p))]
    return sorted(found, key=checkpoint_step)


def complete_checkpoints(directory: str | os.PathLike, resumable: bool = False) -> list[Path]:
    """Finished checkpoints under `directory` with their Megatron metadata, oldest first."""
    return [p for p in finished_checkpoints(directory, resumable) if is_complete(p)]


def latest_checkpoint(directory: str | os.PathLike, resumable: bool = False) -> Path | None:
    found = complete_checkpoints(directory, resumable)
    return found[-1] if found else None


def remove_interrupted_saves(directory: str | os.PathLike, before_step: int) -> None:
    """Delete what saves interrupted before step `before_step` left (a newer complete checkpoint
    exists, so nothing will resume from or replace them)."""
    for marker in Path(directory).glob(f"step=*{UNFINISHED_SUFFIX}"):
        checkpoint = marker.with_name(marker.name.removesuffix(UNFINISHED_SUFFIX))
        step = checkpoint_step(checkpoint)
        if step is not None and step < before_step:
            remove_checkpoint(checkpoint)


def check_loadable(path: str | os.PathLike) -> Path:
    """The checkpoint directory, or a CheckpointError saying what is wrong with it and what to do.
    Its files are checked for presence and size (cheap); `verify_checksums` reads them."""
    path = Path(path)
    if path.name == WEIGHTS_DIR:
        path = path.parent
    if not path.exists():
        raise CheckpointError(f"checkpoint {path} does not exist; give the directory of a checkpoint "
                              f"(one that holds '{WEIGHTS_DIR}/' and '{CONTEXT_DIR}/')")
    if unfinished_marker(path).exists():
        raise CheckpointError(f"checkpoint {path} is unfinished (its save was interrupted: "
                              f"{unfinished_marker(path)} exists); resume from an earlier checkpoint")
    damage = _damage(path)
    if damage is None:
        return path
    if (path / CONTEXT_DIR).is_dir() or (path / checksums.MANIFEST).is_file():
        raise damaged(path, damage)
    raise CheckpointError(f"{path} is not a complete checkpoint: {path / WEIGHTS_DIR / 'metadata.json'} "
                          f"is missing; give the directory of a checkpoint written by falcon_h1")


def _damage(path: Path) -> str | None:
    """What is missing from a finished checkpoint or has the wrong size (None: nothing), without
    reading its files."""
    try:
        files = checksums.read_manifest(path)
    except ValueError as error:
        return str(error)
    if files is None:
        if _written_with_checksums(path):
            return f"{checksums.MANIFEST} is missing"
        return None if (path / WEIGHTS_DIR / "metadata.json").is_file() else f"{WEIGHTS_DIR}/metadata.json is missing"
    problems = checksums.size_problems(path, files)
    if len(problems) > 1:
        return f"{problems[0]} (and {len(problems) - 1} more file{'s' if len(problems) > 2 else ''})"
    return problems[0] if problems else None


def _written_with_checksums(path: Path) -> bool:
    try:
        return "checksums" in json.loads((path / CONTEXT_DIR / "run.json").read_text())
    except (OSError, ValueError):
        return False


def previous_complete(path: str | os.PathLike) -> Path | None:
    """The newest checkpoint beside `path` of an earlier step that a run can resume from and whose
    files are all there."""
    path = Path(path)
    step = checkpoint_step(path)
    if step is None:
        return None
    earlier = [p for p in finished_checkpoints(path.parent, resumable=True) if checkpoint_step(p) < step]
    return next((p for p in reversed(earlier) if _damage(p) is None), None)


def damaged(path: str | os.PathLike, problem: str) -> DamagedCheckpoint:
    """The error for a damaged checkpoint: what is wrong, and the command that resumes from the
    previous complete checkpoint instead."""
    previous = previous_complete(path)
    if previous is None:
        advice = ("there is no earlier complete checkpoint beside it: restore it from a copy, or start the run "
                  "over with --no-resume (resume.resume_if_exists=false)")
    else:
        advice = (f"resume from the previous complete checkpoint with --resume-from {previous} "
                  f"(falcon-h1 and recipes: resume.resume_from_path={previous}), or add --fall-back-if-damaged "
                  "(resume.fall_back_if_damaged=true) to do that automatically")
    return DamagedCheckpoint(Path(path), f"checkpoint {path} is damaged: {problem}", advice)


def fall_back_from(error: DamagedCheckpoint, allowed: bool) -> Path:
    """The checkpoint a run resumes from instead of the damaged one: with `allowed` (AutoResume's
    fall_back_if_damaged) the previous complete one, said in a warning on rank 0; else `error`."""
    from pytorch_lightning.utilities import rank_zero_only

    previous = previous_complete(error.path) if allowed else None
    if previous is None:
        raise error
    if rank_zero_only.rank == 0:
        log.warning(f"warning: {error.what}. Resuming from {previous} instead, as fall_back_if_damaged asks; the "
                    "damaged checkpoint stays until this run saves its step again")
    return previous


def verify_checksums(path: str | os.PathLike) -> None:
    """Read every file of the checkpoint and compare it with the digest written with it; in a
    job, each rank reads a share (every rank calls this). A DamagedCheckpoint naming the files
    that differ."""
    import torch.distributed as dist

    path = Path(path)
    files = checksums.read_manifest(path)
    if files is None:
        log.warning("checkpoint %s was written without checksums (by an older falcon_h1): its content "
                    "cannot be verified", path)
        return
    distributed = dist.is_initialized()
    rank, world_size = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
    problems = checksums.digest_problems(path, files, rank, world_size)
    if distributed and world_size > 1:
        gathered = [None] * world_size
        dist.all_gather_object(gathered, problems)
        problems = [problem for share in gathered for problem in share]
    if problems:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise damaged(path, problems[0] + more)


def tokenizer_path(path: str | os.PathLike) -> Path:
    """Where a checkpoint keeps its tokenizer files (the directory may not exist)."""
    return Path(path) / CONTEXT_DIR / "tokenizer"


def write_context(path: str | os.PathLike, hf_config: dict, run_info: dict, tokenizer_dir: str | None) -> None:
    """Rank 0: what is needed to rebuild the model and its tokenizer without the training code's
    arguments (fine-tuning, export, generation)."""
    context = Path(path) / CONTEXT_DIR
    context.mkdir(parents=True, exist_ok=True)
    run_info = dict(run_info, checksums=checksums.MANIFEST)  # a checkpoint without it is damaged
    (context / "config.json").write_text(json.dumps(hf_config, indent=2, sort_keys=True))
    (context / "run.json").write_text(json.dumps(run_info, indent=2, sort_keys=True))
    if tokenizer_dir:
        shutil.copytree(tokenizer_dir, tokenizer_path(path), dirs_exist_ok=True)


def read_context(path: str | os.PathLike) -> tuple[dict, dict]:
    """(HF config dict, run info) of a checkpoint."""
    context = Path(path) / CONTEXT_DIR
    try:
        config = json.loads((context / "config.json").read_text())
        run_info = json.loads((context / "run.json").read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise CheckpointError(f"checkpoint {path}: cannot read {context}/config.json and run.json ({error})") from error
    return config, run_info


# Which tensors of a model a state dict covers: everything, the base model without its LoRA
# adapters (what a LoRA run starts from), or the adapters alone (what a LoRA run saves).
ALL, BASE, ADAPTERS = "all", "base", "adapters"


def _in_part(key: str, part: str) -> bool:
    from falcon_h1.model.lora import is_adapter_key

    return part == ALL or is_adapter_key(key) == (part == ADAPTERS)


def model_sharded_state_dict(models, part: str = ALL) -> dict:
    """The sharded state dict of a rank's model chunks: {"model": ...}, or {"model0": ..., ...}
    with virtual pipeline stages. Tensors carry canonical global keys, so the nesting does not
    tie a checkpoint to a layout. `part`: ALL, BASE or ADAPTERS."""
    def select(model):
        return {k: v for k, v in model.sharded_state_dict().items() if _in_part(k, part)}

    if len(models) == 1:
        return {"model": select(models[0])}
    return {f"model{i}": select(model) for i, model in enumerate(models)}


def last_line(error: BaseException) -> str:
    """The gist of an error: torch's CheckpointException holds each rank's whole traceback."""
    lines = str(error).strip().splitlines()
    return lines[-1].strip() if lines else type(error).__name__


def why_save_failed(path: Path, error: BaseException, previous: Path | None) -> str:
    """The cause of a failed save in words: the write error a shard writer left (Megatron's writer
    threads and processes pass on only its type), and whether the filesystem has less space left
    than the previous checkpoint took."""
    left = checksums.write_errors(path)
    cause = left[0] if left else last_line(error)
    try:
        free = shutil.disk_usage(path.parent).free
        needed = sum(f.stat().st_size for f in previous.rglob("*") if f.is_file()) if previous else 0
    except OSError:
        return cause
    if free < needed:
        cause += (f" ({path.parent} has {free / 2**20:,.0f} MiB free; the previous checkpoint took "
                  f"{needed / 2**20:,.0f} MiB)")
    return cause


def load_sharded(path: Path, template: dict, verify: bool = True) -> dict:
    """dist_checkpointing.load of `template` from checkpoint `path` (its checksums verified first,
    unless the caller has); errors naming the checkpoint."""
    from megatron.core import dist_checkpointing
    from torch.distributed.checkpoint.api import CheckpointException  # a BaseException

    if verify:
        verify_checksums(path)
    try:
        return dist_checkpointing.load(template, str(Path(path) / WEIGHTS_DIR))
    except (Exception, CheckpointException) as error:
        raise CheckpointError(
            f"cannot load checkpoint {path}: {last_line(error)}. The checkpoint is incomplete, or was "
            "written for another model; use an earlier checkpoint") from error


def apply_model_state(models, state: dict, strict: bool = True, part: str = ALL) -> None:
    """Load `state` (from load_sharded) into the chunks; for a part, every tensor of that part
    must be there and nothing else."""
    names = ["model"] if len(models) == 1 else [f"model{i}" for i in range(len(models))]
    for name, model in zip(names, models):
        if part == ALL:
            model.load_state_dict(state[name], strict=strict)
            continue
        result = model.load_state_dict(state[name], strict=False)
        missing = [k for k in result.missing_keys if _in_part(k, part) and not k.endswith("_extra_state")]
        if missing or result.unexpected_keys:
            raise CheckpointError(f"the {part} tensors do not match the model: missing {missing[:5]}, "
                                  f"unexpected {result.unexpected_keys[:5]}")


def check_same_model(path: Path, hf_config: dict) -> None:
    """A CheckpointError if the checkpoint at `path` holds a model of another shape."""
    saved, _ = read_context(path)
    keys = ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "head_dim",
            "mamba_n_heads", "mamba_d_head", "mamba_d_state", "mamba_n_groups", "intermediate_size", "vocab_size")
    different = {k: (saved.get(k), hf_config.get(k)) for k in keys if saved.get(k) != hf_config.get(k)}
    if different:
        detail = ", ".join(f"{k}: checkpoint {a} vs model {b}" for k, (a, b) in different.items())
        raise CheckpointError(f"checkpoint {path} holds another model shape ({detail}); configure the model "
                              "like the checkpoint or pick another checkpoint")


def lora_of(path: str | os.PathLike) -> dict | None:
    """The LoRA scheme of an adapter-only checkpoint (its run.json "peft"), None for a full one."""
    return read_context(path)[1].get("peft")


def base_checkpoint_of(path: str | os.PathLike) -> Path:
    """The checkpoint an adapter-only checkpoint's adapters were trained on."""
    _, run_info = read_context(path)
    base = run_info.get("base_checkpoint")
    if not base:
        raise CheckpointError(f"{path} holds LoRA adapters but its context/run.json names no base_checkpoint")
    try:
        return check_loadable(base)
    except CheckpointError as error:
        raise CheckpointError(f"the base checkpoint of the LoRA adapters in {path} cannot be used: {error}. "
                              "Put it back at that path (it is named in context/run.json)") from error


def load_model_weights(models, path: str | os.PathLike, strict: bool = True) -> Path:
    """Load a checkpoint's weights into this rank's model chunks (FalconH1Model), at whatever
    TP/PP layout they were built with. Every rank of the job calls it.

    With LoRA adapters on the chunks (model/lora.py): a full checkpoint initializes the base
    weights (the adapters keep their initialization); an adapter-only checkpoint loads its base
    checkpoint, then the adapters. An adapter-only checkpoint into chunks without adapters is an
    error: apply its LoRA first (or merge it into a full checkpoint with `merge-lora`)."""
    from falcon_h1.model.config import config_to_hf
    from falcon_h1.model.lora import has_adapters

    path = check_loadable(path)
    check_same_model(path, config_to_hf(models[0].config))
    with_adapters = has_adapters(models[0])
    if lora_of(path) is not None:
        if not with_adapters:
            raise CheckpointError(
                f"{path} holds LoRA adapters only; apply its LoRA to the model before loading "
                "(falcon_h1.model.lora.apply_lora) or merge it into a full checkpoint (`falcon-h1 merge-lora`)")
        load_model_weights(models, base_checkpoint_of(path), strict)
        part = ADAPTERS
    else:
        part = BASE if with_adapters else ALL
    loaded = load_sharded(path, {"state_dict": model_sharded_state_dict(models, part)})
    apply_model_state(models, loaded["state_dict"], strict, part)
    return path


def checkpoint_model_config(path: str | os.PathLike, **overrides):
    """The FalconH1Config a checkpoint was written with (parallel sizes etc. from `overrides`)."""
    from falcon_h1.model.config import config_from_hf

    hf_config, _ = read_context(check_loadable(path))
    return config_from_hf(hf_config, **overrides)


def remove_checkpoint(path: str | os.PathLike) -> None:
    """Delete a checkpoint; the marker goes first so a half-deleted one never looks complete."""
    path = Path(path)
    mark_unfinished(path)
    shutil.rmtree(path, ignore_errors=True)
    if not path.exists():  # what could not be deleted keeps its marker
        mark_finished(path)


def save_model(models, path: str | os.PathLike, hf_config: dict, run_info: dict, tokenizer_dir: str | None = None,
               part: str = ALL) -> Path:
    """Write the chunks' weights (or one part of them) as a weights-only checkpoint at `path`,
    under the unfinished marker, outside a training run (merge, tests). Every rank calls it."""
    import torch.distributed as dist
    from megatron.core import dist_checkpointing

    path = Path(path)
    rank0 = not dist.is_initialized() or dist.get_rank() == 0
    if rank0:
        begin_save(path)
        write_context(path, hf_config, dict(run_info, weights_only=True), tokenizer_dir)
    if dist.is_initialized():
        dist.barrier()
    checksums.hash_shards_as_written()
    dist_checkpointing.save({"state_dict": model_sharded_state_dict(models, part)}, str(path / WEIGHTS_DIR))
    if dist.is_initialized():
        dist.barrier()
    if rank0:
        finish_save(path)
    return path
