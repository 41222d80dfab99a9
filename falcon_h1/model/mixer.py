"""HybridMixer: attention heads and Mamba-2 heads side by side on the same normalized input.

    h --(one column-parallel GEMM)--> [q k v | z x B C dt]          (µP input multipliers)
        attention: RoPE(q), RoPE(k * key_mult), GQA causal attention          -> a
        Mamba-2:   conv1d+SiLU over [x B C] -> SSD scan (+ D x) -> gate by z -> s
    [a * attention_out_mult | s * ssm_out_mult] --(one row-parallel GEMM)--> out

The multipliers cost no pass over the activations: the input ones scale the in-projection's
weight rows (scaled_linear.py), attention_out_mult scales the v rows with them (attention is
linear in v), and ssm_out_mult scales the gated norm's weight.

One fused in-projection and one fused out-projection compute the same function as Hugging Face's
separate q/k/v/o and mamba in/out projections, with half the GEMM launches and, under tensor and
sequence parallelism, one all-gather in and one reduce-scatter out per layer. Which rows and
columns each TP rank holds is defined in layout.py; docs/architecture.md draws it. Under context
parallelism the cores run on the whole sequence for a share of the heads (context_parallel.py).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from megatron.core import tensor_parallel
from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.spec_utils import ModuleSpec, build_module
from megatron.core.transformer.utils import ensure_metadata_has_dp_cp_group
from megatron.core.utils import (
    get_pg_rank,
    get_pg_size,
    make_sharded_tensor_for_checkpoint,
    make_tp_sharded_tensor_for_checkpoint,
)
from torch.utils.checkpoint import checkpoint

from falcon_h1.kernels import causal_conv1d, gated_rms_norm, rotary, ssd_scan
from falcon_h1.model.config import megatron_config
from falcon_h1.model.context_parallel import heads_to_sequence, sequence_to_heads
from falcon_h1.model.decode_cache import attend_to_cache, conv_step, ssm_step, store_keys_values
from falcon_h1.model.layout import Segment, context_parallel_layout, mixer_layout
from falcon_h1.model.lora import AdapterDict, add_adapter
from falcon_h1.model.packing import PackedDocuments
from falcon_h1.model.scaled_linear import row_scaled_linear
from falcon_h1.model.tensor_parallel import group_sum_across_ranks, mark_replicated_rows, sync_replicated_params
from falcon_h1.model.utils import buffer_for_autograd, param_device


@dataclass
class HybridMixerSubmodules:
    in_proj: ModuleSpec | type = None
    core_attention: ModuleSpec | type = None
    out_proj: ModuleSpec | type = None


class HybridMixer(MegatronModule):
    """The token mixer of a Falcon-H1 layer, used as TransformerLayer's `self_attention`."""

    def __init__(self, config, submodules: HybridMixerSubmodules, layer_number: int,
                 pg_collection: ProcessGroupCollection | None = None, cp_comm_type: str | None = None,
                 pp_layer_offset: int | None = None, name: str | None = None):
        super().__init__(config=config)
        self.layer_number = layer_number
        if pg_collection is None:
            pg_collection = ProcessGroupCollection.use_mpu_process_groups()
        self.tp_group, self.cp_group = pg_collection.tp, pg_collection.cp
        tp_size, tp_rank = get_pg_size(self.tp_group), get_pg_rank(self.tp_group)
        cp_size = get_pg_size(self.cp_group)
        # `layout`: the parameters this rank holds; `core`: the heads its cores compute.
        self.layout = layout = mixer_layout(config, tp_size, tp_rank)
        self.cp = None
        self.core = layout
        if cp_size > 1:
            self.cp = context_parallel_layout(config, layout, cp_size, get_pg_rank(self.cp_group))
            self.core = self.cp.core
        # The gated norm's statistics of a group spread over ranks are summed over TP (x CP).
        self.norm_group = pg_collection.tp_cp if cp_size > 1 else self.tp_group
        core = self.core
        device, dtype = param_device(config), config.params_dtype

        def parameter(tensor: torch.Tensor, tensor_parallel_rows: bool = True) -> torch.nn.Parameter:
            param = torch.nn.Parameter(tensor.to(device=device, dtype=dtype))
            if tensor_parallel_rows:
                tensor_parallel.set_tensor_model_parallel_attributes(param, True, 0, 1)
            return param

        # One GEMM for both streams. Biases stay outside the GEMM: attention and SSM have separate
        # bias flags, and µP multiplies the GEMM output before the bias is added.
        self.in_proj = build_module(
            submodules.in_proj, config.hidden_size, layout.in_proj_rows * tp_size, config=config,
            init_method=config.init_method, gather_output=False, bias=False, skip_bias_add=True,
            is_expert=False, tp_comm_buffer_name="mixer_in", tp_group=self.tp_group,
        )
        mark_replicated_rows(self.in_proj.weight, layout.in_proj)
        self.qkv_bias = self.ssm_in_bias = None
        if config.attention_bias and layout.attention_segments:
            self.qkv_bias = parameter(torch.zeros(layout.attention_rows))
            mark_replicated_rows(self.qkv_bias, layout.attention_segments)
        if config.mamba_proj_bias and layout.ssm_segments:
            self.ssm_in_bias = parameter(torch.zeros(layout.in_proj_rows - layout.attention_rows))
            mark_replicated_rows(self.ssm_in_bias, layout.ssm_segments)
        scale, bias_scale, all_ones = self._input_multipliers(config, layout.in_proj)
        # Multipliers of 1 on every row (the 1.5B preset) need no scaling pass over the weight.
        self.register_buffer("in_proj_scale", None if all_ones else scale.to(device), persistent=False)
        self.register_buffer("in_proj_bias_scale", bias_scale.to(device), persistent=False)

        if layout.attention_heads:
            # The core sees the heads this rank computes, whatever the split (layout.py), and the
            # whole sequence: context parallelism is done here, not inside the core.
            self.core_attention = build_module(
                submodules.core_attention, config=megatron_config(config, core, context_parallel_size=1),
                layer_number=layer_number, attn_mask_type=AttnMaskType.causal, attention_type="self",
                softmax_scale=layout.head_dim ** -0.5, k_channels=layout.head_dim,
                v_channels=layout.head_dim, cp_comm_type=cp_comm_type, pg_collection=pg_collection,
            )
        # Selective recompute of the attention core, as Megatron's Attention does for "core_attn".
        self.recompute_core_attention = bool(layout.attention_heads) and (
            config.recompute_granularity == "selective" and "core_attn" in (config.recompute_modules or ()))

        if layout.mamba_heads:
            heads = layout.mamba_heads
            channels = sum(s.rows for s in layout.conv)
            self.conv1d = torch.nn.Conv1d(
                channels, channels, config.mamba_conv_kernel, groups=channels,
                bias=config.mamba_conv_bias, padding=config.mamba_conv_kernel - 1,
                device=device, dtype=dtype,
            )
            for param in self.conv1d.parameters():
                tensor_parallel.set_tensor_model_parallel_attributes(param, True, 0, 1)
                mark_replicated_rows(param, layout.conv)
            A_log, dt_bias = self._mamba_init(config, layout)
            self.A_log = parameter(A_log)
            self.dt_bias = parameter(dt_bias)
            self.D = parameter(torch.ones(heads))
            self.norm_weight = parameter(torch.ones(layout.d_ssm)) if config.mamba_rms_norm else None
            if self.cp is not None:
                # Conv channels of this CP rank's x rows and B, C groups, among the [x B C] channels.
                start, index = 0, []
                for seg in layout.conv:
                    rows = self.cp.rows[seg.name]
                    index.append(torch.arange(start + rows.start, start + rows.stop))
                    start += seg.rows
                self.register_buffer("cp_conv_channels", torch.cat(index).to(device), persistent=False)

        self.out_proj = build_module(
            submodules.out_proj, layout.out_proj_cols * tp_size, config.hidden_size, config=config,
            init_method=config.output_layer_init_method, bias=False, input_is_parallel=True,
            skip_bias_add=True, is_expert=False, tp_comm_buffer_name="mixer_out", tp_group=self.tp_group,
        )
        self.attn_out_bias = self.ssm_out_bias = None
        if config.attention_bias and layout.attention_heads:
            self.attn_out_bias = parameter(torch.zeros(config.hidden_size), tensor_parallel_rows=False)
        if config.projectors_bias and layout.mamba_heads:
            self.ssm_out_bias = parameter(torch.zeros(config.hidden_size), tensor_parallel_rows=False)
        for bias in (self.attn_out_bias, self.ssm_out_bias):
            if bias is not None:
                setattr(bias, "sequence_parallel", config.sequence_parallel)

        self.adapters = AdapterDict()  # LoRA on in_proj / out_proj (lora.py)
        if tp_size > 1 and torch.distributed.is_initialized():
            sync_replicated_params(self, self.tp_group)

    @staticmethod
    def _input_multipliers(config, segments: tuple[Segment, ...]):
        """Per-row scale of the in-projection output, of its bias, and whether the first is all ones.

        HF computes q = q_proj(h * attn_in), k = k_proj(h * attn_in) * key_mult,
        [z x B C dt] = mamba.in_proj(h * ssm_in) * ssm_multipliers: a row's GEMM output is scaled
        by in * post, its bias by post only. The attention output multiplier goes on v."""
        a_in, s_in = config.attention_in_multiplier, config.ssm_in_multiplier
        post = dict(q=1.0, k=config.key_multiplier, v=config.attention_out_multiplier,
                    **dict(zip(("z", "x", "B", "C", "dt"), config.ssm_multipliers)))
        pre = dict(q=a_in, k=a_in, v=a_in, z=s_in, x=s_in, B=s_in, C=s_in, dt=s_in)
        scale = torch.cat([torch.full((s.rows,), pre[s.name] * post[s.name]) for s in segments])
        bias_scale = torch.cat([torch.full((s.rows,), post[s.name]) for s in segments])
        return scale, bias_scale, all(pre[s.name] * post[s.name] == 1 for s in segments)

    @staticmethod
    def _mamba_init(config, layout):
        """Mamba-2 initialisation, drawn for all heads and sliced, so it does not depend on TP:
        A uniform in [1, 16]; dt log-uniform in [1e-3, 1e-1] stored as softplus^-1(dt)."""
        heads = config.mamba_num_heads
        A = torch.empty(heads).uniform_(1.0, 16.0)
        dt = torch.exp(torch.rand(heads) * (math.log(0.1) - math.log(1e-3)) + math.log(1e-3)).clamp(min=1e-4)
        dt_bias = dt + torch.log(-torch.expm1(-dt))
        local = slice(layout.mamba_head_offset, layout.mamba_head_offset + layout.mamba_heads)
        return torch.log(A)[local], dt_bias[local]

    # ------------------------------------------------------------------ forward

    def forward(self, hidden_states, attention_mask=None, inference_context=None, rotary_pos_emb=None,
                rotary_pos_cos=None, rotary_pos_sin=None, rotary_pos_cos_sin=None, attention_bias=None,
                packed_seq_params=None, sequence_len_offset=None, **unused):
        """hidden_states [s, b, h] (s / TP under sequence parallelism, s = this rank's chunk of the
        sequence under context parallelism) -> (out [s, b, h], bias). rotary_pos_emb covers the
        whole sequence."""
        cache = inference_context  # generation: a falcon_h1.model.decode_cache.HybridCache
        if cache is not None and (self.cp is not None or self.config.sequence_parallel):
            raise NotImplementedError("generation runs without context or sequence parallelism")
        packed = packed_seq_params if isinstance(packed_seq_params, PackedDocuments) else None
        if packed is not None and self.cp is not None:
            raise NotImplementedError("packed documents run without context parallelism")
        core = self.core
        in_scale = buffer_for_autograd(self.in_proj_scale, self.config)
        # [s, b, rows], multipliers applied; all-gathered over TP under SP
        proj, _ = row_scaled_linear(self.in_proj, hidden_states, in_scale)
        if "in_proj" in self.adapters:
            lora = self.adapters["in_proj"](hidden_states)
            proj = proj + (lora if in_scale is None else lora * in_scale).to(proj.dtype)
        in_bias = self._in_proj_bias()
        if in_bias is not None:
            proj = proj + (in_bias * buffer_for_autograd(self.in_proj_bias_scale, self.config)).to(proj.dtype)
        if self.cp is not None:
            proj = sequence_to_heads(proj, self.layout.in_proj, self.cp, self.cp_group)

        qkv, zxbcdt = self._split_in_proj(proj)
        streams = []
        if core.attention_heads:
            if cache is not None:
                attn = self._attention_with_cache(*qkv, rotary_pos_emb, cache)
            elif packed is not None:
                attn = self._attention_packed(*qkv, rotary_pos_emb, packed)
            else:
                attn = self._attention(*qkv, rotary_pos_emb, attention_mask, packed_seq_params)
            streams.append(attn)  # attention_out_multiplier is in v
        if core.mamba_heads:
            if cache is not None:
                ssm = self._ssm_with_cache(*zxbcdt, cache)
            else:
                ssm = self._ssm(*zxbcdt, seq_idx=None if packed is None else packed.seq_idx)
            streams.append(ssm)  # ssm_out_multiplier is applied by _ssm_output
        mixed = torch.cat(streams, dim=-1) if len(streams) > 1 else streams[0]
        if self.cp is not None:
            mixed = heads_to_sequence(mixed, (core.attention_out_cols, core.d_ssm), self.cp_group)
        out, _ = self.out_proj(mixed)
        out = add_adapter(self, "out_proj", mixed, out)
        return out, self._out_bias()

    def _in_proj_bias(self):
        if self.qkv_bias is None and self.ssm_in_bias is None:
            return None
        layout, parts = self.layout, []
        for bias, rows in ((self.qkv_bias, layout.attention_rows),
                           (self.ssm_in_bias, layout.in_proj_rows - layout.attention_rows)):
            if rows:
                parts.append(bias if bias is not None else self.in_proj_bias_scale.new_zeros(rows))
        return torch.cat(parts)

    def _out_bias(self):
        bias = None
        for param, multiplier in ((self.attn_out_bias, self.config.attention_out_multiplier),
                                  (self.ssm_out_bias, self.config.ssm_out_multiplier)):
            if param is not None:
                bias = param * multiplier if bias is None else bias + param * multiplier
        return bias

    def _split_in_proj(self, proj):
        """proj [s, b, rows] -> (q, k, v) [s, b, heads, head_dim] and (z, xBC, dt) [s, b, .], in one
        split: its backward writes the in-projection's gradient in one pass, where nested slices
        each zero-fill a gradient of proj's size and add them (8 ms of a 1.5B step at 8192 tokens)."""
        layout = self.core
        s, b = proj.shape[:2]
        hd = layout.head_dim
        heads, p, n, groups, d = self._ssm_dims()
        q_rows, kv_rows = layout.attention_heads * hd, layout.kv_heads * hd
        q, k, v, z, xBC, dt = proj.split([q_rows, kv_rows, kv_rows, d, d + 2 * groups * n, heads], dim=-1)
        qkv = (q.reshape(s, b, layout.attention_heads, hd), k.reshape(s, b, layout.kv_heads, hd),
               v.reshape(s, b, layout.kv_heads, hd))
        return qkv, (z, xBC, dt)

    def _rotary(self, q, k, freqs):
        return (rotary(q, freqs, backend=self.config.kernel_backend),
                rotary(k, freqs, backend=self.config.kernel_backend))

    def _core_attention(self, q, k, v, attention_mask, packed_seq_params):
        if self.recompute_core_attention and self.training:
            # Keep q, k, v; recompute scores and softmax in backward. Megatron's RNG tracker is not
            # forked: Falcon-H1 has no attention dropout (checkpoint restores torch's RNG anyway).
            return checkpoint(self.core_attention, q, k, v, attention_mask, use_reentrant=False,
                              attn_mask_type=AttnMaskType.causal, packed_seq_params=packed_seq_params)
        return self.core_attention(q, k, v, attention_mask, attn_mask_type=AttnMaskType.causal,
                                   packed_seq_params=packed_seq_params)

    def _attention_output(self, out):
        """[s, b, heads * head_dim] -> the columns this rank feeds to the out-projection."""
        layout = self.core
        if layout.attention_replicas > 1:
            # Replicas of these heads each feed their own part of head_dim to the out-projection.
            s, b = out.shape[:2]
            out = out.reshape(s, b, layout.attention_heads, layout.head_dim)[..., layout.attention_out_dims]
            out = out.reshape(s, b, -1)
        return out

    def _attention(self, q, k, v, rotary_pos_emb, attention_mask, packed_seq_params):
        q, k = self._rotary(q, k, rotary_pos_emb)
        return self._attention_output(self._core_attention(q, k, v, attention_mask, packed_seq_params))

    def _attention_packed(self, q, k, v, rotary_table, packed):
        """Packed documents: RoPE from each token's position in its document, attention within
        the document (a block-diagonal causal mask)."""
        s, b = q.shape[:2]
        q, k = self._rotary(q, k, rotary_table[packed.position_ids.T].squeeze(2))  # angles [s, b, 1, d]
        out = F.scaled_dot_product_attention(
            *(t.permute(1, 2, 0, 3) for t in (q, k, v)), attn_mask=packed.attention_mask(),
            dropout_p=self.config.attention_dropout if self.training else 0.0, scale=self.core.head_dim ** -0.5,
            enable_gqa=k.shape[2] != q.shape[2])
        return self._attention_output(out.permute(2, 0, 1, 3).reshape(s, b, -1))

    def _attention_with_cache(self, q, k, v, rotary_table, cache):
        """Generation: RoPE at each row's own positions, keys/values appended to the cache; a prompt
        (prefill) attends causally to itself, a new token to its row's cached keys."""
        s, b = q.shape[:2]
        q, k = self._rotary(q, k, rotary_table[cache.positions(s)].squeeze(2))  # angles [s, b, 1, d]
        layer = cache.layer(self.layer_number)
        store_keys_values(cache, layer, k, v)
        if cache.prefilling:
            out = self._core_attention(q, k, v, None, None)
        else:
            out = attend_to_cache(cache, layer, q, scale=self.core.head_dim ** -0.5).reshape(s, b, -1)
        return self._attention_output(out)

    def _ssm_dims(self):
        """(heads, head_dim, state_dim, groups, d_ssm) of the Mamba heads this rank computes."""
        layout = self.core
        return layout.mamba_heads, layout.mamba_head_dim, layout.state_dim, layout.ssm_groups, layout.d_ssm

    def _ssm(self, z, xBC, dt, seq_idx=None):
        s, b = z.shape[:2]
        heads, p, n, groups, d = self._ssm_dims()
        params = self._core_mamba_params()
        if self.config.recompute_ssd_scan and self.training:
            # Keep xBC and dt; the conv output and the scan's saved tensors are recomputed in backward.
            y = checkpoint(self._conv_and_scan, xBC.permute(1, 2, 0), dt, params, seq_idx, use_reentrant=False)
        else:
            y = self._conv_and_scan(xBC.permute(1, 2, 0), dt, params, seq_idx=seq_idx)
        return self._ssm_output(y.reshape(b, s, d), z, params[-1])

    def _conv_and_scan(self, xBC, dt, params, seq_idx=None, return_final_state=False):
        """Causal conv + SiLU, then the chunked SSD scan: xBC [b, channels, s], raw dt [s, b, heads]
        -> y [b, s, heads, head_dim] (and the state after the last token if asked)."""
        config = self.config
        heads, p, n, groups, d = self._ssm_dims()
        conv_weight, conv_bias, A_log, D, dt_bias, _ = params
        b, _, s = xBC.shape
        conv = causal_conv1d(xBC, conv_weight, conv_bias, seq_idx=seq_idx, backend=config.kernel_backend)
        x, B, C = conv.transpose(1, 2).split([d, groups * n, groups * n], dim=-1)
        return ssd_scan(
            x.reshape(b, s, heads, p), dt.transpose(0, 1), -torch.exp(A_log.float()),
            B.reshape(b, s, groups, n), C.reshape(b, s, groups, n),
            chunk_size=config.mamba_chunk_size, D=D, dt_bias=dt_bias, dt_limit=config.mamba_time_step_limit,
            seq_idx=seq_idx, return_final_state=return_final_state, backend=config.kernel_backend,
        )

    def _ssm_with_cache(self, z, xBC, dt, cache):
        """Generation: a prompt (prefill) runs the chunked scan and leaves its final conv and SSM
        states in the cache; a new token takes one recurrent step from them."""
        s, b = z.shape[:2]
        heads, p, n, groups, d = self._ssm_dims()
        params = self._core_mamba_params()
        conv_weight, conv_bias, A_log, D, dt_bias, norm_weight = params
        layer = cache.layer(self.layer_number)
        if cache.prefilling:
            inputs = xBC.permute(1, 2, 0)  # [b, channels, s]
            width = conv_weight.shape[-1]
            if layer.conv_state is None:
                layer.conv_state = inputs.new_zeros(cache.batch_size, inputs.shape[1], width - 1)
                layer.ssm_state = inputs.new_zeros(cache.batch_size, heads, p, n, dtype=torch.float32)
            layer.conv_state[cache.rows] = F.pad(inputs, (width - 1, 0))[..., -(width - 1):]
            y, state = self._conv_and_scan(inputs, dt, params, return_final_state=True)
            layer.ssm_state[cache.rows] = state.float()
        else:
            conv = conv_step(layer, xBC[0], conv_weight, conv_bias)  # one token: [b, channels]
            x, B, C = conv.split([d, groups * n, groups * n], dim=-1)
            y = ssm_step(layer, x.reshape(b, heads, p), dt[0], -torch.exp(A_log.float()), B.reshape(b, groups, n),
                         C.reshape(b, groups, n), D, dt_bias, self.config.mamba_time_step_limit)
        return self._ssm_output(y.reshape(b, s, d), z, norm_weight)

    def _ssm_output(self, y, z, norm_weight):
        """The gate (with the grouped RMSNorm when the model has it) and ssm_out_multiplier:
        y [b, s, d], z [s, b, d] -> [s, b, d]."""
        layout, config = self.core, self.config
        z = z.transpose(0, 1)
        if norm_weight is None:
            y = y * F.silu(z) * config.ssm_out_multiplier
        else:
            norm_weight = norm_weight * config.ssm_out_multiplier  # the norm's output scale
            group_size = config.d_ssm // config.mamba_num_groups
            sum_squares = None
            if layout.ssm_group_replicas > 1:
                group = layout.segment("B").offset // layout.state_dim

                def sum_squares(local):
                    return group_sum_across_ranks(local, group, config.mamba_num_groups, self.norm_group)

            y = gated_rms_norm(y, z, norm_weight, eps=config.layernorm_epsilon, group_size=group_size,
                               norm_before_gate=config.mamba_norm_before_gate,
                               sum_squares_across_ranks=sum_squares, backend=config.kernel_backend)
        return y.transpose(0, 1)

    def _core_mamba_params(self):
        """(conv weight, conv bias, A_log, D, dt_bias, norm weight) of the heads the cores compute:
        the parameters themselves without context parallelism, this CP rank's rows of them with it
        (their gradients are then summed over CP like every parameter's, by Megatron's DDP)."""
        params = (self.conv1d.weight, self.conv1d.bias, self.A_log, self.D, self.dt_bias, self.norm_weight)
        if self.cp is None:
            return params
        heads, channels = self.cp.rows["dt"], self.cp.rows["z"]
        conv_channels = buffer_for_autograd(self.cp_conv_channels, self.config)
        rows = (conv_channels, conv_channels, heads, heads, heads, channels)
        return tuple(None if param is None else param[index] for param, index in zip(params, rows))

    # ------------------------------------------------------------------ checkpointing

    def sharded_state_dict(self, prefix="", sharded_offsets=(), metadata=None):
        """Every tensor is stored in its canonical (Hugging Face, TP-independent) layout: fused
        projections are split into their q/k/v/z/x/B/C/dt row blocks and attention/SSM columns."""
        metadata = ensure_metadata_has_dp_cp_group(metadata)
        groups = dict(tp_group=self.tp_group, dp_cp_group=metadata["dp_cp_group"])
        dp_rank = get_pg_rank(metadata["dp_cp_group"])
        layout = self.layout
        sharded = {}
        for name in ("in_proj", "out_proj", "adapters"):
            sharded.update(getattr(self, name).sharded_state_dict(f"{prefix}{name}.", sharded_offsets, metadata))
        # The in-projection's rows and the out-projection's columns, and the adapter matrices split
        # like them, are stored as their canonical blocks.
        rows_like_in_proj = [("in_proj.weight", self.in_proj.weight)]
        columns_like_out_proj = [("out_proj.weight", self.out_proj.weight)]
        if "in_proj" in self.adapters:
            rows_like_in_proj.append(("adapters.in_proj.lora_b", self.adapters["in_proj"].lora_b))
        if "out_proj" in self.adapters:
            columns_like_out_proj.append(("adapters.out_proj.lora_a", self.adapters["out_proj"].lora_a))
        for name, tensor in rows_like_in_proj:
            sharded[prefix + name] = _rows_factory(prefix + name, tensor, layout.in_proj, sharded_offsets, dp_rank)
        for name, tensor in columns_like_out_proj:
            sharded[prefix + name] = _out_proj_factory(prefix + name, tensor, layout, sharded_offsets, dp_rank)
        for name, segments in (("qkv_bias", layout.attention_segments), ("ssm_in_bias", layout.ssm_segments)):
            if getattr(self, name) is not None:
                sharded[f"{prefix}{name}"] = _rows_factory(
                    f"{prefix}{name}", getattr(self, name), segments, sharded_offsets, dp_rank)
        for name in ("attn_out_bias", "ssm_out_bias"):
            if getattr(self, name) is not None:
                sharded[f"{prefix}{name}"] = make_sharded_tensor_for_checkpoint(
                    getattr(self, name), f"{prefix}{name}", sharded_offsets, **groups)
        if layout.mamba_heads:
            for name in ("weight", "bias"):
                param = getattr(self.conv1d, name)
                if param is not None:
                    key = f"{prefix}conv1d.{name}"
                    sharded[key] = _rows_factory(key, param, layout.conv, sharded_offsets, dp_rank)
            for name in ("A_log", "D", "dt_bias", "norm_weight"):
                param = getattr(self, name)
                if param is not None:
                    sharded[f"{prefix}{name}"] = make_tp_sharded_tensor_for_checkpoint(
                        param, f"{prefix}{name}", 0, prepend_offsets=sharded_offsets, **groups)
        return sharded


