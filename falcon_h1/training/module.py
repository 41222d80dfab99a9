"""FalconH1Module: the LightningModule that trains a Falcon-H1 model with Megatron's schedules.

Lightning owns the loop (steps, validation, callbacks, logging, checkpoint triggers); Megatron
owns a step: `training_step` receives the data iterator, pulls the global batch's micro-batches
and hands them to Megatron's forward-backward schedule (no pipeline, 1F1B, or interleaved
1F1B with virtual stages), which ends by finalizing the gradients; then the optimizer step
(step.py: the gradient norm and NaN/Inf check, the per-token scaling and clipping, AdamW) and
the LR schedule. The model chunks are built lazily in `configure_model`, after MegatronStrategy
has set up the parallel state, and wrapped (bf16, Megatron DDP) by the strategy.
"""

from functools import partial

import pytorch_lightning as pl
import torch
from megatron.core import parallel_state
from megatron.core.optimizer import OptimizerConfig
from megatron.core.pipeline_parallel import get_forward_backward_func
from megatron.core.utils import unwrap_model
from pytorch_lightning.utilities import rank_zero_info

from falcon_h1.arguments import check_learning_rates
from falcon_h1.model.config import FalconH1Config
from falcon_h1.model.lora import LoRA, apply_lora
from falcon_h1.model.model import FalconH1Model
from falcon_h1.model.packing import PackedDocuments
from falcon_h1.training.optim import (
    LRSchedule,
    build_optimizer,
    build_scheduler,
    falcon_h1_optimizer_config,
    resolved_min_lr,
)
from falcon_h1.training.step import DeferredGradCheck, OptimizerStep

# Tensors of a batch each pipeline stage needs: the first stage embeds tokens, the last computes the loss.
FIRST_STAGE_KEYS = ("tokens", "position_ids")
LAST_STAGE_KEYS = ("labels", "loss_mask")
PACKED_KEYS = ("seq_idx", "position_ids")  # packed documents (SFT): every stage's mixers need them


class MegatronOptimizerAdapter:
    """Megatron's optimizer behind the interface Lightning expects of an optimizer.

    Lightning counts `trainer.global_step` in optimizer steps taken through its wrapper, and
    saves and restores optimizer state through the strategy; `OptimizerStep` steps Megatron's
    optimizer (mixed precision main params, distributed optimizer, clipping).
    """

    def __init__(self, optimizer_step: OptimizerStep):
        self.optimizer_step = optimizer_step
        self.megatron_optimizer = optimizer_step.optimizer
        self.defaults: dict = {}

    @property
    def param_groups(self):
        return self.megatron_optimizer.param_groups

    @property
    def state(self):
        return self.megatron_optimizer.state

    def step(self, closure=None):
        if closure is not None:
            closure()
        successful, _, _ = self.optimizer_step.step()
        return successful

    def zero_grad(self, set_to_none: bool = True):
        self.megatron_optimizer.zero_grad(set_to_none)

    def state_dict(self):
        return self.megatron_optimizer.state_dict()

    def load_state_dict(self, state_dict):
        self.megatron_optimizer.load_state_dict(state_dict)


