"""The 8-GPU projection of issue 8: each GPU's work and its TP/CP/PP traffic stay as measured on 4
GPUs; the data-parallel traffic grows with (d - 1) / d at the bandwidth measured on the
data-parallel-only layout (or at a rate the user states)."""

import json

import pytest

from falcon_h1.benchmarks.scale_projection import format_projection, main, project_rows
from falcon_h1.model.param_count import parameter_count
from falcon_h1.model.presets import preset_config


def row(tp=1, pp=1, cp=1, nccl_ms=None, step=0.300):
    dp = 4 // (tp * pp * cp)
    return dict(preset="1.5b", seq_length=8192, gpus=4, layout=dict(tp=tp, pp=pp, cp=cp, dp=dp, sp=tp > 1),
                global_batch_size=4 * dp, step_time_s=step, model_tflops_per_gpu=300.0, mfu=0.4,
                profiled_step=dict(wall_ms=310.0, gpu_kernels_ms=290.0, nccl_kernels_ms=nccl_ms) if nccl_ms else None)


def test_doubling_the_data_parallel_size_adds_the_measured_rate_times_the_extra_bytes():
    parameters = parameter_count(preset_config("1.5b"), padded_vocab=True)["total"]
    bandwidth, (dp_only, tp2) = project_rows([row(nccl_ms=10.0), row(tp=2, step=0.350)], gpus=8)
    # DP=4 moves 3/4 of (float32 gradients + bf16 parameters) per GPU in the 10 ms measured.
    assert bandwidth == pytest.approx(parameters * 6 * 3 / 4 / 0.010)
    # DP 4 -> 8: 7/8 instead of 3/4 of the same bytes; TP=2, DP 2 -> 4: 3/4 instead of 1/2 of half.
    # Tokens per GPU per step stay as measured: 4 micro-batches of 8192 per DP rank, over TP ranks.
    for projected, measured, tokens_per_gpu in ((dp_only, 0.300, 4 * 8192), (tp2, 0.350, 2 * 8192)):
        assert projected["gpus"] == 8 and projected["layout"]["dp"] == 2 * (4 // (projected["layout"]["tp"]))
        assert projected["added_data_parallel_s"] == pytest.approx(0.010 / 6)
        # At best only the bf16 parameter all-gather (2 of the 6 bytes) is exposed: the strategy
        # overlaps the gradient reduce-scatter with the backward, not the all-gather with the forward.
        assert projected["step_time_s"]["overlapped"] == pytest.approx(measured + 0.010 / 18)
        assert projected["step_time_s"]["exposed"] == pytest.approx(measured + 0.010 / 6)
        assert projected["tokens_per_sec_per_gpu"]["overlapped"] == pytest.approx(
            tokens_per_gpu / (measured + 0.010 / 18))
        assert projected["mfu"]["exposed"] == pytest.approx(0.4 * measured / (measured + 0.010 / 6))
    table = format_projection(bandwidth, [dp_only, tp2])
    assert "tp2 pp1 cp1 dp4 sp | 8 (4)" in table


def test_the_projection_needs_a_profiled_data_parallel_only_row_which_other_rows_can_lend():
    tp_only = [row(tp=2, nccl_ms=10.0), row(tp=4, nccl_ms=12.0)]
    with pytest.raises(ValueError, match="no profiled data-parallel-only row"):
        project_rows(tp_only + [row(nccl_ms=None)], gpus=8)
    bandwidth, projected = project_rows(tp_only, gpus=8, bandwidth_rows=[row(nccl_ms=10.0)])
    assert [p["layout"]["dp"] for p in projected] == [4, 2]
    with pytest.raises(ValueError, match="not a multiple"):
        project_rows([row(nccl_ms=10.0)], gpus=6)


def test_a_stated_rate_projects_a_one_gpu_bench_output_and_the_table_says_it_is_assumed(tmp_path, capsys):
    parameters = parameter_count(preset_config("1.5b"), padded_vocab=True)["total"]
    one_gpu = dict(stack="falcon_h1", preset="1.5b", seq_length=8192, gpus=1, global_batch_size=1,
                   layout=dict(tp=1, pp=1, cp=1, dp=1, sp=False), step_time_s=0.250, model_tflops_per_gpu=320.0,
                   mfu=0.42)
    peers = [dict(stack="transformers", seq_length=8192, step_time_s=0.4), dict(stack="megatron_gpt", error="out of memory")]
    (tmp_path / "step.json").write_text(json.dumps([one_gpu] + peers))

    assert main([str(tmp_path / "step.json"), "--gpus", "8", "--bus-bandwidth", "100", "--json",
                 str(tmp_path / "projected.json")]) == 0
    assert "bus bandwidth, assumed, not measured: 100 GB/s" in capsys.readouterr().out
    (result,) = json.loads((tmp_path / "projected.json").read_text())
    (projected,) = result["rows"]  # the peers' rows are not projected
    # DP 1 -> 8: each GPU sends 7/8 of the float32 gradients and bf16 parameters at 100 GB/s.
    assert projected["layout"]["dp"] == 8 and result["bandwidth_assumed"]
    assert projected["step_time_s"]["exposed"] == pytest.approx(0.250 + parameters * 6 * 7 / 8 / 100e9)
    assert projected["step_time_s"]["overlapped"] == pytest.approx(0.250 + parameters * 2 * 7 / 8 / 100e9)
    assert projected["tokens_per_sec_per_gpu"]["exposed"] == pytest.approx(8192 / projected["step_time_s"]["exposed"])

    # Without a stated rate, a one-GPU row gives nothing to measure the rate on: the error says what to do.
    assert main([str(tmp_path / "step.json")]) == 2
    assert "--bus-bandwidth" in capsys.readouterr().err
