"""A small training run for the training tests, alone or under torchrun (gloo).

Trains a 2-layer Falcon-H1 (the `tiny` preset, shallower) in float32 on the bundled corpus, with
the real strategy, data module, checkpoints and resume, and records for the test:
  --record DIR   steps.jsonl (rank 0: step, loss, consumed_samples, per step; appended, so a
                 resumed run adds its steps) and samples-rank{r}.jsonl (the training sample
                 indices rank r read, in order, with its data-parallel rank).
Fault injection: --kill-at-step N sends SIGKILL to the process group after step N;
--kill-during-save-at-step N writes the checkpoint of step N, corrupts it and SIGKILLs the
process before the save finishes. In a multi-process run, --fault-rank R limits these and the faults
below to rank R: --raise-at-step N raises an exception after step N, --raise-before-rendezvous
before the process group is set up; --block-at-step N blocks
(sleeps) after step N, before the next step's collectives, or with --block-holding-gil in C code
that holds the GIL. --hang-timeout sets the watchdog's; --devices N starts N processes through
Lightning's subprocess launcher (instead of torchrun).
"""

import argparse
import json
import os
import signal
import sys
import time
import warnings

warnings.filterwarnings("ignore")


def parse_args():
    parser = argparse.ArgumentParser()
    parser.add_argument("--log-dir", required=True)
    parser.add_argument("--record", required=True)
    parser.add_argument("--max-steps", type=int, default=12)
    parser.add_argument("--checkpoint-every", type=int)
    parser.add_argument("--save-at-start", action="store_true")
    parser.add_argument("--restore-weights-from")
    parser.add_argument("--no-resume", action="store_true")
    parser.add_argument("--kill-at-step", type=int)
    parser.add_argument("--kill-during-save-at-step", type=int)
    parser.add_argument("--fault-rank", type=int, help="inject the faults on this rank only (default: every rank)")
    parser.add_argument("--raise-at-step", type=int)
    parser.add_argument("--raise-before-rendezvous", action="store_true")
    parser.add_argument("--block-at-step", type=int)
    parser.add_argument("--block-holding-gil", action="store_true")
    parser.add_argument("--hang-timeout", type=float, default=None, help="the watchdog's (default: build_trainer's)")
    parser.add_argument("--devices", type=int, help="processes started by Lightning's subprocess launcher")
    parser.add_argument("--tp", type=int, default=1)
    parser.add_argument("--pp", type=int, default=1)
    parser.add_argument("--vpp", type=int)
    parser.add_argument("--cp", type=int, default=1)
    parser.add_argument("--sp", action="store_true")
    parser.add_argument("--num-layers", type=int, default=2)
    parser.add_argument("--seq-length", type=int, default=64)
    parser.add_argument("--global-batch-size", type=int, default=8)
    parser.add_argument("--micro-batch-size", type=int, default=2)
    parser.add_argument("--model", default="{}", help="JSON overrides of the model config")
    parser.add_argument("--precision", default="32", choices=["32", "bf16-mixed"])
    parser.add_argument("--kernel-backend", default="torch", choices=["torch", "auto", "gpu"])
    parser.add_argument("--async-save", action="store_true")
    parser.add_argument("--grad-bucket-size", type=int,
                        help="DDP gradient buckets of this many elements, overlapped as on GPU (default: one)")
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--data", help="dataset prefix (default: the bundled corpus)")
    parser.add_argument("--tokenizer")
    return parser.parse_args()


