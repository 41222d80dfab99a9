"""Checkpoints prove their integrity: every file's checksum is written with it, a damaged checkpoint
is named with the file and the command that resumes from the previous one (or the run falls back
to it, warning), and a save that fails leaves the previous checkpoint as the resume point.

Runs are real: the main job (`python -m falcon_h1.train`, tiny preset with 2 layers, CPU), with
its output read as a user reads it.
"""

import os
import re
import resource
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from falcon_h1.training import checkpoint_io, checksums
from tests.conftest import REPO

SMALL = ["--preset", "tiny", "--num-layers", "2", "--seq-length", "64", "--global-batch-size", "8",
         "--micro-batch-size", "4", "--val-every", "2", "--val-batches", "1", "--checkpoint-every", "2",
         "--keep-last", "3"]
SHARD = "weights/__0_0.distcp"


def train(log_dir: Path, *args: str, max_steps: int = 6, file_size_limit: int | None = None):
    """The main job as a user runs it; with `file_size_limit`, no file it writes can grow past it."""
    def limit_file_size():
        resource.setrlimit(resource.RLIMIT_FSIZE, (file_size_limit, resource.RLIM_INFINITY))

    return subprocess.run([sys.executable, "-m", "falcon_h1.train", *SMALL, "--max-steps", str(max_steps),
                           "--log-dir", str(log_dir), *args], capture_output=True, text=True, timeout=300,
                          cwd=REPO, env=dict(os.environ, OMP_NUM_THREADS="1"),
                          preexec_fn=limit_file_size if file_size_limit else None)


def assert_one_line_error(proc, *expected: str) -> str:
    """A failed run's error: non-zero exit, one line, no traceback, naming what is expected."""
    assert proc.returncode != 0, proc.stdout[-2000:]
    assert "Traceback" not in proc.stderr + proc.stdout, proc.stderr[-4000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, proc.stderr[-4000:]
    for text in expected:
        assert text in errors[0], errors[0]
    return errors[0]


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    """A run with complete checkpoints at steps 2 and 4."""
    log_dir = tmp_path_factory.mktemp("integrity") / "run"
    proc = train(log_dir, max_steps=4)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return log_dir


def copy_of(run: Path, tmp_path: Path) -> tuple[Path, Path, Path]:
    """A copy of the run: (its directory, step 2, step 4)."""
    log_dir = shutil.copytree(run, tmp_path / "run")
    checkpoints = log_dir / "checkpoints"
    return log_dir, checkpoints / "step=0000002", checkpoints / "step=0000004"


def flip_bytes(path: Path, offset: int = 1 << 20, count: int = 4096) -> None:
    """Overwrite bytes in the middle of a file, keeping its size (what a bad disk or a stray write does)."""
    with open(path, "r+b") as file:
        file.seek(offset)
        file.write(b"\xff" * count)


def test_every_file_of_a_checkpoint_has_its_checksum(run):
    checkpoint = run / "checkpoints" / "step=0000004"
    files = checksums.read_manifest(checkpoint)
    on_disk = {p.relative_to(checkpoint).as_posix() for p in checkpoint.rglob("*") if p.is_file()}
    assert set(files) == on_disk - {checksums.MANIFEST}
    assert {SHARD, "weights/metadata.json", "weights/.metadata", "context/run.json"} <= set(files)
    for name, entry in files.items():
        assert entry["size"] == (checkpoint / name).stat().st_size
        assert entry["digest"] == checksums.file_digest(checkpoint / name), name


def test_the_shards_are_hashed_as_they_are_written(tmp_path, monkeypatch):
    """Megatron's writer hands every shard byte to the digest on its way to disk: making the
    manifest reads no shard back."""
    import torch

    from falcon_h1.single_process import single_process_megatron
    from falcon_h1.model.config import config_to_hf
    from falcon_h1.model.model import FalconH1Model
    from falcon_h1.model.presets import preset_config

    config = preset_config("tiny", num_layers=1, use_cpu_initialization=True, kernel_backend="torch")
    read_back = []
    monkeypatch.setattr(checksums, "file_digest", lambda path: read_back.append(Path(path).name) or "read back")
    with single_process_megatron():
        torch.manual_seed(0)
        path = checkpoint_io.save_model([FalconH1Model(config)], tmp_path / "step=0000001", config_to_hf(config), {})
    files = checksums.read_manifest(path)
    shards = [name for name in files if name.endswith(".distcp")]
    assert shards and not [name for name in read_back if name.endswith(".distcp")]
    monkeypatch.undo()
    for name in shards:
        assert files[name]["digest"] == checksums.file_digest(path / name)
    assert not list(path.rglob("*.xxh3"))  # the writer's per-shard digests are folded into the manifest


def test_flipped_bytes_stop_the_resume_naming_the_file_and_the_command_that_resumes(run, tmp_path):
    log_dir, step2, step4 = copy_of(run, tmp_path)
    flip_bytes(step4 / SHARD)
    proc = train(log_dir)
    error = assert_one_line_error(proc, f"checkpoint {step4} is damaged: {SHARD} does not match the checksum",
                                  f"--resume-from {step2}")
    assert "step 5/" not in proc.stdout

    # The command the error gives, typed as written, resumes from step 2.
    flag = re.search(r"--resume-from (\S+)", error).group(1)
    proc = train(log_dir, "--resume-from", flag)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert f"resumed from {step2} (step 2, consumed_samples 16)" in proc.stdout


@pytest.mark.parametrize("damage, named", [
    (lambda step4: flip_bytes(step4 / SHARD), f"{SHARD} does not match"),  # found when loading
    (lambda step4: os.truncate(step4 / SHARD, 1000), f"{SHARD} has 1,000 bytes"),  # found before any work
], ids=["flipped", "truncated"])
def test_fall_back_if_damaged_resumes_from_the_previous_checkpoint_warning(run, tmp_path, damage, named):
    log_dir, step2, step4 = copy_of(run, tmp_path)
    damage(step4)
    proc = train(log_dir, "--fall-back-if-damaged")
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert f"warning: checkpoint {step4} is damaged: {named}" in proc.stderr
    assert f"Resuming from {step2} instead" in proc.stderr
    assert f"resumed from {step2} (step 2, consumed_samples 16)" in proc.stdout
    # Step 4 was trained again and its save replaced the damaged checkpoint, saying so.
    assert f"warning: replacing checkpoint {step4}" in proc.stderr
    checkpoint_io.verify_checksums(step4)


@pytest.mark.parametrize("damage, named", [
    (lambda step4: (step4 / "weights" / "metadata.json").unlink(), "weights/metadata.json is missing"),
    (lambda step4: os.truncate(step4 / SHARD, 1000), f"{SHARD} has 1,000 bytes"),
    (lambda step4: (step4 / SHARD).unlink(), f"{SHARD} is missing"),
], ids=["metadata.json-removed", "shard-truncated", "shard-deleted"])
def test_a_missing_or_truncated_file_is_named_before_any_work(run, tmp_path, damage, named):
    log_dir, step2, step4 = copy_of(run, tmp_path)
    damage(step4)
    proc = train(log_dir)
    assert_one_line_error(proc, f"checkpoint {step4} is damaged: {named}", f"--resume-from {step2}",
                          "--fall-back-if-damaged")
    assert "sanity check" not in proc.stdout  # stopped before the model ran
    assert step4.is_dir()  # nothing overwritten


def test_keep_last_removes_interrupted_saves_older_than_the_newest_checkpoint(run, tmp_path):
    log_dir, step2, step4 = copy_of(run, tmp_path)
    checkpoints = log_dir / "checkpoints"
    for step in (3, 7):  # what a save killed at step 3 or at step 7 (a later, crashed run) leaves
        (checkpoints / f"step={step:07d}" / "weights").mkdir(parents=True)
        (checkpoints / f"step={step:07d}{checkpoint_io.UNFINISHED_SUFFIX}").write_text("")
    proc = train(log_dir)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "skipping unfinished checkpoint" in proc.stderr and "step=0000003" not in proc.stderr
    assert sorted(p.name for p in checkpoints.iterdir()) == [  # keep-last 3; step 7 is newer than step 6
        "step=0000002", "step=0000004", "step=0000006", "step=0000007", "step=0000007-unfinished"]


def mount_tmpfs(directory: Path, size: int) -> bool:
    directory.mkdir(parents=True, exist_ok=True)
    return subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(directory)],
                          capture_output=True).returncode == 0


