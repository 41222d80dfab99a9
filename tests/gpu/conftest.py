import os
import subprocess
from pathlib import Path

from tests.conftest import REPO

# Triton's float32 dot products default to tf32 (10-bit mantissa). The float32 checks below compare
# kernel logic, not tf32 rounding, so they ask Triton for IEEE float32 before any kernel compiles.
# (With tf32, gradients of random ill-conditioned weights differ by a few percent; training is bf16.)
os.environ.setdefault("TRITON_F32_DEFAULT", "ieee")


def run_once(args: list, gpus: str, log: Path, done: Path, nemorun_home: Path) -> int:
    """Run `args` on GPUs `gpus` with its output in `log`, unless `done` (the file a finished run
    leaves) exists: a later pytest call on the same machine reuses the runs that finished."""
    if done.exists():
        return 0
    env = dict(os.environ, NEMORUN_HOME=str(nemorun_home), CUDA_VISIBLE_DEVICES=gpus, COLUMNS="200",
               PYTHONWARNINGS="ignore")
    with open(log, "w") as output:
        return subprocess.run([str(a) for a in args], stdout=output, stderr=subprocess.STDOUT, env=env, cwd=REPO,
                              timeout=1200).returncode