def _replica_id(replica_id, tp_replica: int):
    """Megatron replica ids are (pipeline, tensor, data); put this rank's TP replica index in."""
    if isinstance(replica_id, tuple):
        return (replica_id[0], tp_replica, *replica_id[2:])
    return (0, tp_replica, replica_id)


def _rows_factory(key, param, segments, sharded_offsets, dp_rank) -> ShardedTensorFactory:
    """Store the row blocks of a fused tensor as separate canonical tensors `{key}.{segment}`."""
    prepend = len(sharded_offsets)

    def build(key, t, replica_id, flattened_range):
        assert flattened_range is None, "flattened checkpoint formats are not supported"
        pieces, start = [], 0
        for seg in segments:
            index, count = seg.chunk
            pieces.append(ShardedTensor.from_rank_offsets(
                f"{key}.{seg.name}", t[start:start + seg.rows], *sharded_offsets, (prepend, index, count),
                replica_id=_replica_id(replica_id, seg.replica_index), prepend_axis_num=prepend))
            start += seg.rows
        return pieces

    return ShardedTensorFactory(key, param, build, lambda loaded: torch.cat(loaded), (0, 0, dp_rank))


def _out_proj_factory(key, param, layout, sharded_offsets, dp_rank) -> ShardedTensorFactory:
    """Store the out-projection as `{key}.attn` [h, heads, head_dim] (HF o_proj) and
    `{key}.ssm` [h, d_ssm] (HF mamba.out_proj)."""
    prepend = len(sharded_offsets)
    attn_cols = layout.attention_out_cols

    def build(key, t, replica_id, flattened_range):
        assert flattened_range is None, "flattened checkpoint formats are not supported"
        pieces = []
        if attn_cols:
            width = layout.head_dim // layout.attention_replicas
            attn = t[:, :attn_cols].reshape(t.shape[0], layout.attention_heads, width)
            shard = layout.tp_rank // layout.attention_replicas
            shards = layout.tp_size // layout.attention_replicas
            pieces.append(ShardedTensor.from_rank_offsets(
                f"{key}.attn", attn, *sharded_offsets, (prepend + 1, shard, shards),
                (prepend + 2, layout.attention_replica_index, layout.attention_replicas),
                replica_id=replica_id, prepend_axis_num=prepend))
        if layout.d_ssm:
            pieces.append(ShardedTensor.from_rank_offsets(
                f"{key}.ssm", t[:, attn_cols:], *sharded_offsets, (prepend + 1, layout.tp_rank, layout.tp_size),
                replica_id=replica_id, prepend_axis_num=prepend))
        return pieces

    def merge(loaded):
        return torch.cat([loaded[0].flatten(1), *loaded[1:]] if attn_cols else loaded, dim=1)

    return ShardedTensorFactory(key, param, build, merge, (0, 0, dp_rank))
