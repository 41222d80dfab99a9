"""MegatronStrategy: Megatron Core's parallelism under a pytorch_lightning Trainer.

What it adds to Lightning's DDP strategy (which it reuses for process launch and the process
group):
- Megatron's parallel state (TP, PP with virtual stages, CP, DP) and RNG streams, after a check
  that the world size holds the layout;
- parallel sizes and precision written into the model config before the model is built;
- Megatron DDP (fp32 gradient reduction, distributed optimizer buffers) around each model chunk,
  and the module's OptimizerStep installed as the gradient finalization Megatron's schedules call;
- sharded `torch_dist` checkpoints in the model's canonical layout (so they load at any TP/PP),
  with the optimizer state, optionally written by a background process;
- a CPU (gloo) debug mode.
"""

import contextlib
import dataclasses
import importlib.util
import logging
import time
from functools import partial
from pathlib import Path

import torch
from megatron.core import dist_checkpointing, parallel_state
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
from megatron.core.transformer.module import Float16Module
from lightning_fabric.utilities.imports import _IS_INTERACTIVE
from pytorch_lightning.strategies import DDPStrategy
from pytorch_lightning.trainer.states import TrainerFn

from falcon_h1.compat import cpu
from falcon_h1.compat.megatron import write_results_queue_without_spawn
from falcon_h1.kernels import wgrad_fusion
from falcon_h1.model.config import config_to_hf
from falcon_h1.model.tensor_parallel import sync_replicated_params
from falcon_h1.training import checkpoint_io, checksums
from falcon_h1.training.precision import MegatronMixedPrecision

log = logging.getLogger(__name__)

# The distributed optimizer's state stored per parameter in model space, so it reshards over TP,
# PP and DP like the weights do.
OPTIMIZER_SHARDING = {"distrib_optim_sharding_type": "fully_reshardable"}
# Background checkpoint writers: NVIDIA Resiliency Extension's when installed, else Megatron's own.
_ASYNC_STRATEGY = "nvrx" if importlib.util.find_spec("nvidia_resiliency_ext") else "mcore"


