"""The Python API in a plain script, as users write one: no `if __name__ == "__main__":` guard.
Saving a checkpoint must not start a process that re-runs the script."""

import os
import subprocess
import sys

from tests.conftest import REPO

SCRIPT = '''
import sys

from falcon_h1.data.pretraining import MockDataModule
from falcon_h1.model.presets import preset_config
from falcon_h1.training.module import FalconH1Module
from falcon_h1.training.optim import LRSchedule, falcon_h1_optimizer_config
from falcon_h1.training.pretrain import build_trainer, pretrain

print("script started", flush=True)
config = preset_config("tiny")
module = FalconH1Module(config, falcon_h1_optimizer_config(lr=3e-3), LRSchedule(warmup_steps=1, decay_steps=6))
data = MockDataModule(vocab_size=config.vocab_size, seq_length=64, micro_batch_size=2, global_batch_size=2)
trainer = build_trainer("run", max_steps=int(sys.argv[1]), checkpoint_every_n_steps=2, val_check_interval=2,
                        limit_val_batches=1)
result = pretrain(module, data, trainer)
print("finished at step", result.global_step, flush=True)
'''


def test_a_script_without_a_main_guard_trains_checkpoints_and_resumes(tmp_path):
    (tmp_path / "train.py").write_text(SCRIPT)

    def train(max_steps: int) -> str:
        proc = subprocess.run([sys.executable, "train.py", str(max_steps)], cwd=tmp_path, capture_output=True,
                              text=True, timeout=600, env=dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1"))
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
        assert proc.stdout.count("script started") == 1  # no save re-ran the script
        return proc.stdout

    assert "finished at step 3" in train(3)
    checkpoints = tmp_path / "run" / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir()) == ["step=0000002", "step=0000003"]

    out = train(6)
    assert f"resumed from {checkpoints / 'step=0000003'} (step 3" in out
    assert "finished at step 6" in out
    assert sorted(p.name for p in checkpoints.iterdir()) == ["step=0000004", "step=0000006"]
