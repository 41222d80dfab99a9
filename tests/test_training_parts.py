"""The pieces of a training step that have their own contract: the sampler, the LR schedule,
the gradient norm with TP-replicated rows, the checkpoint directory rules."""

import math

import pytest
import torch

from falcon_h1.data.sampler import MegatronPretrainingSampler
from falcon_h1.training import checkpoint_io
from falcon_h1.training.optim import LRSchedule, ScheduleSteps, build_scheduler, falcon_h1_optimizer_config


def test_sampler_gives_each_rank_its_blocks_of_every_global_batch_and_resumes_mid_run():
    def read(rank, consumed):
        return list(MegatronPretrainingSampler(48, consumed, micro_batch_size=2, global_batch_size=12,
                                               data_parallel_rank=rank, data_parallel_size=3))

    full = [read(r, 0) for r in range(3)]
    # Global batch 0 is samples 0..11 in two rounds of 3 ranks x 2: rank 1 reads [2, 3] and [8, 9].
    assert full[1][0] == [2, 3, 8, 9] and len(full[0]) == 4
    assert sorted(i for rank in full for step in rank for i in step) == list(range(48))
    # Resuming at 24 consumed samples (2 steps) reads exactly the rest.
    assert [read(r, 24) for r in range(3)] == [rank[2:] for rank in full]
    assert len(MegatronPretrainingSampler(48, 24, 2, 12, 0, 3)) == 2
    with pytest.raises(ValueError, match="exceeds the 48 samples"):
        MegatronPretrainingSampler(48, 60, 2, 12, 0, 3)
    with pytest.raises(ValueError, match="global_batch_size=10 is not a multiple"):
        MegatronPretrainingSampler(48, 0, 2, 10, 0, 3)


class _Groups:
    def __init__(self):
        self.param_groups = [{"params": []}]


def lr_curve(schedule, steps=100, lr=1e-3, **optimizer):
    scheduler = build_scheduler(_Groups(), falcon_h1_optimizer_config(lr=lr, **optimizer), schedule, steps)
    curve = []
    for _ in range(steps):
        curve.append(scheduler.get_lr(scheduler.optimizer.param_groups[0]))
        scheduler.step(1)
    return curve


def test_wsd_warms_up_holds_then_decays_exponentially_to_lr_over_8():
    curve = lr_curve(LRSchedule(warmup_steps=10, decay_style="WSD", wsd_decay_fraction=0.2))
    assert curve[0] == 0.0 and curve[5] == pytest.approx(5e-4)
    assert all(v == pytest.approx(1e-3) for v in curve[10:80])  # stable phase
    assert curve[99] < curve[90] < curve[81] < 1e-3  # decay over the last 20%
    assert curve[-1] == pytest.approx(1e-3 / 8 + (1e-3 - 1e-3 / 8) * (2 * 0.5 ** (19 / 20) - 1))


def test_cosine_decays_from_the_peak_to_min_lr():
    curve = lr_curve(LRSchedule(warmup_steps=0, decay_style="cosine"))
    min_lr = 1e-3 / 8
    assert curve[0] == pytest.approx(1e-3)
    assert curve[50] == pytest.approx(min_lr + 0.5 * (1e-3 - min_lr) * (1 + math.cos(math.pi / 2)))


def test_warmup_and_decay_are_fractions_of_the_run_whatever_its_length():
    schedule = LRSchedule(warmup_fraction=0.1, decay_style="WSD", wsd_decay_fraction=0.2)
    for steps in (10, 100, 1000):
        curve = lr_curve(schedule, steps=steps)
        warmup, decay = round(0.1 * steps), round(0.2 * steps)
        assert curve[warmup] == pytest.approx(1e-3) and all(v < 1e-3 for v in curve[:warmup])
        assert curve[steps - decay] == pytest.approx(1e-3) and curve[steps - decay + 1] < 1e-3
    assert schedule.steps(5) == ScheduleSteps(warmup=0, decay=5, wsd_decay=1)  # 0.5 warm-up steps round to 0
    assert LRSchedule(warmup_fraction=0.9).steps(3).warmup == 2  # always below the horizon
    assert LRSchedule(warmup_fraction=0.1, decay_steps=50).steps(1000) == ScheduleSteps(5, 50, 5)


