"""Released Falcon-H1 shapes as FalconH1Config presets.

Values are those of TII's config.json files as far as public copies show them (sources in
docs/models.md). Where a value was not published (the µP multipliers of 1.5B and 3B, some of
Tiny's), the preset uses 1.0: the shape is exact, and importing the checkpoint brings its own
multipliers. Released models use norm_before_gate=False.
"""

from __future__ import annotations

from falcon_h1.model.config import FalconH1Config
from falcon_h1.model.param_count import parameter_count

_SHARED = dict(
    rotary_base=1e11, layernorm_epsilon=1e-5, pad_token_id=0, bos_token_id=1, eos_token_id=11,
    mamba_conv_kernel=4, mamba_conv_bias=True, mamba_proj_bias=False, mamba_norm_before_gate=False,
    attention_bias=False, projectors_bias=False, add_bias_linear=False,
)
_DEEP_SSM_MULTIPLIERS = (0.3535533905932738, 0.25, 0.1767766952966369, 0.5, 0.3535533905932738)

PRESETS: dict[str, dict] = {
    # Not a released model: a few-million-parameter Falcon-H1 for CPU smoke tests, CI and the
    # README's main job. Its vocabulary and special tokens are the bundled corpus tokenizer's: one
    # <|endoftext|>, id 0, is bos, eos and pad (falcon_h1/data/preprocess.py).
    "tiny": dict(
        num_layers=4, hidden_size=256, ffn_hidden_size=512, num_attention_heads=4, num_query_groups=2,
        kv_channels=64, mamba_num_heads=8, mamba_head_dim=32, mamba_state_dim=32, mamba_num_groups=1,
        mamba_chunk_size=64, mamba_rms_norm=False, vocab_size=4096, max_position_embeddings=4096,
        share_embeddings_and_output_weights=True, pad_token_id=0, bos_token_id=0, eos_token_id=0,
    ),
    "tiny-90m": dict(
        num_layers=24, hidden_size=512, ffn_hidden_size=768, num_attention_heads=8, num_query_groups=2,
        kv_channels=64, mamba_num_heads=24, mamba_head_dim=32, mamba_state_dim=64, mamba_num_groups=1,
        mamba_chunk_size=128, mamba_rms_norm=False, vocab_size=32768, max_position_embeddings=262144,
        share_embeddings_and_output_weights=True, embedding_multiplier=0.11083984375,
        lm_head_multiplier=0.078125,
    ),
    "0.5b": dict(
        num_layers=36, hidden_size=1024, ffn_hidden_size=2048, num_attention_heads=8, num_query_groups=2,
        kv_channels=64, mamba_num_heads=24, mamba_head_dim=64, mamba_state_dim=128, mamba_num_groups=1,
        mamba_chunk_size=128, mamba_rms_norm=False, vocab_size=32784, max_position_embeddings=16384,
        embedding_multiplier=5.656854249492381, lm_head_multiplier=0.0390625,
        key_multiplier=0.39062499999999994, attention_in_multiplier=1.0, attention_out_multiplier=0.9375,
        ssm_in_multiplier=1.25, ssm_out_multiplier=0.23570226039551587,
        ssm_multipliers=(0.3535533905932738, 0.25, 0.3535533905932738, 0.5, 0.3535533905932738),
        mlp_multipliers=(0.8838834764831844, 0.5859375),
    ),
    "1.5b": dict(
        num_layers=24, hidden_size=2048, ffn_hidden_size=4608, num_attention_heads=8, num_query_groups=2,
        kv_channels=128, mamba_num_heads=48, mamba_head_dim=64, mamba_state_dim=256, mamba_num_groups=1,
        mamba_chunk_size=128, mamba_rms_norm=True, vocab_size=65537, max_position_embeddings=131072,
    ),
    "1.5b-deep": dict(
        num_layers=66, hidden_size=1280, ffn_hidden_size=3072, num_attention_heads=6, num_query_groups=2,
        kv_channels=128, mamba_num_heads=24, mamba_head_dim=64, mamba_state_dim=256, mamba_num_groups=1,
        mamba_chunk_size=128, mamba_rms_norm=True, vocab_size=65537, max_position_embeddings=131072,
        embedding_multiplier=5.656854249492381, lm_head_multiplier=0.03125,
        key_multiplier=0.17677669529663687, attention_out_multiplier=0.5, ssm_in_multiplier=1.0,
        ssm_out_multiplier=0.23570226039551587, ssm_multipliers=_DEEP_SSM_MULTIPLIERS,
        mlp_multipliers=(0.7071067811865476, 0.3125),
    ),
    "3b": dict(
        num_layers=32, hidden_size=2560, ffn_hidden_size=6144, num_attention_heads=10, num_query_groups=2,
        kv_channels=128, mamba_num_heads=32, mamba_head_dim=128, mamba_state_dim=256, mamba_num_groups=1,
        mamba_chunk_size=128, mamba_rms_norm=True, vocab_size=65537, max_position_embeddings=131072,
    ),
    "7b": dict(
        num_layers=44, hidden_size=3072, ffn_hidden_size=12288, num_attention_heads=12, num_query_groups=2,
        kv_channels=128, mamba_num_heads=24, mamba_head_dim=128, mamba_state_dim=256, mamba_num_groups=1,
        mamba_chunk_size=256, mamba_rms_norm=True, vocab_size=130049, max_position_embeddings=262144,
        embedding_multiplier=5.656854249492381, lm_head_multiplier=0.013020833333333334,
        key_multiplier=0.030690398488999456, attention_out_multiplier=0.10416666666666667,
        ssm_in_multiplier=0.4166666666666667, ssm_out_multiplier=0.11785113019775793,
        ssm_multipliers=_DEEP_SSM_MULTIPLIERS, mlp_multipliers=(0.2946278254943948, 0.032552083333333336),
    ),
    "34b": dict(
        num_layers=72, hidden_size=5120, ffn_hidden_size=21504, num_attention_heads=20, num_query_groups=4,
        kv_channels=128, mamba_num_heads=32, mamba_head_dim=128, mamba_state_dim=256, mamba_num_groups=2,
        mamba_chunk_size=128, mamba_rms_norm=True, vocab_size=261120, max_position_embeddings=262144,
        embedding_multiplier=5.656854249492381, lm_head_multiplier=0.0078125,
        key_multiplier=0.011048543456039804, attention_out_multiplier=0.0375, ssm_in_multiplier=0.25,
        ssm_out_multiplier=0.08838834764831845, ssm_multipliers=_DEEP_SSM_MULTIPLIERS,
        mlp_multipliers=(0.1767766952966369, 0.011160714285714284),
    ),
}

