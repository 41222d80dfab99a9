"""The README's main job: the tiny model trains on the bundled corpus and learns.

`python -m falcon_h1.train` with its defaults (the tiny recipe's: tiny preset, bundled corpus, CPU
here), 200 steps.
Its validation loss falls and means something: the validation files are held out whole (see
test_default_corpus.py), so it does not end far below the training loss. The checkpoint's
`falcon-h1 generate` completions are those transformers generates from its Hugging Face export.
"""

import csv
import os
import subprocess
import sys

import torch

from tests.conftest import REPO


def test_the_main_jobs_defaults_are_the_tiny_recipes():
    """recipes/tiny.py is the one source of the main job's numbers: each flag left unset is its value."""
    import fiddle as fdl

    from falcon_h1.train import parse_args, tiny_recipe
    from recipes import tiny

    size, args = tiny.SIZE, parse_args([])
    assert (args.preset, args.seq_length, args.micro_batch_size, args.global_batch_size) == (
        size.preset, size.seq_length, size.micro_batch_size, size.global_batch_size)
    assert (args.max_steps, args.lr, args.val_every, args.val_batches, args.log_every, args.checkpoint_every,
            args.keep_last) == (size.max_steps, size.lr, size.val_check_interval, size.limit_val_batches,
                                size.log_every_n_steps, size.checkpoint_every_n_steps, size.keep_last_k)
    assert (args.tp, args.pp, args.vpp, args.cp, args.sp) == (
        size.tensor_parallel, size.pipeline_parallel, size.virtual_pipeline, size.context_parallel,
        size.sequence_parallel)
    assert args.log_dir == f"runs/{tiny.NAME}" and not args.mock_data and args.data is None  # the bundled corpus
    schedule = fdl.build(tiny_recipe().model.lr_schedule)
    assert schedule.warmup_fraction == size.warmup_fraction and schedule.decay_style == args.lr_decay
    given = parse_args(["--seq-length", "64", "--tp", "2", "--sp", "--lr", "1e-3"])
    assert (given.seq_length, given.tp, given.sp, given.lr) == (64, 2, True, 1e-3)
    assert given.global_batch_size == size.global_batch_size


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

    # Validation before the first step and after the last: below 60% of where it started, and not
    # more than 15% below the training loss of the last steps (as it was on near-copies of training files).
    with open(log_dir / "loss.csv") as f:
        rows = list(csv.DictReader(f))
    validation = {int(row["step"]): float(row["loss"]) for row in rows if row["split"] == "val"}
    train = {int(row["step"]): float(row["loss"]) for row in rows if row["split"] == "train"}
    assert sorted(validation) == [0, 50, 100, 150, 200]
    assert validation[200] < 0.6 * validation[0], validation
    final_train = sum(train[step] for step in range(191, 201)) / 10  # one step's batch is noisy
    assert validation[200] >= 0.85 * final_train, (validation[200], final_train)

    # The checkpoint generates text with its own tokenizer (greedy; correctness: test_generation.py).
    env["NEMORUN_HOME"] = str(tmp_path / "nemorun")
    done = subprocess.run([sys.executable, "-m", "falcon_h1.cli", "generate", "-y", f"checkpoint={checkpoint}",
                           'prompts=["import os\\n", "    def "]', "max_new_tokens=24"],
                          capture_output=True, text=True, timeout=600, env=env, cwd=REPO)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "--- prompt: 'import os\\n'" in done.stdout and "--- prompt: '    def '" in done.stdout
    completion = done.stdout.split("--- prompt: '    def '")[1]
    assert len(completion.strip()) > len("def") + 4

    # transformers, greedy, on the checkpoint's Hugging Face export: the same completions.
    from transformers import AutoTokenizer, FalconH1ForCausalLM

    from falcon_h1.convert.hf_export import export_hf_checkpoint

    exported = export_hf_checkpoint(checkpoint, tmp_path / "hf", progress=False)
    model = FalconH1ForCausalLM.from_pretrained(exported, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(exported)
    blocks = done.stdout.split("--- prompt: ")[1:]
    for prompt, block in zip(["import os\n", "    def "], blocks):
        inputs = tokenizer(prompt, add_special_tokens=False, return_tensors="pt")
        tokens = model.generate(**inputs, max_new_tokens=24, do_sample=False)[0, inputs["input_ids"].shape[1]:]
        assert block.startswith(f"{prompt!r}\n{prompt}{tokenizer.decode(tokens, skip_special_tokens=True)}\n")