def test_a_save_that_runs_out_of_space_keeps_the_previous_checkpoint_as_the_resume_point(run, tmp_path):
    """On a filesystem with room for one more checkpoint but not two (a small tmpfs where the machine
    lets the test mount one; else a file-size limit, which fails the write the same way)."""
    checkpoint_bytes = sum(f.stat().st_size for f in (run / "checkpoints" / "step=0000002").rglob("*"))
    log_dir = tmp_path / "run"
    mounted = mount_tmpfs(log_dir, size=int(1.5 * checkpoint_bytes) + (1 << 20))
    try:
        shutil.copytree(run / "checkpoints" / "step=0000002", log_dir / "checkpoints" / "step=0000002")
        step2, step4 = log_dir / "checkpoints" / "step=0000002", log_dir / "checkpoints" / "step=0000004"
        proc = train(log_dir, max_steps=4, file_size_limit=None if mounted else checkpoint_bytes // 2)
        assert_one_line_error(proc, f"saving checkpoint {step4} failed",
                              f"{step2} stays the checkpoint to resume from")
        if mounted:
            assert "No space left on device" in proc.stderr.splitlines()[-1]
        assert sorted(p.name for p in step2.parent.iterdir()) == ["step=0000002"]  # nothing that looks complete
        checkpoint_io.verify_checksums(step2)

        if mounted:  # room again: the same command resumes from step 2
            subprocess.run(["mount", "-o", f"remount,size={4 * checkpoint_bytes}", str(log_dir)], check=True)
        proc = train(log_dir, max_steps=4)
        assert proc.returncode == 0, proc.stderr[-4000:]
        assert f"resumed from {step2} (step 2" in proc.stdout
        checkpoint_io.verify_checksums(step4)
    finally:
        if mounted:
            subprocess.run(["umount", str(log_dir)], check=True)
