"""Fine-tuning a 0.5B-shaped model on one GPU (LoRA and full SFT), and hybrid-cache decode speed.

The base is the 0.5B preset written by transformers (random weights) with the bundled corpus's
tokenizer, imported with `falcon-h1 import`. Both fine-tunings run through the command line
(`falcon-h1 finetune --factory "falcon_h1_0p5b(...)"`, local executor, one GPU each, bf16) on a
jsonl of arithmetic prompt/response pairs, the recipe's 4096-token packed rows, 4 per step in 2
micro-batches, 30 steps (the figures in docs/performance.md were taken at 16 rows per step). The
decode check generates 32 tokens after 512-token prompts at batch 1 and 8 (the full decode
benchmark, with transformers beside it: tests/gpu/throughput.sh OUT decode). The three jobs run
at the same time: with 4 GPUs each on its own (0, 2, 3; GPU 1 stays free for
test_gpu_recipes.py's sweep), with fewer all on GPU 0 (the 0.5B takes a fraction of an H200's
memory), the decode job already while the base is made. Results (result.json of each run,
decode JSON) go to $OUT.

    bash tests/gpu/run.sh OUT tests/gpu/test_gpu_finetune.py
"""

import json
import os
import shutil
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from tests.gpu.conftest import run_once

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")]

OUT = Path(os.environ.get("OUT", tempfile.gettempdir()))
RUNS = Path(os.environ.get("FALCON_H1_GPU_RUNS") or tempfile.mkdtemp(prefix="falcon_h1_gpu_finetune_"))
RUNS.mkdir(parents=True, exist_ok=True)
STEPS = 30
SHORT = [f"trainer.max_steps={STEPS}", "trainer.val_check_interval=15", "trainer.limit_val_batches=2",
         "trainer.devices=1", "run.executor.ntasks_per_node=1", "model.lr_schedule.warmup_steps=5",
         "data.global_batch_size=4", "data.micro_batch_size=2"]
# Higher than the recipes' defaults (3e-4 / 128e-6): the base is random and the run short.
LR = {"lora": "1e-3", "none": "3e-4"}
DECODE_BATCHES = [1, 8]


def base_checkpoint() -> tuple[Path, Path]:
    """(checkpoint, jsonl): the imported 0.5B-shaped base and the SFT data, made once per machine."""
    checkpoint, data = RUNS / "base", RUNS / "sft.jsonl"
    if (checkpoint / "weights" / "metadata.json").exists():
        return checkpoint, data
    from falcon_h1.convert.hf_import import import_hf_checkpoint
    from falcon_h1.data.default_corpus import default_corpus
    from falcon_h1.model.config import config_to_hf
    from falcon_h1.model.presets import preset_config
    from falcon_h1.convert.hf_modeling import hf_falcon_h1

    transformers = hf_falcon_h1()
    torch.manual_seed(0)
    with torch.device("cuda"):
        hf = transformers.FalconH1ForCausalLM(transformers.FalconH1Config(**config_to_hf(preset_config("0.5b"))))
    hf.to(torch.bfloat16).save_pretrained(RUNS / "hf")
    del hf
    for file in Path(default_corpus().tokenizer_dir).iterdir():
        if file.is_file():
            shutil.copy(file, RUNS / "hf" / file.name)
    import_hf_checkpoint(RUNS / "hf", checkpoint, progress=False)
    with open(data, "w") as f:
        for i in range(4000):
            a, b = i % 97, (i * 7) % 89
            f.write(json.dumps({"prompt": f"Question: what is {a} plus {b}?\nAnswer:",
                                "response": f" {a} plus {b} is {a + b}."}) + "\n")
    return checkpoint, data


def finetune(peft_scheme: str, gpu: str, checkpoint: Path, data: Path) -> dict:
    run_dir = RUNS / f"finetune_{peft_scheme}"
    log = RUNS / f"finetune_{peft_scheme}.log"
    args = [sys.executable, "-m", "falcon_h1.cli", "finetune", "--factory",
            f"falcon_h1_0p5b(checkpoint={checkpoint}, data={data}, peft_scheme={peft_scheme})",
            f"trainer.log_dir={run_dir}", f"model.optimizer.lr={LR[peft_scheme]}", *SHORT, "-y", "run.executor=local"]
    run_once(args, gpu, log, run_dir / "result.json", RUNS / "nemorun")
    shutil.copy(log, OUT / log.name)
    return dict(dir=run_dir, log=log)


def decode_benchmark(gpu: str) -> Path:
    out = RUNS / "decode_0p5b.json"
    run_once([sys.executable, "-m", "falcon_h1.benchmarks.decode", "--preset", "0.5b", "--batch-sizes",
              *map(str, DECODE_BATCHES), "--prompt-len", "512", "--new-tokens", "32", "--repeats", "1", "--json", out],
             gpu, RUNS / "decode.log", out, RUNS / "nemorun")
    shutil.copy(RUNS / "decode.log", OUT / "decode.log")
    return out


@pytest.fixture(scope="module")
def runs():
    gpus = ["0", "2", "3"] if torch.cuda.device_count() >= 4 else ["0", "0", "0"]
    with ThreadPoolExecutor(3) as pool:
        decode = pool.submit(decode_benchmark, gpus[2])  # needs no base: a preset with random weights
        checkpoint, data = base_checkpoint()
        lora = pool.submit(finetune, "lora", gpus[0], checkpoint, data)
        full = pool.submit(finetune, "none", gpus[1], checkpoint, data)
        return {"lora": lora.result(), "none": full.result(), "decode": decode.result(), "base": checkpoint}


@pytest.mark.parametrize("peft_scheme", ["lora", "none"])
def test_0p5b_finetunes_on_one_gpu(runs, peft_scheme):
    from falcon_h1.convert.dist_checkpoint import CheckpointWeights
    from falcon_h1.model.lora import is_adapter_key
    from falcon_h1.training import checkpoint_io

    run = runs[peft_scheme]
    assert (run["dir"] / "result.json").exists(), run["log"].read_text()[-6000:]
    result = json.loads((run["dir"] / "result.json").read_text())
    (OUT / f"finetune_{peft_scheme}.json").write_text(json.dumps({**result, "device": torch.cuda.get_device_name()},
                                                                 indent=2))
    print(peft_scheme, json.dumps(result))
    with open(run["dir"] / "loss.csv") as f:
        validation = [float(line.split(",")[-1]) for line in f if ",val," in line]
    assert result["global_step"] == STEPS and validation[-1] < validation[0] - 0.3, validation
    stored = [k for k in CheckpointWeights(Path(result["checkpoint"]) / "weights").tensors
              if not k.startswith("optimizer")]
    if peft_scheme == "lora":
        assert all(is_adapter_key("." + k) for k in stored)
        assert checkpoint_io.read_context(result["checkpoint"])[1]["base_checkpoint"] == str(runs["base"].resolve())
    else:
        assert not any(is_adapter_key("." + k) for k in stored)


def test_decode_speed_is_recorded(runs):
    rows = json.loads(runs["decode"].read_text())
    shutil.copy(runs["decode"], OUT / runs["decode"].name)
    for row in rows:
        print(json.dumps(row))
    ours = [r for r in rows if r["stack"] == "falcon_h1"]
    assert [r["batch"] for r in ours] == DECODE_BATCHES and all(r["decode_tokens_per_s"] > 0 for r in ours)