class MegatronStrategy(DDPStrategy):
    """Train a FalconH1Module with Megatron Core's parallelism.

    Args:
        tensor_model_parallel_size, pipeline_model_parallel_size, context_parallel_size: sizes of
            the model-parallel groups; data parallelism takes the remaining ranks.
        virtual_pipeline_model_parallel_size: model chunks per pipeline rank (interleaved 1F1B).
        sequence_parallel: shard activations outside the mixer/MLP over the TP group.
        ddp: Megatron DDP settings (default: fp32 gradient reduction, distributed optimizer buffers,
            overlap of communication on GPU).
        async_save: write checkpoints in a background process while training goes on.
        restore_weights_from: a checkpoint whose weights (only) initialize the model, e.g. for
            fine-tuning or to start several layouts from the same weights.
        fall_back_if_damaged: when the checkpoint to resume from is damaged (its files differ
            from their checksums), resume from the previous complete one, warning, instead of
            stopping. `pretrain` sets it from AutoResume.
        seed: base seed of the parameter initialization and of Megatron's RNG streams.
        gradient_accumulation_fusion: on GPU, each weight-gradient GEMM adds into DDP's float32
            gradient buffer itself (Megatron's gradient_accumulation_fusion, with torch's addmm in
            Apex's place: falcon_h1/kernels/wgrad_fusion.py) instead of writing a bf16 gradient
            that DDP then adds. Off on CPU.
    """

    strategy_name = "megatron"

    def __init__(self, tensor_model_parallel_size: int = 1, pipeline_model_parallel_size: int = 1,
                 virtual_pipeline_model_parallel_size: int | None = None, context_parallel_size: int = 1,
                 sequence_parallel: bool = False, ddp: DistributedDataParallelConfig | None = None,
                 async_save: bool = False, restore_weights_from: str | None = None,
                 fall_back_if_damaged: bool = False, seed: int = 1234, gradient_accumulation_fusion: bool = True,
                 **kwargs):
        super().__init__(**kwargs)
        self.tensor_model_parallel_size = tensor_model_parallel_size
        self.pipeline_model_parallel_size = pipeline_model_parallel_size
        self.virtual_pipeline_model_parallel_size = virtual_pipeline_model_parallel_size
        self.context_parallel_size = context_parallel_size
        self.sequence_parallel = sequence_parallel
        self.gradient_accumulation_fusion = gradient_accumulation_fusion
        self.ddp_config = ddp
        self.async_save = async_save
        self.restore_weights_from = restore_weights_from
        self.fall_back_if_damaged = fall_back_if_damaged
        self.seed = seed
        self._async_queue = None
        self._saving: Path | None = None  # the checkpoint being written

    # ---------------------------------------------------------------- Lightning plumbing

    @property
    def restore_checkpoint_after_setup(self) -> bool:
        return True  # weights and optimizer state load into the Megatron-wrapped model

    @property
    def lightning_restore_optimizer(self) -> bool:
        return True

    def _configure_launcher(self) -> None:
        """One process, or processes torchrun / Slurm started: nothing to launch, which also lets a
        run start from a notebook. More processes from a notebook would need it forked: refuse."""
        if self.num_processes * self.num_nodes == 1 or self.cluster_environment.creates_processes_externally:
            self._launcher = None
            return
        if _IS_INTERACTIVE:
            raise ValueError(
                f"devices={self.num_processes} x num_nodes={self.num_nodes} processes cannot start from a notebook "
                "or an interactive session: launch them with torchrun, e.g. run.run(recipe, executor="
                "run.LocalExecutor(ntasks_per_node=N, launcher='torchrun')), or train with devices=1")
        super()._configure_launcher()

    @property
    def model_parallel_size(self) -> int:
        return self.tensor_model_parallel_size * self.pipeline_model_parallel_size * self.context_parallel_size

    def connect(self, model) -> None:
        """Write the parallel layout and precision into the model config (validated again, so a
        layout the model cannot shard fails here, before any process group exists)."""
        super().connect(model)
        overrides = dict(
            tensor_model_parallel_size=self.tensor_model_parallel_size,
            pipeline_model_parallel_size=self.pipeline_model_parallel_size,
            virtual_pipeline_model_parallel_size=self.virtual_pipeline_model_parallel_size,
            context_parallel_size=self.context_parallel_size,
            sequence_parallel=self.sequence_parallel and self.tensor_model_parallel_size > 1,
            # The model is always wrapped in Megatron DDP here, which gives each weight the main_grad
            # the fused GEMM accumulates into (without it, Megatron's fused backward fails).
            gradient_accumulation_fusion=self.gradient_accumulation_fusion and self.root_device.type == "cuda"
            and wgrad_fusion.install(),
            calculate_per_token_loss=True,
        )
        if (model.config.microbatch_group_size_per_vp_stage or 0) < self.pipeline_model_parallel_size:
            # Megatron derives it from the pipeline size when a config is made; this one was made at PP=1.
            overrides["microbatch_group_size_per_vp_stage"] = self.pipeline_model_parallel_size
        if self.virtual_pipeline_model_parallel_size and self.pipeline_model_parallel_size == 2:
            # With two stages the previous and next stage are the same rank, and a batched exchange
            # issues (send gradient, send activation) while the peer posts (receive activation,
            # receive gradient): matched in order, they would swap. Unbatched isend/irecv are
            # ordered by rank parity and match.
            overrides["batch_p2p_comm"] = False
        precision = self._megatron_precision()
        overrides.update(precision.config_overrides())
        model.config = dataclasses.replace(model.config, **overrides)

    def _megatron_precision(self) -> MegatronMixedPrecision:
        plugin = self.precision_plugin
        if isinstance(plugin, MegatronMixedPrecision):
            return plugin
        if type(plugin).__name__ not in ("Precision",):
            raise ValueError(f"MegatronStrategy handles precision itself; replace the trainer's {type(plugin).__name__} "
                             "with plugins=[MegatronMixedPrecision('bf16-mixed')] and leave Trainer(precision=...) unset")
        return MegatronMixedPrecision("32")

    def setup_environment(self) -> None:
        self._check_world_size()
        super().setup_environment()  # process group (NCCL on GPU, gloo on CPU)
        cuda_graphs = getattr(self.lightning_module.config, "cuda_graph_impl", "none") == "local"
        if self.root_device.type == "cpu":
            if cuda_graphs:
                raise ValueError("cuda_graph_impl='local' (per-layer CUDA graphs) needs GPUs; this run is on CPU. "
                                 "Turn it off: model.config.cuda_graph_impl=none in a recipe, cuda_graphs=false "
                                 "in bench")
            cpu.enable()
        self._initialize_parallel_state()
        # Pipeline stages hold different layers: give each its own initialization stream.
        cpu.model_parallel_manual_seed(self.seed + 100 * parallel_state.get_pipeline_model_parallel_rank(),
                                              use_cudagraphable_rng=cuda_graphs)
        trainer = self.lightning_module.trainer
        # Megatron-style sampling (by data-parallel rank, from consumed_samples) is the data
        # module's; Lightning's DistributedSampler would shard over all ranks instead.
        trainer._accelerator_connector.use_distributed_sampler = False

    def _initialize_parallel_state(self) -> None:
        """Megatron's groups for this layout. A second fit in the same process (a notebook) reuses
        them when the layout is the same and rebuilds them when it is not."""
        sizes = (self.tensor_model_parallel_size, self.pipeline_model_parallel_size, self.context_parallel_size,
                 self.virtual_pipeline_model_parallel_size)
        if parallel_state.model_parallel_is_initialized():
            current = (parallel_state.get_tensor_model_parallel_world_size(),
                       parallel_state.get_pipeline_model_parallel_world_size(),
                       parallel_state.get_context_parallel_world_size(),
                       parallel_state.get_virtual_pipeline_model_parallel_world_size())
            if current == sizes:
                return
            parallel_state.destroy_model_parallel()
        parallel_state.initialize_model_parallel(
            tensor_model_parallel_size=self.tensor_model_parallel_size,
            pipeline_model_parallel_size=self.pipeline_model_parallel_size,
            virtual_pipeline_model_parallel_size=self.virtual_pipeline_model_parallel_size,
            context_parallel_size=self.context_parallel_size,
        )

    def _check_world_size(self) -> None:
        world = self.num_nodes * self.num_processes
        if world % self.model_parallel_size:
            raise ValueError(
                f"{world} processes cannot hold the parallel layout: tensor_model_parallel_size="
                f"{self.tensor_model_parallel_size} x pipeline_model_parallel_size={self.pipeline_model_parallel_size}"
                f" x context_parallel_size={self.context_parallel_size} = {self.model_parallel_size} ranks per model "
                f"replica. Launch a multiple of {self.model_parallel_size} processes (devices x num_nodes) or "
                "change the layout.")

    def setup(self, trainer) -> None:
        self.accelerator.setup(trainer)
        module = self.lightning_module
        self._check_data(trainer)
        self._wrap_model(module)
        if self.restore_weights_from:
            self.load_weights(self.restore_weights_from)
        self.model = module
        if trainer.state.fn == TrainerFn.FITTING:
            self.setup_optimizers(trainer)  # the module makes its OptimizerStep (training/step.py)
            module.config.finalize_model_grads_func = module.optimizer_step.finalize_gradients
        self.setup_precision_plugin()

    def _check_data(self, trainer) -> None:
        """Batch sizes the layout can split, sequences CP can split, token ids the model can embed."""
        data = trainer.datamodule
        if data is None:
            return
        vocab_size = self.lightning_module.config.vocab_size
        tokenizer = getattr(data, "tokenizer", None)
        data_vocab = len(tokenizer) if tokenizer is not None else getattr(data, "vocab_size", None)
        if data_vocab is not None and data_vocab > vocab_size:
            where = getattr(data, "tokenizer_dir", None) or type(data).__name__
            raise ValueError(
                f"the tokenizer ({where}) has {data_vocab} tokens but the model's vocab_size is {vocab_size}: "
                f"token ids >= {vocab_size} have no embedding. Use the tokenizer the model was made for, or a "
                f"model config with vocab_size >= {data_vocab}")
        dp = parallel_state.get_data_parallel_world_size()
        if data.global_batch_size % (data.micro_batch_size * dp):
            raise ValueError(
                f"global_batch_size={data.global_batch_size} is not a multiple of micro_batch_size="
                f"{data.micro_batch_size} x data-parallel size {dp}; pick a global batch that is")
        if data.seq_length % self.context_parallel_size:
            raise ValueError(f"seq_length={data.seq_length} cannot be split over context_parallel_size="
                             f"{self.context_parallel_size}")

    def _wrap_model(self, module) -> None:
        """bf16 (Float16Module) and Megatron DDP around each chunk; their gradient hooks into the config."""
        config = module.config
        on_gpu = self.root_device.type == "cuda"
        ddp_config = self.ddp_config or DistributedDataParallelConfig(
            grad_reduce_in_fp32=self._megatron_precision().grad_reduce_in_fp32,
            overlap_grad_reduce=on_gpu, overlap_param_gather=False,
            use_distributed_optimizer=module.optimizer_config.use_distributed_optimizer,
            check_for_nan_in_grad=True, bucket_size=None if on_gpu else 0)
        chunks = []
        for index, chunk in enumerate(module.chunks):
            if on_gpu:
                chunk.cuda(torch.cuda.current_device())
            sync_replicated_params(chunk, parallel_state.get_tensor_model_parallel_group())
            if config.bf16 or config.fp16:
                chunk = Float16Module(config, chunk)
            chunk = DistributedDataParallel(config=config, ddp_config=ddp_config, module=chunk,
                                            disable_bucketing=index > 0)
            chunk.broadcast_params()
            chunks.append(chunk)
        module.chunks = torch.nn.ModuleList(chunks)
        config.no_sync_func = [c.no_sync for c in chunks] if len(chunks) > 1 else chunks[0].no_sync
        if ddp_config.overlap_grad_reduce:
            config.grad_sync_func = [c.start_grad_sync for c in chunks] if len(chunks) > 1 else chunks[0].start_grad_sync

    def model_to_device(self) -> None:
        pass  # chunks are built on their device and wrapped in setup

    def teardown(self) -> None:
        self.finalize_pending_saves(blocking=True)
        # Keep the model where it is (Lightning's default moves it to CPU, which would detach
        # Megatron DDP's gradient buffers) so it can be used after fit, e.g. in a notebook.
        self._release_training_hooks()
        if self.cluster_environment is not None:
            self.cluster_environment.teardown()

    def _release_training_hooks(self) -> None:
        """Megatron's DDP keeps its gradient hooks in autograd's C++ nodes (grad_accs), the config
        holds functions bound to the module, and the NaN check patches DDP's bucket groups: cycles
        the garbage collector did not break, so a finished run's model, gradient buffers and
        optimizer stayed in memory after the last reference to the module was dropped. The run
        is over (the model still runs forward): drop them."""
        module = self.lightning_module
        if module is None or module.chunks is None:
            return
        for hook in ("finalize_model_grads_func", "no_sync_func", "grad_sync_func"):
            setattr(module.config, hook, None)
        for chunk in module.chunks:
            if isinstance(chunk, DistributedDataParallel):
                chunk.grad_accs.clear()
        nan_check = module.optimizer_step.nan_check if module.optimizer_step is not None else None
        if nan_check is not None:
            nan_check.remove()

    # ---------------------------------------------------------------- checkpoints

    def _model_part(self) -> str:
        """What a checkpoint of this run holds: the adapters alone under LoRA, else all weights."""
        return checkpoint_io.ADAPTERS if self.lightning_module.peft is not None else checkpoint_io.ALL

    def _model_sharded_state_dict(self) -> dict:
        return checkpoint_io.model_sharded_state_dict(self.lightning_module.unwrapped_chunks(), self._model_part())

    def lightning_module_state_dict(self) -> dict:
        return self._model_sharded_state_dict()

    def optimizer_state(self, optimizer) -> dict:
        return optimizer.megatron_optimizer.sharded_state_dict(
            self._model_sharded_state_dict(), is_loading=False, metadata=OPTIMIZER_SHARDING)

    def save_checkpoint(self, checkpoint: dict, filepath, storage_options=None) -> None:
        """Write `checkpoint` (Lightning's dict with sharded model and optimizer states inside) to
        the directory `filepath` under the unfinished marker."""
        path = Path(filepath)
        module = self.lightning_module
        self.finalize_pending_saves(blocking=True)  # one save in flight at a time
        if self.is_global_zero:
            checkpoint_io.begin_save(path)
            data = module.trainer.datamodule
            data_state = checkpoint.get(type(data).__qualname__, {}) if data is not None else {}
            run_info = dict(global_step=checkpoint.get("global_step"),
                            consumed_samples=data_state.get("consumed_samples"),
                            tensor_model_parallel_size=self.tensor_model_parallel_size,
                            pipeline_model_parallel_size=self.pipeline_model_parallel_size,
                            virtual_pipeline_model_parallel_size=self.virtual_pipeline_model_parallel_size,
                            context_parallel_size=self.context_parallel_size,
                            data_parallel_size=parallel_state.get_data_parallel_world_size(),
                            weights_only="optimizer_states" not in checkpoint,
                            saved_at=time.strftime("%Y-%m-%dT%H:%M:%S%z"))
            if module.peft is not None:  # adapters only: they are applied to this base checkpoint
                run_info.update(peft=module.peft.to_dict(),
                                base_checkpoint=str(Path(self.restore_weights_from).resolve()))
            checkpoint_io.write_context(path, config_to_hf(module.config), run_info, module.tokenizer_dir)
        self.barrier("checkpoint-dirs")
        write_results_queue_without_spawn(background=self.async_save)
        checksums.hash_shards_as_written()
        self._saving = path
        with self._stop_on_failed_save():
            request = dist_checkpointing.save(checkpoint, str(path / checkpoint_io.WEIGHTS_DIR),
                                              async_sharded_save=self.async_save, async_strategy=_ASYNC_STRATEGY)
        finish = partial(self._finish_save, path)
        if request is None:
            finish()
            return
        request.add_finalize_fn(finish)
        if self._async_queue is None:
            from megatron.core.dist_checkpointing.strategies.async_utils import AsyncCallsQueue
            self._async_queue = AsyncCallsQueue()
        self._async_queue.schedule_async_request(request)

    def _finish_save(self, path: Path) -> None:
        torch.distributed.barrier()
        if self.is_global_zero:
            checkpoint_io.finish_save(path)
        self._saving = None
        for callback in self.lightning_module.trainer.callbacks:
            on_saved = getattr(callback, "on_checkpoint_complete", None)
            if on_saved is not None:
                on_saved(path)

    def finalize_pending_saves(self, blocking: bool = False) -> None:
        """Finish async saves whose writers are done (all of them with blocking=True)."""
        if self._async_queue is not None:
            with self._stop_on_failed_save():
                self._async_queue.maybe_finalize_async_calls(blocking=blocking)

    @contextlib.contextmanager
    def _stop_on_failed_save(self):
        """A write that fails (out of space, I/O error) ends training with one CheckpointError: what
        the save left is deleted (under its marker), and the previous complete checkpoint stays the
        one to resume from."""
        from torch.distributed.checkpoint.api import CheckpointException  # a BaseException

        try:
            yield
        except (Exception, CheckpointException) as error:
            path, self._saving = self._saving, None
            if path is None or isinstance(error, checkpoint_io.CheckpointError):
                raise
            previous = checkpoint_io.latest_checkpoint(path.parent, resumable=True)
            cause = checkpoint_io.why_save_failed(path, error, previous)
            if self.is_global_zero:
                checkpoint_io.remove_checkpoint(path)
            resume = f"{previous} stays the checkpoint to resume from" if previous else "no checkpoint was kept"
            raise checkpoint_io.CheckpointError(
                f"saving checkpoint {path} failed: {cause}; what it wrote is deleted and {resume}. Fix the cause "
                "(e.g. free space, or a --log-dir / trainer.log_dir elsewhere) and run the same command again to "
                "resume") from error

    def remove_checkpoint(self, filepath) -> None:
        if self.is_global_zero:
            checkpoint_io.remove_checkpoint(filepath)

    def load_checkpoint(self, checkpoint_path, weights_only=None) -> dict:
        """Everything a resumed run needs: model, optimizer and LR schedule, loops, callbacks, data
        position. Loads at any TP/PP/DP: tensors are matched by their canonical keys. The returned
        dict names the checkpoint it came from ("checkpoint_path"): with `fall_back_if_damaged`,
        a damaged checkpoint is left for the previous complete one."""
        path = checkpoint_io.check_loadable(checkpoint_path)
        try:
            checkpoint_io.verify_checksums(path)
        except checkpoint_io.DamagedCheckpoint as error:
            return self.load_checkpoint(checkpoint_io.fall_back_from(error, self.fall_back_if_damaged))
        return dict(self._load_verified(path), checkpoint_path=str(path))

    def _load_verified(self, path: Path) -> dict:
        checkpoint_io.check_same_model(path, config_to_hf(self.lightning_module.config))
        if checkpoint_io.is_weights_only(path):
            raise checkpoint_io.CheckpointError(
                f"checkpoint {path} holds model weights only (no optimizer or data position) and cannot be "
                "resumed from; start a new run from it with AutoResume(restore_weights_from=...)")
        saved_lora, lora = checkpoint_io.lora_of(path), self.lightning_module.peft
        if (saved_lora is None) != (lora is None) or (lora is not None and saved_lora != lora.to_dict()):
            raise checkpoint_io.CheckpointError(
                f"checkpoint {path} was saved with peft={saved_lora} but this run has "
                f"peft={lora.to_dict() if lora else None}; resume with the same scheme or use another directory")
        model_state = self._model_sharded_state_dict()
        template = {"state_dict": model_state}
        if self.lightning_module.trainer.state.fn == TrainerFn.FITTING:
            for opt in self.optimizers:
                _allocate_optimizer_state(opt.megatron_optimizer)
            template["optimizer_states"] = [opt.megatron_optimizer.sharded_state_dict(
                model_state, is_loading=True, metadata=OPTIMIZER_SHARDING) for opt in self.optimizers]
        return checkpoint_io.load_sharded(path, template, verify=False)

    def load_weights(self, checkpoint_path) -> None:
        """Model weights only (fine-tuning, or several layouts from the same initial weights)."""
        path = checkpoint_io.load_model_weights(self.lightning_module.unwrapped_chunks(), checkpoint_path)
        log.info("initialized the model weights from %s", path)

    def load_model_state_dict(self, checkpoint, strict: bool = True) -> None:
        checkpoint_io.apply_model_state(self.lightning_module.unwrapped_chunks(), checkpoint["state_dict"], strict,
                                        self._model_part())

    def load_optimizer_state_dict(self, checkpoint) -> None:
        for optimizer, state in zip(self.optimizers, checkpoint["optimizer_states"]):
            optimizer.megatron_optimizer.load_state_dict(state)


def _allocate_optimizer_state(optimizer) -> None:
    """Give a fresh optimizer the state tensors a checkpoint loads into. Megatron's distributed
    optimizer describes its state from the torch optimizer's, which is empty (no moments, no
    step count) until the first step."""
    inner = getattr(optimizer, "chained_optimizers", [optimizer])
    for opt in inner:
        torch_optimizer = opt.optimizer
        if any(torch_optimizer.state.values()):
            continue
        opt.init_state_fn(torch_optimizer, opt.config)
        for group in torch_optimizer.param_groups:
            for param in group["params"]:
                torch_optimizer.state[param].setdefault("step", torch.tensor(0.0))
