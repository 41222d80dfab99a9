"""FalconH1Config: every field of a Hugging Face Falcon-H1 config, as a Megatron TransformerConfig.

Megatron names are kept where Megatron already has the concept:

    HF                         FalconH1Config
    num_hidden_layers          num_layers
    num_attention_heads        num_attention_heads
    num_key_value_heads        num_query_groups
    head_dim                   kv_channels
    intermediate_size          ffn_hidden_size
    rms_norm_eps               layernorm_epsilon
    initializer_range          init_method_std
    tie_word_embeddings        share_embeddings_and_output_weights
    mlp_bias                   add_bias_linear
    rope_theta                 rotary_base
    mamba_n_heads / d_head     mamba_num_heads / mamba_head_dim
    mamba_d_state / n_groups   mamba_state_dim / mamba_num_groups
    mamba_d_conv               mamba_conv_kernel
    time_step_limit            mamba_time_step_limit

Attention heads and Mamba heads are independent; either may be 0.
"""

import copy
import math
import warnings
from dataclasses import dataclass
from typing import Any, Callable

import torch.nn.functional as F
from megatron.core.transformer.transformer_config import TransformerConfig

from falcon_h1.arguments import check_pipeline_split
from falcon_h1.kernels import BACKENDS
from falcon_h1.model.layout import MixerLayout, check_context_parallel, check_tensor_parallel, mixer_layout