def test_min_lr_follows_lr_unless_set():
    assert lr_curve(LRSchedule(warmup_steps=0, decay_style="linear"), steps=10, lr=2e-3)[-1] == pytest.approx(
        2e-3 / 8 + (2e-3 - 2e-3 / 8) / 10)
    curve = lr_curve(LRSchedule(warmup_steps=0, decay_style="linear"), steps=10, lr=2e-3, min_lr=0.0)
    assert curve[-1] == pytest.approx(2e-3 / 10)  # an explicit min_lr, even 0, wins
    with pytest.raises(ValueError, match="model.optimizer.min_lr=0.01: must be between 0 and model.optimizer.lr=0.002"):
        lr_curve(LRSchedule(), lr=2e-3, min_lr=1e-2)


def test_schedule_refuses_a_warmup_past_the_decay_horizon():
    with pytest.raises(ValueError, match=r"warmup_steps=100 must be below the decay horizon 100 "
                                         r"\(trainer.max_steps\): lower model.lr_schedule.warmup_steps"):
        lr_curve(LRSchedule(warmup_steps=100))
    with pytest.raises(ValueError, match="trainer.max_steps=-1"):
        LRSchedule().steps(-1)
    with pytest.raises(ValueError, match="decay_style='step'"):
        LRSchedule(decay_style="step")
    with pytest.raises(ValueError, match="warmup_fraction=1.0 must be in"):
        LRSchedule(warmup_fraction=1.0)


def test_replicated_rows_count_once_in_the_gradient_norm(single_rank):
    """Rows marked as held by r tensor-parallel ranks add 1/r of their squares to the norm."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.transformer import TransformerConfig

    from falcon_h1.model.layout import Segment
    from falcon_h1.model.tensor_parallel import REPLICATED_ROWS_ATTR
    from falcon_h1.training.step import count_replicated_rows_once
    from falcon_h1.training.optim import build_optimizer

    class Tiny(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.zeros(6, 4))
            self.weight.tensor_model_parallel = True

    config = TransformerConfig(num_layers=1, hidden_size=4, num_attention_heads=1, calculate_per_token_loss=True)
    for distributed in (True, False):
        module = Tiny()
        # Rows 2..5 are (as if) held by 4 ranks each.
        segment = Segment(name="B", rows=4, canonical_rows=4, offset=0, replicas=4)
        setattr(module.weight, REPLICATED_ROWS_ATTR, [(2, segment)])
        ddp = DistributedDataParallel(config, DistributedDataParallelConfig(
            use_distributed_optimizer=distributed, bucket_size=0), module)
        optimizer = build_optimizer(falcon_h1_optimizer_config(use_distributed_optimizer=distributed), [ddp], config)
        count_replicated_rows_once(optimizer)
        grad = torch.arange(24, dtype=torch.float32).view(6, 4)
        module.weight.main_grad.copy_(grad)
        optimizer.prepare_grads()
        expected = math.sqrt(float((grad[:2] ** 2).sum() + (grad[2:] ** 2).sum() / 4))
        assert optimizer.get_grad_norm() == pytest.approx(expected, rel=1e-6), distributed


def test_optimizer_is_torchs_fused_adamw_clipping_with_multi_tensor_ops(single_rank):
    """Without Apex/TE, Megatron's fallbacks are replaced: fused AdamW (one pass per step) and a
    gradient norm and clip that make no host sync per tensor. The update is AdamW's, clipped."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.optimizer import clip_grads
    from megatron.core.transformer import TransformerConfig

    from falcon_h1.compat import megatron as megatron_patches
    from falcon_h1.training.optim import build_optimizer

    config = TransformerConfig(num_layers=1, hidden_size=4, num_attention_heads=1, calculate_per_token_loss=True)
    torch.manual_seed(0)
    module = torch.nn.Linear(4, 3, bias=True)
    reference = [p.detach().clone().requires_grad_() for p in module.parameters()]
    ddp = DistributedDataParallel(config, DistributedDataParallelConfig(use_distributed_optimizer=True,
                                                                        bucket_size=0), module)
    optimizer = build_optimizer(falcon_h1_optimizer_config(lr=1e-2, use_distributed_optimizer=True), [ddp], config)
    assert all(group["fused"] and not group["foreach"] for group in optimizer.optimizer.param_groups)
    assert clip_grads.l2_norm_impl is megatron_patches._foreach_l2_norm
    assert clip_grads.multi_tensor_scale_impl is megatron_patches._foreach_scale
    grads = [torch.randn_like(p) * 3 for p in reference]  # norm above the clip of 1.0
    for param, grad in zip(module.parameters(), grads):
        param.main_grad.copy_(grad)
    optimizer.step()
    total = torch.linalg.vector_norm(torch.stack([g.norm() for g in grads]))
    expected = torch.optim.AdamW(reference, lr=1e-2, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1, foreach=False)
    for param, grad in zip(reference, grads):
        param.grad = grad / (total + 1e-6)
    expected.step()
    for got, want in zip(module.parameters(), reference):
        assert torch.allclose(got, want, atol=1e-6), (got, want)


