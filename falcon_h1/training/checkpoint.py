"""When checkpoints are written and which one a run starts from.

`MegatronCheckpoint` saves every N steps and at the end of training (through the strategy's
sharded, marker-protected save) and keeps the last k complete ones. `AutoResume` picks the
checkpoint a run resumes from: the latest complete one in the run's checkpoint directory, or a
given path; or it names a checkpoint whose weights only initialize the model (fine-tuning).
"""

import logging
from dataclasses import dataclass
from pathlib import Path

import pytorch_lightning as pl

from falcon_h1.training import checkpoint_io

log = logging.getLogger(__name__)


class MegatronCheckpoint(pl.Callback):
    """Args:
        dirpath: directory of the run's checkpoints (step=NNNNNNN/ each).
        every_n_train_steps: save after every N optimizer steps (None: only at the end).
        save_last: save when training ends (if that step is not saved already).
        keep_last_k: complete checkpoints to keep (None: all); older ones are deleted only after
            a newer one is complete.
        save_at_start: also save the initial weights before the first step (to start other
            runs, e.g. other parallel layouts, from the same weights).
    """

    def __init__(self, dirpath: str, every_n_train_steps: int | None = None, save_last: bool = True,
                 keep_last_k: int | None = 2, save_at_start: bool = False):
        if every_n_train_steps is not None and every_n_train_steps < 1:
            raise ValueError(f"every_n_train_steps={every_n_train_steps} must be >= 1 (or None)")
        if keep_last_k is not None and keep_last_k < 1:
            raise ValueError(f"keep_last_k={keep_last_k} must be >= 1 (or None to keep all)")
        self.dirpath = Path(dirpath)
        self.every_n_train_steps = every_n_train_steps
        self.save_last = save_last
        self.keep_last_k = keep_last_k
        self.save_at_start = save_at_start
        self.last_saved_step: int | None = None
        self.last_checkpoint: Path | None = None

    def on_train_start(self, trainer, pl_module) -> None:
        if self.save_at_start and trainer.global_step == 0:
            self.save(trainer, weights_only=True)  # there is no optimizer state yet

    def on_load_checkpoint(self, trainer, pl_module, checkpoint) -> None:
        """Lightning has restored the checkpoint (model, optimizer, loops, data position): say so
        before the first step. It is `trainer.ckpt_path` unless the strategy fell back from a
        damaged one."""
        if trainer.is_global_zero:
            print(resumed_line(checkpoint.get("checkpoint_path", trainer.ckpt_path)), flush=True)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        trainer.strategy.finalize_pending_saves()
        step = trainer.global_step
        if self.every_n_train_steps and step % self.every_n_train_steps == 0 and step != self.last_saved_step:
            self.save(trainer)

    def on_train_end(self, trainer, pl_module) -> None:
        if self.save_last and trainer.global_step != self.last_saved_step:
            self.save(trainer)
        trainer.strategy.finalize_pending_saves(blocking=True)

    def save(self, trainer, weights_only: bool = False) -> Path:
        path = self.dirpath / checkpoint_io.checkpoint_name(trainer.global_step)
        trainer.save_checkpoint(path, weights_only=weights_only)
        self.last_saved_step = trainer.global_step
        self.last_checkpoint = path
        return path

    def on_checkpoint_complete(self, path: Path) -> None:
        """Called by the strategy on every rank once `path` is complete."""
        if pl.utilities.rank_zero_only.rank == 0:
            log.info("checkpoint saved: %s", path)
            if self.keep_last_k is not None:
                for old in checkpoint_io.complete_checkpoints(self.dirpath)[:-self.keep_last_k]:
                    checkpoint_io.remove_checkpoint(old)
            checkpoint_io.remove_interrupted_saves(self.dirpath, before_step=checkpoint_io.checkpoint_step(path))


def resumed_line(path: str | Path) -> str:
    """`resumed from PATH (step N, consumed_samples M)`, from the checkpoint's context/run.json."""
    _, run_info = checkpoint_io.read_context(path)
    return (f"resumed from {Path(path).absolute()} (step {run_info.get('global_step')}, "
            f"consumed_samples {run_info.get('consumed_samples')})")


@dataclass
class AutoResume:
    """Which checkpoint a run starts from.

    resume_if_exists: continue from the latest complete checkpoint in the run's checkpoint
        directory, if there is one (unfinished ones are skipped).
    resume_from_path: continue from this checkpoint (model, optimizer, schedule, data position).
    restore_weights_from: initialize only the model weights from this checkpoint and start a new
        run (fine-tuning); cannot be combined with resuming.
    fall_back_if_damaged: if the latest checkpoint is damaged (a file missing, truncated or
        changed since it was written), resume from the previous complete one with a warning; by
        default the run stops, naming the file and that checkpoint.
    """

    resume_if_exists: bool = True
    resume_from_path: str | None = None
    restore_weights_from: str | None = None
    fall_back_if_damaged: bool = False

    def checkpoint_to_resume(self, checkpoint_dir: str | Path | None) -> str | None:
        """The checkpoint to continue from; `checkpoint_dir` is the run's (None: the run saves none).
        Its files are checked for presence and size here, their content when it is loaded."""
        if self.resume_from_path:
            return str(checkpoint_io.check_loadable(self.resume_from_path))
        if not self.resume_if_exists or checkpoint_dir is None:
            return None
        finished = checkpoint_io.finished_checkpoints(checkpoint_dir, resumable=True)
        chosen = None
        if finished:
            try:
                chosen = checkpoint_io.check_loadable(finished[-1])
            except checkpoint_io.DamagedCheckpoint as error:
                chosen = checkpoint_io.fall_back_from(error, self.fall_back_if_damaged)
        chosen_step = checkpoint_io.checkpoint_step(chosen) if chosen else -1
        for marker in sorted(Path(checkpoint_dir).glob(f"step=*{checkpoint_io.UNFINISHED_SUFFIX}")):
            step = checkpoint_io.checkpoint_step(marker.name.removesuffix(checkpoint_io.UNFINISHED_SUFFIX))
            if pl.utilities.rank_zero_only.rank == 0 and step is not None and step > chosen_step:
                log.warning("skipping unfinished checkpoint %s (its save was interrupted)", marker)
        return str(chosen) if chosen else None

    def validate(self) -> None:
        if self.restore_weights_from and self.resume_from_path:
            raise ValueError("AutoResume: give either resume_from_path (continue a run) or restore_weights_from "
                             "(start a new run from its weights), not both")
        if self.restore_weights_from:
            checkpoint_io.check_loadable(self.restore_weights_from)
