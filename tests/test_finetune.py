"""Fine-tuning end to end: LoRA and full SFT from an imported Hugging Face checkpoint.

The base model is the tiny preset written by transformers (random weights) with the bundled
corpus's tokenizer, imported with `falcon-h1 import`. The SFT data is a small jsonl of
prompt/response pairs that a model can learn in a few dozen steps.

- LoRA in-process (FalconH1Module(peft=LoRA()) under MegatronStrategy on CPU): the base weights
  are bitwise those of the import after training, the checkpoint holds only adapter tensors, and
  a run stopped at a checkpoint and resumed gives the uninterrupted run's losses exactly.
- Through the command line: import -> finetune (LoRA, and full with peft_scheme=none) -> export
  (the adapters merged on the way) -> transformers loads the export and generates greedily the
  same tokens as the `generate` path on the fine-tuning checkpoint.
"""

import json
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from falcon_h1.model.lora import LoRA, is_adapter_key
from tests.conftest import falcon_h1_cli

PROMPTS = ["n = 3\n", "n = 17\n"]


def cli(*args, tmp_path, threads=None):
    done = falcon_h1_cli(*args, tmp_path=tmp_path, timeout=900, threads=threads)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done


@pytest.fixture(scope="module")
def imported(tmp_path_factory):
    """(HF directory, imported checkpoint) of the tiny preset."""
    from falcon_h1.convert.hf_import import import_hf_checkpoint
    from falcon_h1.data.default_corpus import default_corpus
    from falcon_h1.model.config import config_to_hf
    from falcon_h1.model.presets import preset_config
    from falcon_h1.convert.hf_modeling import hf_falcon_h1

    root = tmp_path_factory.mktemp("base")
    transformers = hf_falcon_h1()
    torch.manual_seed(0)
    hf = transformers.FalconH1ForCausalLM(transformers.FalconH1Config(**config_to_hf(preset_config("tiny"))))
    hf.save_pretrained(root / "hf")
    for file in Path(default_corpus().tokenizer_dir).iterdir():
        if file.is_file():
            shutil.copy(file, root / "hf" / file.name)
    return root / "hf", import_hf_checkpoint(root / "hf", root / "ckpt", progress=False)


@pytest.fixture(scope="module")
def sft_jsonl(tmp_path_factory):
    path = tmp_path_factory.mktemp("sft") / "train.jsonl"
    with open(path, "w") as f:
        for i in range(64):
            f.write(json.dumps({"prompt": f"n = {i}\n", "response": f"print(n * {i % 4})"}) + "\n")
    return path


def validation_losses(run_dir):
    with open(run_dir / "loss.csv") as f:
        return [float(line.split(",")[-1]) for line in f if ",val," in line]


def train_losses(run_dir):
    with open(run_dir / "loss.csv") as f:
        return {int(line.split(",")[0]): float(line.split(",")[-1]) for line in f if ",train," in line}


def lora_run(checkpoint, data, run_dir, max_steps, every=None):
    from falcon_h1.api import finetune
    from falcon_h1.data.sft import SFTDataModule
    from falcon_h1.model.presets import preset_config
    from falcon_h1.training.checkpoint import AutoResume
    from falcon_h1.training.module import FalconH1Module
    from falcon_h1.training.optim import LRSchedule, falcon_h1_optimizer_config
    from falcon_h1.training.pretrain import build_trainer

    module = FalconH1Module(preset_config("tiny"), falcon_h1_optimizer_config(lr=3e-3, weight_decay=0.0),
                            LRSchedule(warmup_steps=2, decay_style="constant"), peft=LoRA(dim=8))
    data = SFTDataModule(str(data), None, seq_length=128, micro_batch_size=4, global_batch_size=8)
    trainer = build_trainer(str(run_dir), max_steps=max_steps, val_check_interval=max_steps, limit_val_batches=1,
                            checkpoint_every_n_steps=every, keep_last_k=None)
    result = finetune(module, data, trainer, AutoResume(resume_if_exists=True, restore_weights_from=str(checkpoint)))
    return module, result


