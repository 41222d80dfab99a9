"""The README's main job: the tiny model trains on the bundled corpus and learns.

`python -m falcon_h1.train` with its defaults (tiny preset, bundled corpus, CPU here), 200 steps.
"""

import csv
import os
import subprocess
import sys

from tests.conftest import REPO


def test_tiny_model_trains_on_the_bundled_corpus_and_its_validation_loss_falls(tmp_path):
    log_dir = tmp_path / "tiny"
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    proc = subprocess.run([sys.executable, "-m", "falcon_h1.train", "--log-dir", str(log_dir), "--max-steps", "200"],
                          capture_output=True, text=True, timeout=1200, env=env, cwd=REPO)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]

    # Progress lines, then where the results are.
    assert "step 200/200 | loss" in proc.stdout and "tok/s/gpu" in proc.stdout
    checkpoint = log_dir / "checkpoints" / "step=0000200"
    assert f"checkpoint:  {checkpoint}" in proc.stdout
    assert f"loss plot:   {log_dir / 'loss.png'}" in proc.stdout
    assert (checkpoint / "weights" / "metadata.json").is_file()
    assert (checkpoint / "context" / "config.json").is_file()
    assert (checkpoint / "context" / "tokenizer" / "tokenizer.json").is_file()
    assert (log_dir / "loss.png").stat().st_size > 10_000
    assert list((log_dir / "tensorboard").glob("events.out.tfevents.*"))

    # Validation before the first step and after the last: below 60% of where it started.
    with open(log_dir / "loss.csv") as f:
        validation = {int(row["step"]): float(row["loss"]) for row in csv.DictReader(f) if row["split"] == "val"}
    assert sorted(validation) == [0, 50, 100, 150, 200]
    assert validation[200] < 0.6 * validation[0], validation

    # The checkpoint generates text with its own tokenizer (greedy; correctness: test_generation.py).
    env["NEMORUN_HOME"] = str(tmp_path / "nemorun")
    done = subprocess.run([sys.executable, "-m", "falcon_h1.cli", "generate", "-y", f"checkpoint={checkpoint}",
                           'prompts=["import os\\n", "    def "]', "max_new_tokens=24"],
                          capture_output=True, text=True, timeout=600, env=env, cwd=REPO)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "--- prompt: 'import os\\n'" in done.stdout and "--- prompt: '    def '" in done.stdout
    completion = done.stdout.split("--- prompt: '    def '")[1]
    assert len(completion.strip()) > len("def") + 4
