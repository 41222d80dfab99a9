"""FalconH1Model: Megatron's LanguageModule + TransformerBlock fed the Falcon-H1 layer spec.

Megatron provides the embedding, the output layer, the vocab-parallel loss, tied embeddings
across pipeline stages, pipeline/virtual-pipeline layer placement, recomputation and
`sharded_state_dict`; this class adds Falcon-H1's embedding and lm_head multipliers and RoPE.
On CUDA the loss is the project's fused cross-entropy (the lm_head multiplier folded in).
"""

from __future__ import annotations

import torch
from megatron.core import tensor_parallel
from megatron.core.models.common.embeddings.language_model_embedding import LanguageModelEmbedding
from megatron.core.models.common.language_module.language_module import LanguageModule
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.transformer.enums import ModelType
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import (
    TransformerBlock,
    TransformerBlockSubmodules,
    get_num_layers_to_build,
)
from megatron.core.utils import get_pg_rank, get_pg_size

from falcon_h1.kernels import _gpu_kernel
from falcon_h1.kernels.cross_entropy import vocab_parallel_cross_entropy
from falcon_h1.model.config import FalconH1Config
from falcon_h1.model.rotary import RotaryEmbedding
from falcon_h1.model.specs import default_layer_spec


class FalconH1Model(LanguageModule):
    """Embedding -> N x (x + HybridMixer(norm(x)); x + MLP(norm(x))) -> norm -> lm_head.

    Args:
        config: the model configuration.
        transformer_layer_spec: layer spec (default: the local spec, see specs.py).
        pre_process / post_process: whether this pipeline stage holds the embedding / the output layer.
        parallel_output: keep logits split over tensor-parallel ranks (for the vocab-parallel loss).
    """

    def __init__(
        self,
        config: FalconH1Config,
        transformer_layer_spec: ModuleSpec | None = None,
        pre_process: bool = True,
        post_process: bool = True,
        parallel_output: bool = True,
        pg_collection: ProcessGroupCollection | None = None,
        vp_stage: int | None = None,
    ):
        super().__init__(config=config, pg_collection=pg_collection)
        layer_spec = transformer_layer_spec or default_layer_spec()
        self.transformer_layer_spec = layer_spec
        self.pre_process, self.post_process = pre_process, post_process
        self.parallel_output = parallel_output
        self.share_embeddings_and_output_weights = config.share_embeddings_and_output_weights
        self.vp_stage = vp_stage
        self.model_type = ModelType.encoder_or_decoder
        self.vocab_size = config.padded_vocab_size
        self.max_sequence_length = config.max_position_embeddings

        if pre_process:
            self.embedding = LanguageModelEmbedding(
                config=config, vocab_size=self.vocab_size, max_sequence_length=self.max_sequence_length,
                position_embedding_type="rope", tp_group=self.pg_collection.tp,
            )
        if config.num_attention_heads:
            self.rotary_pos_emb = RotaryEmbedding(config.kv_channels, config.rotary_base)

        pp_rank = get_pg_rank(self.pg_collection.pp)
        num_layers = get_num_layers_to_build(config, vp_stage=vp_stage, pp_rank=pp_rank)
        self.decoder = TransformerBlock(
            config=config,
            spec=TransformerBlockSubmodules(
                layer_specs=[layer_spec] * num_layers,
                layer_norm=layer_spec.submodules.input_layernorm,
            ),
            pre_process=pre_process,
            post_process=post_process,
            pg_collection=self.pg_collection,
            vp_stage=vp_stage,
        )

        if post_process:
            self.output_layer = tensor_parallel.ColumnParallelLinear(
                config.hidden_size, self.vocab_size, config=config, init_method=config.init_method,
                bias=False, skip_bias_add=False, gather_output=not parallel_output,
                skip_weight_param_allocation=pre_process and self.share_embeddings_and_output_weights,
                tp_group=self.pg_collection.tp,
            )
        if pre_process or post_process:
            self.setup_embeddings_and_output_layer()

    def set_input_tensor(self, input_tensor) -> None:
        """Pipeline schedules hand the previous stage's output in here."""
        if isinstance(input_tensor, (list, tuple)):
            input_tensor = input_tensor[0]
        self.decoder.set_input_tensor(input_tensor)

    def forward(
        self,
        input_ids: torch.Tensor | None,
        position_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        decoder_input: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        packed_seq_params=None,
        inference_context=None,
        runtime_gather_output: bool | None = None,
        loss_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """input_ids [b, s] -> logits [b, s, vocab] or, with labels [b, s], per-token loss [b, s].

        On a pipeline stage without the output layer, returns the hidden states [s, b, h].
        Under context parallelism (size c) input_ids, labels and the output are this rank's
        contiguous chunk of the sequence (CP rank r: tokens r s/c .. (r+1) s/c - 1).
        The causal mask is built in; `attention_mask` is passed through to the attention core.
        RoPE positions are 0 .. s-1 of the whole sequence; `position_ids` is not read.
        """
        if decoder_input is None and self.pre_process:
            decoder_input = self.embedding(input_ids=input_ids, position_ids=None)
            decoder_input = decoder_input * self.config.embedding_multiplier

        rotary_pos_emb = None
        if self.config.num_attention_heads and inference_context is not None:
            # Generation: angles of every cacheable position; each row picks its own (HybridCache).
            rotary_pos_emb = self.rotary_pos_emb(inference_context.max_length, decoder_input.device)
        elif self.config.num_attention_heads:
            local = self.decoder.input_tensor if self.decoder.input_tensor is not None else decoder_input
            seq_len = local.size(0)
            if self.config.sequence_parallel:
                seq_len *= get_pg_size(self.pg_collection.tp)
            # The mixer applies RoPE after trading sequence chunks for heads: whole-sequence angles.
            seq_len *= get_pg_size(self.pg_collection.cp)
            rotary_pos_emb = self.rotary_pos_emb(seq_len, local.device)

        hidden_states = self.decoder(
            hidden_states=decoder_input,
            attention_mask=attention_mask,
            rotary_pos_emb=rotary_pos_emb,
            packed_seq_params=packed_seq_params,
            inference_context=inference_context,
        )
        if not self.post_process:
            return hidden_states

        output_weight = self.shared_embedding_or_output_weight() if self.share_embeddings_and_output_weights else None
        logits, _ = self.output_layer(hidden_states, weight=output_weight, runtime_gather_output=runtime_gather_output)
        if labels is not None and _gpu_kernel(logits, self.config.kernel_backend, "triton"):
            # The multiplier, the padding and the loss in one pass each way (kernels/cross_entropy.py).
            start, valid = self._vocab_slice(logits)
            tp_group = None if logits.shape[-1] == self.vocab_size else self.pg_collection.tp
            loss = vocab_parallel_cross_entropy(logits, labels.transpose(0, 1), self.config.lm_head_multiplier,
                                                valid, start, tp_group)
            return loss.transpose(0, 1).contiguous()
        logits = logits * self.config.lm_head_multiplier
        self._mask_vocab_padding(logits)
        if labels is None:
            logits = logits.transpose(0, 1).contiguous()
            return logits[..., : self.config.vocab_size] if logits.shape[-1] == self.vocab_size else logits
        return self.compute_language_model_loss(labels, logits)

    def _vocab_slice(self, logits: torch.Tensor) -> tuple[int, int]:
        """(first vocabulary id of this rank's logits, how many of its columns are real tokens)."""
        local = logits.shape[-1]
        start = 0 if local == self.vocab_size else get_pg_rank(self.pg_collection.tp) * local
        return start, min(max(self.config.vocab_size - start, 0), local)

    def _mask_vocab_padding(self, logits: torch.Tensor) -> None:
        """Padding rows of the vocabulary (added so TP ranks hold equal slices) must not take
        probability mass: their logits become -inf, in place, so the loss matches the unpadded model."""
        _, valid = self._vocab_slice(logits)
        if valid < logits.shape[-1]:
            logits[..., valid:] = float("-inf")