def test_fused_adam_applies_the_per_token_and_clip_scaling_as_megatrons_passes_do(single_rank):
    """OptimizerStep leaves the gradients summed over tokens at finalize and divides them by
    tokens / clip factor inside torch's fused AdamW: the same weights, gradient norm and final
    gradients as Megatron's 1/tokens and clip passes, with the clip active (steps 1-2) or not (3)."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
    from megatron.core.transformer import TransformerConfig

    from falcon_h1.training.optim import build_optimizer
    from falcon_h1.training.step import OptimizerStep

    config = TransformerConfig(num_layers=1, hidden_size=4, num_attention_heads=1, calculate_per_token_loss=True)
    runs = []
    for fused in (False, True):
        torch.manual_seed(0)
        module = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))
        ddp = DistributedDataParallel(config, DistributedDataParallelConfig(use_distributed_optimizer=True,
                                                                            bucket_size=0), module)
        optimizer = build_optimizer(falcon_h1_optimizer_config(lr=1e-2), [ddp], config)
        scaling = OptimizerStep(optimizer)
        assert scaling.fused_scaling
        if fused:
            with pytest.raises(RuntimeError, match="no token count was recorded"):
                scaling.step()
        norms, grads = [], []
        for step, size in enumerate((30.0, 30.0, 0.01)):  # gradient sums over 7 tokens
            generator = torch.Generator().manual_seed(step)
            for param in module.parameters():
                param.main_grad.copy_(torch.randn(param.shape, generator=generator) * size)
            num_tokens = torch.tensor(7)
            if fused:
                finalize_model_grads([ddp], None)
                scaling.record_tokens(num_tokens)
                successful, norm, _ = scaling.step()
            else:
                finalize_model_grads([ddp], num_tokens)
                successful, norm, _ = optimizer.step()
            assert successful
            norms.append(norm)
            grads.append([p.main_grad.clone() for p in module.parameters()])
        runs.append((norms, grads, [p.detach().clone() for p in module.parameters()]))
    (norms, grads, weights), (fused_norms, fused_grads, fused_weights) = runs
    assert norms[0] > 1.0 and norms[2] < 1.0  # clipped, then not
    assert fused_norms == pytest.approx(norms, rel=1e-6)
    for want, got in zip(weights, fused_weights):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)
    for step_grads, fused_step_grads in zip(grads, fused_grads):
        for want, got in zip(step_grads, fused_step_grads):
            torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-9)


def test_with_the_fused_scaling_a_nan_gradient_stops_the_step_after_the_norm_before_any_update(single_rank):
    """With the bucket norms kept, OptimizerStep reads the pending NaN/Inf check after the
    gradient norm's host sync: the step raises, naming the bucket, and no weight changes."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
    from megatron.core.transformer import TransformerConfig

    from falcon_h1.training.step import DeferredGradCheck
    from falcon_h1.training.optim import build_optimizer
    from falcon_h1.training.step import OptimizerStep

    config = TransformerConfig(num_layers=1, hidden_size=4, num_attention_heads=1, calculate_per_token_loss=True)
    module = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))
    ddp = DistributedDataParallel(config, DistributedDataParallelConfig(
        use_distributed_optimizer=True, check_for_nan_in_grad=True, bucket_size=0), module)
    check = DeferredGradCheck([ddp])
    optimizer = build_optimizer(falcon_h1_optimizer_config(lr=1e-2), [ddp], config)
    scaling = OptimizerStep(optimizer, check, check_on_gradient_norm=False)
    before = [p.detach().clone() for p in module.parameters()]
    ddp.zero_grad_buffer()
    ddp(torch.randn(5, 4)).square().sum().backward()
    module[1].weight.main_grad[0, 0] = float("inf")
    finalize_model_grads([ddp], None)  # the per-bucket check is deferred here
    scaling.record_tokens(torch.tensor(5))
    with pytest.raises(RuntimeError, match=r"NaN or Inf in this rank's gradients .*bucket 0: norm inf"):
        scaling.step()
    for want, got in zip(before, module.parameters()):
        assert torch.equal(got, want)
    assert check.pending == []