# The size in each preset's name, in parameters.
NOMINAL_SIZES = {"tiny": 4.3e6, "tiny-90m": 90e6, "0.5b": 0.5e9, "1.5b": 1.5e9, "1.5b-deep": 1.5e9, "3b": 3e9,
                 "7b": 7e9, "34b": 34e9}


def preset_config(name: str, **overrides) -> FalconH1Config:
    """The FalconH1Config of a released shape, with optional field overrides (parallel layout,
    dtype, sequence length, ...)."""
    return FalconH1Config(**preset_fields(name, **overrides))


def preset_fields(name: str, **overrides) -> dict:
    """The FalconH1Config fields of a preset (what preset_config builds; recipes configure them)."""
    if name not in PRESETS:
        raise ValueError(f"unknown Falcon-H1 preset {name!r}; choose one of {sorted(PRESETS)}")
    return {**_SHARED, **PRESETS[name], **overrides}


def attention_only_fields(preset: str, width_multiple: int = 128, **overrides) -> dict:
    """FalconH1Config fields of a pure-attention model with `preset`'s parameter count (`overrides`
    applied to both): all hidden_size / head_dim heads are attention heads (GQA groups as the
    preset's), no Mamba heads, and the MLP widened to match (`matched_mlp_fields`). The comparisons'
    baseline (recipes/attention_baseline.py, recipes/convergence.py, the bench's GPT row)."""
    hybrid = preset_config(preset, **overrides)
    heads = hybrid.hidden_size // hybrid.kv_channels
    groups = hybrid.num_query_groups if heads % hybrid.num_query_groups == 0 else 1
    return matched_mlp_fields(preset, width_multiple, **overrides, mamba_num_heads=0, num_attention_heads=heads,
                              num_query_groups=groups)


def mamba_only_fields(preset: str, width_multiple: int = 128, **overrides) -> dict:
    """FalconH1Config fields of a Mamba-2-only model with `preset`'s parameter count (`overrides`
    applied to both): no attention heads, 2 x hidden_size / mamba_head_dim Mamba heads (Mamba-2's
    expansion of 2; state, groups and head width as the preset's), and the MLP narrowed to match
    (`matched_mlp_fields`)."""
    hybrid = preset_config(preset, **overrides)
    return matched_mlp_fields(preset, width_multiple, **overrides, num_attention_heads=0,
                              mamba_num_heads=2 * hybrid.hidden_size // hybrid.mamba_head_dim)


def matched_mlp_fields(preset: str, width_multiple: int = 128, **fields) -> dict:
    """`preset`'s fields with `fields` changed and the MLP width set to the largest multiple of
    `width_multiple` whose parameter count stays within that of `preset` with the non-mixer
    `fields` only (num_layers, vocab_size, ...): a model of another mixer at the same size."""
    mixer = {"num_attention_heads", "num_query_groups", "kv_channels", "mamba_num_heads", "mamba_head_dim",
             "mamba_state_dim", "mamba_num_groups"}
    target = parameter_count(preset_config(preset, **{k: v for k, v in fields.items() if k not in mixer}))["total"]

    def count(ffn: int) -> int:
        return parameter_count(FalconH1Config(**preset_fields(preset, **fields, ffn_hidden_size=ffn)))["total"]

    per_step = count(2 * width_multiple) - count(width_multiple)  # the count is linear in the MLP width
    steps = (target - count(width_multiple)) // per_step
    if steps < 0:
        raise ValueError(f"{preset} with {fields}: the mixer alone is larger than {preset}; no MLP width matches")
    return preset_fields(preset, **fields, ffn_hidden_size=width_multiple * (1 + steps))