def test_lora_trains_only_adapters_and_saves_only_them(single_rank, imported, sft_jsonl, tmp_path):
    from falcon_h1.convert.dist_checkpoint import CheckpointWeights
    from falcon_h1.model.model import FalconH1Model
    from falcon_h1.training import checkpoint_io

    _, base = imported
    module, result = lora_run(base, sft_jsonl, tmp_path / "lora", max_steps=12, every=6)
    validation = validation_losses(tmp_path / "lora")
    assert result.global_step == 12 and validation[-1] < validation[0], validation

    trained = module.unwrapped_chunks()[0]
    reference = FalconH1Model(checkpoint_io.checkpoint_model_config(base, use_cpu_initialization=True))
    checkpoint_io.load_model_weights([reference], base)
    expected = dict(reference.named_parameters())
    adapters = {n for n, _ in trained.named_parameters() if is_adapter_key("." + n)}
    assert adapters and all(trained.get_parameter(n).requires_grad for n in adapters)
    for name, param in trained.named_parameters():
        if name not in adapters:
            assert not param.requires_grad and torch.equal(param, expected[name]), name

    saved = result.checkpoint
    stored = CheckpointWeights(saved / checkpoint_io.WEIGHTS_DIR).tensors
    model_keys = [k for k in stored if not k.startswith("optimizer")]
    assert model_keys and all(is_adapter_key("." + k) for k in model_keys), model_keys[:5]
    _, run_info = checkpoint_io.read_context(saved)
    assert run_info["peft"]["dim"] == 8 and run_info["base_checkpoint"] == str(base.resolve())


def test_lora_run_resumes_exactly(single_rank, imported, sft_jsonl, tmp_path):
    _, base = imported
    lora_run(base, sft_jsonl, tmp_path / "straight", max_steps=6)
    lora_run(base, sft_jsonl, tmp_path / "stopped", max_steps=3, every=3)
    _, resumed = lora_run(base, sft_jsonl, tmp_path / "stopped", max_steps=6)
    assert resumed.global_step == 6
    straight, stopped = train_losses(tmp_path / "straight"), train_losses(tmp_path / "stopped")
    assert [stopped[s] for s in range(4, 7)] == [straight[s] for s in range(4, 7)]


def finetune_and_export(peft_scheme: str, base, sft_jsonl, tmp_path):
    """falcon-h1 finetune (16 steps) then export, through the CLI; (result.json, export directory)."""
    run_dir, export = tmp_path / f"run_{peft_scheme}", tmp_path / f"export_{peft_scheme}"
    cli("finetune", "--factory", f"tiny(checkpoint={base}, data={sft_jsonl}, peft_scheme={peft_scheme})",
                  f"trainer.log_dir={run_dir}", "trainer.max_steps=16", "trainer.val_check_interval=16",
                  "trainer.limit_val_batches=1", "model.lr_schedule.warmup_steps=2", "model.optimizer.lr=3e-3",
                  "data.global_batch_size=8", "data.micro_batch_size=4", "-y", "run.executor=local",
                  tmp_path=tmp_path / peft_scheme, threads=1)
    result = json.loads((run_dir / "result.json").read_text())
    result["validation"] = validation_losses(run_dir)
    cli("export", "-y", f"checkpoint={result['checkpoint']}", f"output={export}",
                  tmp_path=tmp_path / peft_scheme, threads=1)
    return result, export


def test_cli_import_finetune_export_generate(imported, sft_jsonl, tmp_path):
    from falcon_h1.data.preprocess import load_tokenizer
    from falcon_h1.inference.text import generate_from_checkpoint
    from falcon_h1.convert.hf_modeling import hf_falcon_h1

    hf_dir, _ = imported
    cli("import", "-y", f"source={hf_dir}", f"output={tmp_path / 'base'}", tmp_path=tmp_path)
    schemes = ["lora", "none"]
    with ThreadPoolExecutor(2) as pool:  # the two chains side by side, one core each
        runs = dict(zip(schemes, pool.map(lambda s: finetune_and_export(s, tmp_path / "base", sft_jsonl, tmp_path),
                                          schemes)))
    for scheme, (result, export) in runs.items():
        validation = result["validation"]
        assert result["global_step"] == 16 and validation[-1] < validation[0], (scheme, validation)
        exported = hf_falcon_h1().FalconH1ForCausalLM.from_pretrained(export).float().eval()
        tokenizer = load_tokenizer(export)
        ours = generate_from_checkpoint(result["checkpoint"], PROMPTS, max_new_tokens=8, device="cpu")
        assert all(c.startswith("print(n") for c in ours), (scheme, ours)  # the responses' form, learned
        for prompt, completion in zip(PROMPTS, ours):
            ids = tokenizer(prompt, add_special_tokens=False, return_tensors="pt")["input_ids"]
            out = exported.generate(ids, max_new_tokens=8, do_sample=False, eos_token_id=tokenizer.eos_token_id,
                                    pad_token_id=tokenizer.eos_token_id)
            assert tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True) == completion, (scheme, prompt)