def test_a_nan_gradient_stops_the_step_when_gradients_are_finalized(single_rank):
    """With check_for_nan_in_grad, each bucket's norm is taken before the data-parallel reduction
    but checked (one host sync) only when the gradients are finalized, before the optimizer step;
    the error names the bucket. Clean gradients pass, and nothing is left pending."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.transformer import TransformerConfig

    from falcon_h1.training.step import DeferredGradCheck

    config = TransformerConfig(num_layers=1, hidden_size=4, num_attention_heads=1)
    ddp = DistributedDataParallel(config, DistributedDataParallelConfig(check_for_nan_in_grad=True, bucket_size=0),
                                  torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2)))
    check = DeferredGradCheck([ddp])
    for poisoned in (False, True):
        ddp.zero_grad_buffer()
        ddp(torch.randn(5, 4)).square().sum().backward()
        if poisoned:
            ddp.module[1].weight.main_grad[0, 0] = float("nan")
        ddp.finish_grad_sync()  # Megatron's per-bucket check runs here: now deferred, no error yet
        assert len(check.pending) == 1
        if poisoned:
            with pytest.raises(RuntimeError, match=r"NaN or Inf in this rank's gradients .*bucket 0: norm nan"):
                check.verify()
        else:
            check.verify()
        assert check.pending == []
    check.remove()
    assert "check_grads" not in vars(ddp.bucket_groups[0])  # Megatron's own method again


def test_checkpoint_directory_rules(tmp_path):
    for step in (5, 10, 15):
        weights = tmp_path / checkpoint_io.checkpoint_name(step) / checkpoint_io.WEIGHTS_DIR
        weights.mkdir(parents=True)
        (weights / "metadata.json").write_text("{}")
    checkpoint_io.mark_unfinished(tmp_path / "step=0000015")  # a save that never finished
    assert [p.name for p in checkpoint_io.complete_checkpoints(tmp_path)] == ["step=0000005", "step=0000010"]
    assert checkpoint_io.latest_checkpoint(tmp_path).name == "step=0000010"
    with pytest.raises(checkpoint_io.CheckpointError, match="unfinished"):
        checkpoint_io.check_loadable(tmp_path / "step=0000015")
    with pytest.raises(checkpoint_io.CheckpointError, match="does not exist"):
        checkpoint_io.check_loadable(tmp_path / "step=0000099")
    checkpoint_io.remove_checkpoint(tmp_path / "step=0000005")
    assert not (tmp_path / "step=0000005").exists()
    assert not checkpoint_io.unfinished_marker(tmp_path / "step=0000005").exists()


VALIDATION_COUNT = r'''
import warnings; warnings.filterwarnings("ignore")
from falcon_h1.data.pretraining import MockDataModule
from falcon_h1.model.presets import preset_config
from falcon_h1.training.checkpoint import AutoResume
from falcon_h1.training.module import FalconH1Module
from falcon_h1.training.pretrain import build_trainer, pretrain

if __name__ == "__main__":
    read = []
    original = FalconH1Module._next_global_batch
    def counting(self, dataloader_iter):
        micro_batches = original(self, dataloader_iter)
        read.append((self.trainer.sanity_checking, self.trainer.training, len(micro_batches)))
        return micro_batches
    FalconH1Module._next_global_batch = counting
    module = FalconH1Module(preset_config("tiny", num_layers=1, kernel_backend="torch"))
    data = MockDataModule(4096, seq_length=16, micro_batch_size=2, global_batch_size=8)
    trainer = build_trainer(__import__("sys").argv[1], max_steps=4, val_check_interval=2, limit_val_batches=3)
    pretrain(module, data, trainer, AutoResume(resume_if_exists=False))
    print("READ", read)
'''


def test_validation_reads_limit_val_batches_global_batches(tmp_path):
    """limit_val_batches and val_check_interval count global batches (steps), however many
    micro-batches a global batch holds."""
    import subprocess
    import sys

    from tests.conftest import REPO

    script = tmp_path / "count.py"
    script.write_text(VALIDATION_COUNT)
    proc = subprocess.run([sys.executable, str(script), str(tmp_path / "run")], capture_output=True, text=True,
                          timeout=300, cwd=REPO)
    line = next(line for line in proc.stdout.splitlines() if line.startswith("READ "))
    read = eval(line[len("READ "):])
    sanity = [n for checking, training, n in read if checking]
    train = [n for checking, training, n in read if training and not checking]
    validation = [n for checking, training, n in read if not training and not checking]
    assert sanity == [4, 4, 4]  # 3 global batches of 4 micro-batches before the first step
    assert train == [4, 4, 4, 4]
    assert validation == [4] * 6  # after steps 2 and 4


AFTER_FIT = r'''
import gc, sys, weakref, warnings; warnings.filterwarnings("ignore")
import torch
from falcon_h1.data.pretraining import MockDataModule
from falcon_h1.model.presets import preset_config
from falcon_h1.training.checkpoint import AutoResume
from falcon_h1.training.module import FalconH1Module
from falcon_h1.training.pretrain import build_trainer, pretrain

if __name__ == "__main__":
    module = FalconH1Module(preset_config("tiny", num_layers=2, kernel_backend="torch"))
    data = MockDataModule(4096, seq_length=16, micro_batch_size=2, global_batch_size=4)
    trainer = build_trainer(sys.argv[1], max_steps=2, limit_val_batches=0, checkpoint_every_n_steps=None,
                            save_last=False)
    pretrain(module, data, trainer, AutoResume(resume_if_exists=False))
    with torch.no_grad():
        logits = module(torch.randint(0, 4096, (1, 16)))
    print("FORWARD", tuple(logits.shape))
    alive = [weakref.ref(module), weakref.ref(module.unwrapped_chunks()[0]),
             weakref.ref(next(module.parameters()))]
    del module, trainer, data
    gc.collect()
    print("ALIVE", [ref() is not None for ref in alive])
'''


def test_a_finished_fit_still_runs_forward_and_frees_the_model_once_dropped(tmp_path):
    """After fit the module still runs forward (notebooks); once the user drops it, nothing keeps the
    model, its gradient buffers or its parameters alive (the strategy's teardown releases Megatron
    DDP's gradient hooks, the config's functions bound to the module and the NaN check's patches)."""
    import subprocess
    import sys

    from tests.conftest import REPO

    script = tmp_path / "after_fit.py"
    script.write_text(AFTER_FIT)
    proc = subprocess.run([sys.executable, str(script), str(tmp_path / "run")], capture_output=True, text=True,
                          timeout=300, cwd=REPO)
    lines = {line.split(" ", 1)[0]: line.split(" ", 1)[1] for line in proc.stdout.splitlines()
             if line.startswith(("FORWARD ", "ALIVE "))}
    assert "ALIVE" in lines, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert lines["FORWARD"].startswith("(1, 16, ")
    assert lines["ALIVE"] == "[False, False, False]"  # the module, its FalconH1Model, a parameter