def main():
    args = parse_args()
    import pytorch_lightning as pl

    from falcon_h1.data import sampler as sampler_module
    from falcon_h1.data.default_corpus import default_corpus
    from falcon_h1.data.pretraining import PreTrainingDataModule
    from falcon_h1.model.presets import preset_config
    from falcon_h1.training.checkpoint import AutoResume
    from falcon_h1.training.module import FalconH1Module
    from falcon_h1.training.optim import LRSchedule, falcon_h1_optimizer_config
    from falcon_h1.training.pretrain import build_trainer, pretrain
    from falcon_h1.training.strategy import MegatronStrategy

    os.makedirs(args.record, exist_ok=True)
    original_iter = sampler_module.MegatronPretrainingSampler.__iter__

    def recording_iter(self):
        path = os.path.join(args.record, f"samples-rank{os.environ.get('RANK', 0)}.jsonl")
        for indices in original_iter(self):
            if getattr(self, "is_training", False):
                with open(path, "a") as f:
                    f.write(json.dumps({"dp": self.data_parallel_rank, "indices": indices}) + "\n")
            yield indices

    sampler_module.MegatronPretrainingSampler.__iter__ = recording_iter
    original_train_dataloader = PreTrainingDataModule.train_dataloader

    def marked_train_dataloader(self):
        loader = original_train_dataloader(self)
        loader.batch_sampler.is_training = True  # record the training sampler, not validation's
        return loader

    PreTrainingDataModule.train_dataloader = marked_train_dataloader

    def faulty() -> bool:
        rank = int(os.environ.get("RANK", os.environ.get("LOCAL_RANK", 0)))  # Lightning's launcher sets no RANK
        return args.fault_rank is None or rank == args.fault_rank

    class Record(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            step = trainer.global_step
            if trainer.is_global_zero:
                metrics = trainer.callback_metrics
                with open(os.path.join(args.record, "steps.jsonl"), "a") as f:
                    f.write(json.dumps({"step": step, "loss": float(metrics["reduced_train_loss"]),
                                        "consumed_samples": int(metrics["consumed_samples"]),
                                        "grad_norm": float(metrics.get("grad_norm", float("nan")))}) + "\n")
            if not faulty():
                return
            if step in (args.kill_at_step, args.raise_at_step, args.block_at_step):
                with open(os.path.join(args.record, f"fault-rank{trainer.global_rank}.json"), "w") as f:
                    json.dump({"step": step, "time": time.time()}, f)  # when the fault came, for the tests
            if step == args.kill_at_step:
                print(f"rank {trainer.global_rank}: SIGKILL after step {step}", flush=True)
                os.kill(os.getpid(), signal.SIGKILL)
            if step == args.raise_at_step:
                raise RuntimeError(f"injected fault on rank {trainer.global_rank} after step {step}")
            if step == args.block_at_step:
                print(f"rank {trainer.global_rank}: blocking after step {step}", flush=True)
                if args.block_holding_gil:
                    import ctypes

                    # A PyDLL call keeps the GIL; with SIGTERM blocked, the launcher's SIGTERM does
                    # not cut the sleep short either.
                    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM, signal.SIGINT})
                    ctypes.PyDLL(None).sleep(3600)
                time.sleep(3600)

    if args.raise_before_rendezvous and faulty():
        def fail_setup_environment(self):
            raise RuntimeError("injected fault before the rendezvous")

        MegatronStrategy.setup_environment = fail_setup_environment

    if args.kill_during_save_at_step is not None:
        from megatron.core import dist_checkpointing

        original_save = dist_checkpointing.save

        def save_then_die(state, directory, *a, **kw):
            result = original_save(state, directory, *a, **kw)
            if f"step={args.kill_during_save_at_step:07d}" in str(directory) and faulty():
                for name in sorted(os.listdir(directory)):  # a torn write: truncate the data files
                    if name.endswith(".distcp"):
                        with open(os.path.join(directory, name), "r+b") as f:
                            f.truncate(16)
                os.kill(os.getpid(), signal.SIGKILL)
            return result

        dist_checkpointing.save = save_then_die

    overrides = dict(num_layers=args.num_layers, kernel_backend=args.kernel_backend)
    overrides.update(json.loads(args.model))
    config = preset_config("tiny", **overrides)
    if args.data:
        prefix, tokenizer_dir = args.data, args.tokenizer
    else:
        corpus = default_corpus()
        prefix, tokenizer_dir = corpus.paths, corpus.tokenizer_dir
    data = PreTrainingDataModule(prefix, tokenizer_dir, seq_length=args.seq_length,
                                 micro_batch_size=args.micro_batch_size, global_batch_size=args.global_batch_size)
    module = FalconH1Module(config, falcon_h1_optimizer_config(lr=args.lr),
                            LRSchedule(warmup_steps=2, decay_style="WSD", wsd_decay_fraction=0.5),
                            tokenizer_dir=tokenizer_dir)
    ddp = None
    if args.grad_bucket_size:
        from megatron.core.distributed import DistributedDataParallelConfig

        ddp = DistributedDataParallelConfig(grad_reduce_in_fp32=True, overlap_grad_reduce=True,
                                            use_distributed_optimizer=True, check_for_nan_in_grad=True,
                                            bucket_size=args.grad_bucket_size)
    strategy = MegatronStrategy(tensor_model_parallel_size=args.tp, pipeline_model_parallel_size=args.pp,
                                virtual_pipeline_model_parallel_size=args.vpp, context_parallel_size=args.cp,
                                sequence_parallel=args.sp, async_save=args.async_save, ddp=ddp)
    trainer = build_trainer(args.log_dir, args.max_steps, strategy, precision=args.precision,
                            val_check_interval=args.max_steps, limit_val_batches=2, log_every_n_steps=100,
                            checkpoint_every_n_steps=args.checkpoint_every, keep_last_k=None,
                            save_at_start=args.save_at_start, extra_callbacks=[Record()], devices=args.devices,
                            **({"hang_timeout": args.hang_timeout} if args.hang_timeout is not None else {}))
    resume = AutoResume(resume_if_exists=not args.no_resume, restore_weights_from=args.restore_weights_from)
    result = pretrain(module, data, trainer, resume)
    if trainer.is_global_zero:
        print(json.dumps({"global_step": result.global_step, "checkpoint": str(result.checkpoint),
                          "val_loss": result.val_loss}))


if __name__ == "__main__":
    sys.exit(main())