class FalconH1Module(pl.LightningModule):
    """Trains a FalconH1Model under MegatronStrategy.

    Args:
        config: the model configuration; parallel sizes and precision are filled in by the strategy.
        optimizer: Megatron's OptimizerConfig (default: AdamW 0.9/0.95, clip 1.0, distributed).
        lr_schedule: warm-up and decay of the learning rate (default: WSD).
        tokenizer_dir: a Hugging Face tokenizer directory stored with every checkpoint.
        peft: a LoRA scheme: the base weights are frozen, only the adapters train, and
            checkpoints hold the adapters alone (with the path of the base checkpoint).
        triton_adamw: on CUDA with bf16 weights, AdamW steps in one Triton kernel that also
            writes the bf16 model weights (optim.TritonAdamW); False: torch's fused AdamW, then
            a copy of the main weights into the model's.
    """

    def __init__(self, config: FalconH1Config, optimizer: OptimizerConfig | None = None,
                 lr_schedule: LRSchedule | None = None, tokenizer_dir: str | None = None,
                 peft: LoRA | None = None, triton_adamw: bool = True):
        super().__init__()
        self.config = config
        self.peft = peft
        self.triton_adamw = triton_adamw
        self.optimizer_config = optimizer or falcon_h1_optimizer_config()
        check_learning_rates(self.optimizer_config.lr, self.optimizer_config.min_lr)
        self.lr_schedule = lr_schedule or LRSchedule()
        self.tokenizer_dir = tokenizer_dir
        self.automatic_optimization = False
        self.chunks: torch.nn.ModuleList | None = None  # one per virtual pipeline stage
        self.scheduler = None
        self.optimizer_step: OptimizerStep | None = None  # made with the optimizer
        self._cuda_graphs_reported = False

    # ---------------------------------------------------------------- model

    def configure_model(self) -> None:
        """Build this rank's model chunks (one per virtual pipeline stage); called once by Lightning
        after the parallel state exists."""
        if self.chunks is not None:
            return
        vp_size = self.config.virtual_pipeline_model_parallel_size or 1
        chunks = []
        for vp_stage in range(vp_size):
            chunks.append(FalconH1Model(
                self.config,
                pre_process=parallel_state.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vp_stage),
                post_process=parallel_state.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vp_stage),
                vp_stage=vp_stage if vp_size > 1 else None,
            ))
            if self.peft is not None:
                apply_lora(chunks[-1], self.peft)
        self.chunks = torch.nn.ModuleList(chunks)

    def _report_cuda_graphs(self) -> None:
        """Megatron records the layers' first step and captures their graphs at its end."""
        runners = [runner for module in self.chunks.modules() if hasattr(module, "cudagraph_manager")
                   for runner in module.cudagraph_manager.cudagraph_runners]
        captured = sum(runner.cudagraph_created for runner in runners)
        rank_zero_info(f"CUDA graphs: captured {captured} of {len(runners)} layer runners (forward and backward "
                       "each); later steps replay them")
        self._cuda_graphs_reported = True

    def teardown(self, stage: str) -> None:
        if stage == "fit" and self.config.cuda_graph_impl == "local":
            # The layers hold their runners (graphs, static buffers) and Megatron keeps the record
            # and pool in globals; dropping them lets a later fit in this process record its own,
            # and evaluation after this one runs eagerly. (The strategy's teardown releases the
            # training hooks that kept a dropped model alive: docs/architecture.md.)
            from megatron.core.transformer.cuda_graphs import delete_cuda_graphs

            for module in self.chunks.modules():
                if hasattr(module, "cudagraph_manager"):
                    module.cudagraph_manager.cudagraph_runners.clear()
            delete_cuda_graphs()  # collects garbage and empties the CUDA cache

    def unwrapped_chunks(self) -> list[FalconH1Model]:
        """The FalconH1Model inside each (bf16, DDP) wrapper."""
        return unwrap_model(list(self.chunks))

    def forward(self, input_ids, position_ids=None, labels=None):
        """Single-stage convenience forward (logits, or per-token loss given labels)."""
        return self.chunks[0](input_ids, position_ids, labels=labels)

    # ---------------------------------------------------------------- optimization

    def setup(self, stage: str) -> None:
        if stage == "fit":  # a schedule that does not fit the run fails here, before the model is built
            self.lr_schedule.steps(self.trainer.max_steps)
            resolved_min_lr(self.optimizer_config)

    def configure_optimizers(self):
        """Megatron's optimizer and the OptimizerStep that finalizes the gradients and steps it (the
        strategy installs its finalize_gradients into Megatron's schedule). The LR schedule is
        stepped by training_step and checkpointed by on_save_checkpoint, not by Lightning."""
        optimizer = build_optimizer(self.optimizer_config, list(self.chunks), self.config, self.triton_adamw)
        check_for_nan = all(getattr(chunk, "ddp_config", None) and chunk.ddp_config.check_for_nan_in_grad
                            for chunk in self.chunks)
        self.optimizer_step = OptimizerStep(optimizer, DeferredGradCheck(self.chunks) if check_for_nan else None)
        adapter = MegatronOptimizerAdapter(self.optimizer_step)
        self.scheduler = build_scheduler(adapter, self.optimizer_config, self.lr_schedule, self.trainer.max_steps)
        return adapter

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        if self.scheduler is not None:
            checkpoint["lr_scheduler"] = self.scheduler.state_dict()

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        # Checkpoints written before the schedule was the module's hold it in Lightning's list.
        state = checkpoint.get("lr_scheduler") or (checkpoint.get("lr_schedulers") or [None])[0]
        if state is not None and self.scheduler is not None:
            self.scheduler.load_state_dict(state)

    # ---------------------------------------------------------------- steps

    def training_step(self, dataloader_iter):
        micro_batches = self._next_global_batch(dataloader_iter)
        for chunk in self.chunks:
            chunk.zero_grad_buffer()
        optimizer = self.optimizers()
        optimizer.zero_grad()
        losses = self._forward_backward(micro_batches, forward_only=False)
        optimizer.step()
        self.scheduler.step(1)
        if self.config.cuda_graph_impl == "local" and not self._cuda_graphs_reported:
            self._report_cuda_graphs()

        loss = self._reduce_loss(losses)
        lr = self.scheduler.get_lr(self.scheduler.optimizer.param_groups[0])
        self.log("reduced_train_loss", loss, prog_bar=True, batch_size=1)
        self.log("lr", lr, prog_bar=True, batch_size=1)
        if self.optimizer_step.grad_norm is not None:
            self.log("grad_norm", float(self.optimizer_step.grad_norm), batch_size=1)
        self.log("consumed_samples", float(self._consumed_samples_after_step()), batch_size=1)
        return loss

    def validation_step(self, dataloader_iter):
        self._evaluation_step(dataloader_iter)

    def on_validation_epoch_start(self) -> None:
        self._eval_sums = []

    def on_validation_epoch_end(self) -> None:
        val_loss = self._log_evaluation("val_loss")
        if val_loss is not None and self.trainer.sanity_checking and self.logger is not None \
                and self.trainer.is_global_zero:
            # Lightning drops metrics logged during the sanity check; that pass is the validation
            # before any update, so keep it in the logs as the step-0 (or resumed-step) value.
            self.logger.log_metrics({"val_loss": float(val_loss)}, step=self.trainer.global_step)

    def _evaluation_step(self, dataloader_iter) -> None:
        micro_batches = self._next_global_batch(dataloader_iter)
        with torch.no_grad():
            losses = self._forward_backward(micro_batches, forward_only=True)
        self._eval_sums.append(self._sum_losses(losses))

    def _log_evaluation(self, name: str) -> torch.Tensor | None:
        if not self._eval_sums:
            return None
        loss = self._finish_loss(torch.stack(self._eval_sums).sum(0))
        self.log(name, loss, prog_bar=True, batch_size=1, sync_dist=False)  # already reduced over ranks
        return loss

    # ---------------------------------------------------------------- internals

    def _consumed_samples_after_step(self) -> int:
        data = self.trainer.datamodule
        return self.trainer.global_step * data.global_batch_size  # global_step counts this step already

    def _next_global_batch(self, dataloader_iter) -> list[dict]:
        """This data-parallel rank's share of the next global batch (one data loader item), cut
        into micro-batches. Every pipeline stage reads it, so all ranks stay at the same sample;
        each stage keeps only the tensors it uses."""
        batch, _, _ = next(dataloader_iter)
        size = self.trainer.datamodule.micro_batch_size
        count = len(next(iter(batch.values()))) // size
        return [self._stage_batch({key: value[i * size:(i + 1) * size] for key, value in batch.items()})
                for i in range(count)]

    def _stage_batch(self, batch: dict) -> dict:
        keys = set()
        if parallel_state.is_pipeline_first_stage(ignore_virtual=True):
            keys.update(FIRST_STAGE_KEYS)
        if parallel_state.is_pipeline_last_stage(ignore_virtual=True):
            keys.update(LAST_STAGE_KEYS)
        if self.config.virtual_pipeline_model_parallel_size:
            keys.update(FIRST_STAGE_KEYS + LAST_STAGE_KEYS)  # chunks of both ends may live here
        cp, cp_rank = parallel_state.get_context_parallel_world_size(), parallel_state.get_context_parallel_rank()
        if "seq_idx" in batch:
            if cp > 1:
                raise ValueError("packed documents (SFT data) train without context parallelism; set CP=1")
            keys.update(PACKED_KEYS)
        device = self._data_device()
        out = {}
        for key in keys:
            tensor = batch[key]
            if cp > 1:  # each context-parallel rank holds one contiguous chunk of the sequence
                chunk = tensor.shape[1] // cp
                tensor = tensor[:, cp_rank * chunk:(cp_rank + 1) * chunk]
            out[key] = tensor.to(device, non_blocking=True)
        return out

    def _data_device(self) -> torch.device:
        return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")

    def _forward_backward(self, micro_batches: list[dict], forward_only: bool):
        data = self.trainer.datamodule
        chunks = list(self.chunks)
        if len(chunks) > 1:  # the interleaved schedule reads every micro-batch once per chunk
            data_iterator = [iter(micro_batches) for _ in chunks]
        else:
            data_iterator = iter(micro_batches)
        seq_length = data.seq_length // parallel_state.get_context_parallel_world_size()
        return get_forward_backward_func()(
            forward_step_func=self._forward_step,
            data_iterator=data_iterator,
            model=chunks if len(chunks) > 1 else chunks[0],
            num_microbatches=len(micro_batches),
            seq_length=seq_length,
            micro_batch_size=data.micro_batch_size,
            forward_only=forward_only,
        )

    @staticmethod
    def _forward_step(data_iterator, model):
        batch = next(data_iterator)
        packed = PackedDocuments(batch["seq_idx"], batch["position_ids"]) if "seq_idx" in batch else None
        output = model(batch.get("tokens"), batch.get("position_ids"), labels=batch.get("labels"),
                       packed_seq_params=packed)
        return output, partial(_masked_token_loss, batch.get("loss_mask"))

    def _sum_losses(self, losses) -> torch.Tensor:
        """[sum of token losses, number of tokens] over this rank's micro-batches (zeros off the last stage)."""
        total = torch.zeros(2, dtype=torch.float64, device=self._data_device())
        for item in losses or []:
            total += item["lm loss"].to(total)
        return total

    def _finish_loss(self, total: torch.Tensor) -> torch.Tensor:
        """Mean token loss over the global batch: summed over data- and context-parallel ranks,
        then sent from the last pipeline stage to the others so every rank logs the same value."""
        torch.distributed.all_reduce(total, group=parallel_state.get_data_parallel_group(with_context_parallel=True))
        if parallel_state.get_pipeline_model_parallel_world_size() > 1:
            torch.distributed.broadcast(total, src=parallel_state.get_pipeline_model_parallel_last_rank(),
                                        group=parallel_state.get_pipeline_model_parallel_group())
        return (total[0] / total[1].clamp(min=1)).float().cpu()

    def _reduce_loss(self, losses) -> torch.Tensor:
        return self._finish_loss(self._sum_losses(losses))


def _masked_token_loss(loss_mask: torch.Tensor, per_token_loss: torch.Tensor):
    """Megatron's per-token loss contract: (sum of losses, number of tokens, values to report).
    With `calculate_per_token_loss`, Megatron divides the gradients by the global token count."""
    mask = loss_mask.reshape(-1).float()
    loss_sum = (per_token_loss.reshape(-1).float() * mask).sum()
    num_tokens = mask.sum().to(torch.int)
    report = torch.stack([loss_sum.detach(), mask.sum()])
    return loss_sum, num_tokens, {"lm loss": report}