@dataclass
class FalconH1Config(TransformerConfig):
    # Vocabulary and embeddings.
    vocab_size: int = 32768
    make_vocab_size_divisible_by: int = 128
    share_embeddings_and_output_weights: bool = False
    max_position_embeddings: int = 16384
    pad_token_id: int | None = 0
    bos_token_id: int | None = 1
    eos_token_id: int | list[int] | None = 2

    # Attention: heads = num_attention_heads, KV heads = num_query_groups, head dim = kv_channels.
    rotary_base: float = 1e11
    attention_bias: bool = False

    # Mamba-2: mamba_num_heads x mamba_head_dim channels, mamba_state_dim, mamba_num_groups.
    mamba_num_heads: int = 0
    mamba_num_groups: int = 1
    mamba_chunk_size: int = 128
    mamba_conv_kernel: int = 4
    mamba_conv_bias: bool = True
    mamba_proj_bias: bool = False
    mamba_rms_norm: bool = False
    mamba_norm_before_gate: bool = True
    mamba_time_step_limit: tuple[float, float] = (0.0, math.inf)
    projectors_bias: bool = False  # bias of the SSM out-projection

    # µP forward multipliers, exactly as the released checkpoints use them.
    embedding_multiplier: float = 1.0
    lm_head_multiplier: float = 1.0
    key_multiplier: float = 1.0
    attention_in_multiplier: float = 1.0
    attention_out_multiplier: float = 1.0
    ssm_in_multiplier: float = 1.0
    ssm_out_multiplier: float = 1.0
    ssm_multipliers: tuple[float, float, float, float, float] = (1.0, 1.0, 1.0, 1.0, 1.0)  # z, x, B, C, dt
    mlp_multipliers: tuple[float, float] = (1.0, 1.0)  # gate, down

    # Which implementation runs the SSD scan, conv1d and gated norm (see falcon_h1.kernels).
    kernel_backend: str = "auto"
    # Selective recompute of the Mamba core (conv1d + SSD scan) in backward: keeps only its inputs
    # (a view of the in-projection output) per layer. The attention core's is Megatron's
    # recompute_granularity="selective" with "core_attn" in recompute_modules.
    recompute_ssd_scan: bool = False
    # cuda_graph_impl="local" (a TransformerConfig field) captures each layer's forward and
    # backward in CUDA graphs after the first step (Megatron's CudaGraphManager): the step then
    # launches one graph per layer instead of hundreds of kernels, which is what bounds a
    # 1.5B step on an H100. Needs a GPU and fixed shapes (sequence length, micro-batch size).

    # Megatron defaults that Falcon-H1 sets differently.
    normalization: str = "RMSNorm"
    layernorm_epsilon: float = 1e-5
    gated_linear_unit: bool = True
    activation_func: Callable = F.silu
    add_bias_linear: bool = False
    hidden_dropout: float = 0.0
    attention_dropout: float = 0.0

    def __post_init__(self):
        self.ssm_multipliers = tuple(float(m) for m in self.ssm_multipliers)
        self.mlp_multipliers = tuple(float(m) for m in self.mlp_multipliers)
        self.mamba_time_step_limit = tuple(float(m) for m in self.mamba_time_step_limit)
        if self.num_query_groups is None:
            self.num_query_groups = self.num_attention_heads
        if self.kv_channels is None:
            self.kv_channels = self.hidden_size // self.num_attention_heads if self.num_attention_heads else 0
        self._validate()
        # Megatron checks and completes the config its modules are built with (megatron_config);
        # this one takes what Megatron filled in and keeps its own head counts.
        megatron = megatron_config(self, mixer_layout(self, self.tensor_model_parallel_size, 0))
        TransformerConfig.__post_init__(megatron)
        vars(self).update({name: value for name, value in vars(megatron).items() if name not in _HEAD_COUNTS})

    def _validate(self) -> None:
        def fail(message: str):
            raise ValueError(f"FalconH1Config: {message}")

        if self.num_layers < 1 or self.hidden_size < 1:
            fail(f"num_layers={self.num_layers} and hidden_size={self.hidden_size} must be positive")
        heads, kv = self.num_attention_heads, self.num_query_groups
        if heads < 0 or self.mamba_num_heads < 0:
            fail("num_attention_heads and mamba_num_heads must be >= 0")
        if heads == 0 and self.mamba_num_heads == 0:
            fail("a layer needs attention heads or Mamba heads; num_attention_heads and "
                 "mamba_num_heads are both 0")
        if heads:
            if kv < 1 or heads % kv:
                fail(f"num_query_groups={kv} (KV heads) must divide num_attention_heads={heads}")
            if self.kv_channels < 2 or self.kv_channels % 2:
                fail(f"kv_channels (head_dim)={self.kv_channels} must be a positive even number for RoPE")
        if self.mamba_num_heads:
            if self.mamba_num_groups < 1 or self.mamba_num_heads % self.mamba_num_groups:
                fail(f"mamba_num_groups={self.mamba_num_groups} must divide "
                     f"mamba_num_heads={self.mamba_num_heads}")
            for name in ("mamba_head_dim", "mamba_state_dim", "mamba_chunk_size", "mamba_conv_kernel"):
                if getattr(self, name) < 1:
                    fail(f"{name}={getattr(self, name)} must be positive")
        if len(self.ssm_multipliers) != 5:
            fail(f"ssm_multipliers needs 5 values (z, x, B, C, dt), got {self.ssm_multipliers}")
        if len(self.mlp_multipliers) != 2:
            fail(f"mlp_multipliers needs 2 values (gate, down), got {self.mlp_multipliers}")
        low, high = self.mamba_time_step_limit
        if not 0.0 <= low <= high:
            fail(f"mamba_time_step_limit={self.mamba_time_step_limit} must satisfy 0 <= low <= high")
        if self.kernel_backend not in BACKENDS:
            fail(f"kernel_backend={self.kernel_backend!r} must be one of {BACKENDS}")
        if self.cuda_graph_impl not in ("none", "local"):
            fail(f"cuda_graph_impl={self.cuda_graph_impl!r}: the local spec supports 'none' or 'local' "
                 "(Megatron's per-layer CUDA graphs)")
        if self.cuda_graph_impl == "local" and self.recompute_granularity == "full":
            fail("full-layer recompute (recompute_granularity='full') does not combine with per-layer CUDA "
                 "graphs (cuda_graph_impl='local') in Megatron; drop one of them, or recompute the cores "
                 "instead (recompute_granularity='selective' with 'core_attn', recompute_ssd_scan=True)")
        if self.vocab_size < 1:
            fail(f"vocab_size={self.vocab_size} must be positive")
        if self.ffn_hidden_size is None:
            fail("ffn_hidden_size (HF intermediate_size) must be set")
        check_tensor_parallel(self, self.tensor_model_parallel_size)
        check_context_parallel(self, self.tensor_model_parallel_size, self.context_parallel_size)
        if self.pipeline_model_parallel_size > 1 and not self._uneven_pipeline_split():
            # Megatron's even split, else an assertion while the layers are built.
            check_pipeline_split(self.num_layers, self.pipeline_model_parallel_size,
                                 self.virtual_pipeline_model_parallel_size, name=_recipe_field)

    def _uneven_pipeline_split(self) -> bool:
        return (self.num_layers_in_first_pipeline_stage is not None or self.num_layers_in_last_pipeline_stage
                is not None or self.pipeline_model_parallel_layout is not None
                or self.account_for_embedding_in_pipeline_split or self.account_for_loss_in_pipeline_split)

    @property
    def d_ssm(self) -> int:
        return self.mamba_num_heads * self.mamba_head_dim

    @property
    def padded_vocab_size(self) -> int:
        """Vocabulary rounded up so that every TP rank holds an equal, GEMM-friendly slice."""
        multiple = self.make_vocab_size_divisible_by * self.tensor_model_parallel_size
        return -(-self.vocab_size // multiple) * multiple

    @classmethod
    def from_hf(cls, hf_config: dict[str, Any], **overrides) -> "FalconH1Config":
        return config_from_hf(hf_config, **overrides)

    def to_hf(self) -> dict[str, Any]:
        return config_to_hf(self)


_HEAD_COUNTS = ("num_attention_heads", "num_query_groups")


def megatron_config(config: FalconH1Config, layout: MixerLayout, **overrides) -> FalconH1Config:
    """`config` as Megatron takes it: the query and KV heads that one TP rank computes (`layout`)
    counted as if split evenly over TP, the only split Megatron knows (its attention divides the
    counts by the TP size). The mixer also runs head counts TP does not divide (layout.py, checked
    by FalconH1Config._validate); `config` keeps them."""
    view = copy.copy(config)
    view.num_attention_heads = layout.attention_heads * layout.tp_size
    view.num_query_groups = layout.kv_heads * layout.tp_size
    for name, value in overrides.items():
        setattr(view, name, value)
    return view


# HF config keys that config_from_hf reads.
_HF_MODEL_KEYS = {
    "num_hidden_layers", "hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads",
    "head_dim", "vocab_size", "tie_word_embeddings", "max_position_embeddings", "pad_token_id",
    "bos_token_id", "eos_token_id", "rms_norm_eps", "initializer_range", "attention_dropout",
    "rope_parameters", "rope_theta", "rope_scaling", "attention_bias", "mlp_bias", "hidden_act",
    "attn_layer_indices", "mamba_use_mlp", "mamba_d_ssm", "mamba_n_heads", "mamba_d_head",
    "mamba_d_state", "mamba_n_groups", "mamba_chunk_size", "mamba_d_conv", "mamba_conv_bias",
    "mamba_proj_bias", "mamba_rms_norm", "mamba_norm_before_gate", "time_step_limit",
    "projectors_bias", "embedding_multiplier", "lm_head_multiplier", "key_multiplier",
    "attention_in_multiplier", "attention_out_multiplier", "ssm_in_multiplier", "ssm_out_multiplier",
    "ssm_multipliers", "mlp_multipliers",
}
# HF config keys that describe the checkpoint, the tokenizer or generation, not the network.
_HF_METADATA_KEYS = {
    "architectures", "model_type", "torch_dtype", "dtype", "transformers_version", "_name_or_path",
    "use_cache", "num_logits_to_keep", "auto_map", "layers_block_type", "mamba_expand",
    "mlp_expansion_factor", "expansion_factor", "add_bos_token", "sliding_window", "output_attentions",
    "output_hidden_states", "return_dict", "id2label", "label2id", "tokenizer_class",
    "chunk_size_feed_forward", "is_encoder_decoder", "problem_type", "tie_encoder_decoder",
}


def _recipe_field(field: str) -> str:
    """Where a recipe sets an argument of the pipeline split: the layers in the model config, the
    stages in the strategy."""
    return f"model.config.{field}" if field == "num_layers" else f"trainer.strategy.{field}"


def _json_float(value):
    """transformers (5.x) writes non-finite floats into config.json as {"__float__": "Infinity"}."""
    if isinstance(value, dict) and "__float__" in value:
        return float(value["__float__"])
    return value


def config_from_hf(hf: dict[str, Any], **overrides) -> FalconH1Config:
    """Build a FalconH1Config from a Hugging Face Falcon-H1 config.json dict.

    Raises ValueError for configs of another architecture or with features this model does not
    implement (they would silently compute something else).
    """
    hf = dict(hf)
    model_type = hf.get("model_type")
    if model_type not in (None, "falcon_h1"):
        raise ValueError(f"config.json is for model_type={model_type!r}, not a Falcon-H1 ('falcon_h1') model")
    unsupported = {
        "attn_layer_indices": lambda v: v is None,
        "mamba_use_mlp": lambda v: v is True,
        "hidden_act": lambda v: v == "silu",
        "rope_scaling": lambda v: v is None or v.get("rope_type", v.get("type")) == "default",
    }
    for key, ok in unsupported.items():
        if key in hf and not ok(hf[key]):
            raise ValueError(f"Falcon-H1 config has {key}={hf[key]!r}, which this implementation does not support")

    heads = hf.get("num_attention_heads", 32)
    hidden = hf["hidden_size"]
    d_ssm = hf.get("mamba_d_ssm") or int(hf.get("mamba_expand", 2) * hidden)
    mamba_heads = hf.get("mamba_n_heads", 128)
    mamba_head_dim = hf.get("mamba_d_head", "auto")
    if mamba_head_dim in (None, "auto"):
        mamba_head_dim = d_ssm // mamba_heads
    if mamba_head_dim * mamba_heads != d_ssm:
        raise ValueError(f"mamba_d_head={mamba_head_dim} x mamba_n_heads={mamba_heads} != mamba_d_ssm={d_ssm}")
    rope = hf.get("rope_parameters") or {}
    rope_theta = rope.get("rope_theta", hf.get("rope_theta", 1e11))
    step_limit = [_json_float(v) for v in hf.get("time_step_limit") or (0.0, math.inf)]

    kwargs = dict(
        num_layers=hf["num_hidden_layers"],
        hidden_size=hidden,
        ffn_hidden_size=hf["intermediate_size"],
        num_attention_heads=heads,
        num_query_groups=hf.get("num_key_value_heads") or heads,
        kv_channels=hf.get("head_dim") or (hidden // heads if heads else 0),
        vocab_size=hf["vocab_size"],
        share_embeddings_and_output_weights=bool(hf.get("tie_word_embeddings", False)),
        max_position_embeddings=hf.get("max_position_embeddings", 8192),
        pad_token_id=hf.get("pad_token_id"),
        bos_token_id=hf.get("bos_token_id"),
        eos_token_id=hf.get("eos_token_id"),
        layernorm_epsilon=hf.get("rms_norm_eps", 1e-5),
        init_method_std=hf.get("initializer_range", 0.02),
        attention_dropout=float(hf.get("attention_dropout") or 0.0),
        rotary_base=float(rope_theta),
        attention_bias=bool(hf.get("attention_bias", False)),
        add_bias_linear=bool(hf.get("mlp_bias", False)),
        mamba_num_heads=mamba_heads,
        mamba_head_dim=mamba_head_dim,
        mamba_state_dim=hf.get("mamba_d_state", 256),
        mamba_num_groups=hf.get("mamba_n_groups", 1),
        mamba_chunk_size=hf.get("mamba_chunk_size", 256),
        mamba_conv_kernel=hf.get("mamba_d_conv", 4),
        mamba_conv_bias=bool(hf.get("mamba_conv_bias", True)),
        mamba_proj_bias=bool(hf.get("mamba_proj_bias", False)),
        mamba_rms_norm=bool(hf.get("mamba_rms_norm", False)),
        mamba_norm_before_gate=bool(hf.get("mamba_norm_before_gate", True)),
        mamba_time_step_limit=tuple(step_limit),
        projectors_bias=bool(hf.get("projectors_bias", False)),
        embedding_multiplier=hf.get("embedding_multiplier", 1.0),
        lm_head_multiplier=hf.get("lm_head_multiplier", 1.0),
        key_multiplier=hf.get("key_multiplier", 1.0),
        attention_in_multiplier=hf.get("attention_in_multiplier", 1.0),
        attention_out_multiplier=hf.get("attention_out_multiplier", 1.0),
        ssm_in_multiplier=hf.get("ssm_in_multiplier", 1.0),
        ssm_out_multiplier=hf.get("ssm_out_multiplier", 1.0),
        ssm_multipliers=tuple(hf.get("ssm_multipliers") or (1.0,) * 5),
        mlp_multipliers=tuple(hf.get("mlp_multipliers") or (1.0, 1.0)),
    )
    unknown = set(hf) - _HF_MODEL_KEYS - _HF_METADATA_KEYS
    if unknown:
        warnings.warn(f"Falcon-H1 config.json keys not understood and ignored: {sorted(unknown)}", stacklevel=2)
    kwargs.update(overrides)
    return FalconH1Config(**kwargs)


def config_to_hf(config: FalconH1Config) -> dict[str, Any]:
    """The Hugging Face config.json dict (transformers' FalconH1Config fields) of this model."""
    hf = {
        "architectures": ["FalconH1ForCausalLM"],
        "model_type": "falcon_h1",
        "vocab_size": config.vocab_size,
        "tie_word_embeddings": config.share_embeddings_and_output_weights,
        "hidden_size": config.hidden_size,
        "intermediate_size": config.ffn_hidden_size,
        "num_hidden_layers": config.num_layers,
        "num_attention_heads": config.num_attention_heads,
        "num_key_value_heads": config.num_query_groups,
        "head_dim": config.kv_channels,
        "hidden_act": "silu",
        "initializer_range": config.init_method_std,
        "rms_norm_eps": config.layernorm_epsilon,
        "pad_token_id": config.pad_token_id,
        "bos_token_id": config.bos_token_id,
        "eos_token_id": config.eos_token_id,
        "max_position_embeddings": config.max_position_embeddings,
        "attention_dropout": config.attention_dropout,
        "attention_bias": config.attention_bias,
        "mlp_bias": config.add_bias_linear,
        "rope_theta": config.rotary_base,
        "mamba_d_ssm": config.d_ssm,
        "mamba_n_heads": config.mamba_num_heads,
        "mamba_d_head": config.mamba_head_dim,
        "mamba_d_state": config.mamba_state_dim,
        "mamba_n_groups": config.mamba_num_groups,
        "mamba_chunk_size": config.mamba_chunk_size,
        "mamba_d_conv": config.mamba_conv_kernel,
        "mamba_conv_bias": config.mamba_conv_bias,
        "mamba_proj_bias": config.mamba_proj_bias,
        "mamba_rms_norm": config.mamba_rms_norm,
        "mamba_norm_before_gate": config.mamba_norm_before_gate,
        "projectors_bias": config.projectors_bias,
        "embedding_multiplier": config.embedding_multiplier,
        "lm_head_multiplier": config.lm_head_multiplier,
        "key_multiplier": config.key_multiplier,
        "attention_in_multiplier": config.attention_in_multiplier,
        "attention_out_multiplier": config.attention_out_multiplier,
        "ssm_in_multiplier": config.ssm_in_multiplier,
        "ssm_out_multiplier": config.ssm_out_multiplier,
        "ssm_multipliers": list(config.ssm_multipliers),
        "mlp_multipliers": list(config.mlp_multipliers),
    }
    if config.mamba_time_step_limit != (0.0, math.inf):
        # JSON has no infinity; the default (0, inf) is left to transformers.
        hf["time_step_limit"] = list(config.mamba_time_step_limit)
    return hf
