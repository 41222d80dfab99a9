"""A layout's figures on more GPUs of one host, projected from its measured run on fewer (issue 8:
the 8-GPU record, until an 8-GPU machine is lent).

    bash tests/gpu/layouts.sh OUT 1.5b        # 4 GPUs: rows with a profiled step each
    python -m falcon_h1.benchmarks.scale_projection OUT/layouts_1.5b.jsonl --gpus 8
    python -m falcon_h1.benchmarks.scale_projection OUT/layouts_7b.jsonl --bandwidth-rows OUT/layouts_1.5b.jsonl

Going from 4 to 8 GPUs of one NVSwitch host with the same TP, PP and CP multiplies the
data-parallel size and keeps each GPU's work (its micro-batches, its model shard) and its TP, CP
and PP messages as they were. What grows is the data-parallel traffic: the distributed optimizer
reduce-scatters the gradients (float32) and all-gathers the parameters (bf16) of each
model-parallel shard, and over d ranks each GPU moves (d - 1) / d of those bytes.

The rate comes from a measured layout whose communication is all data-parallel (TP = PP = CP = 1):
bus bandwidth = its data-parallel bytes per GPU / its profiled step's communication-kernel time.
Without such a row, `--bus-bandwidth GB/s` states a rate instead (then any row projects, a
one-GPU bench row included, and the table says the rate is assumed, not measured):

    python -m falcon_h1.benchmarks.step --preset 1.5b --seq-lengths 8192 --cuda-graphs --json step.json
    python -m falcon_h1.benchmarks.scale_projection step.json --gpus 8 --bus-bandwidth 225 450

Each projection has two bounds. At best the gradient reduce-scatter hides under the backward
(the strategy overlaps it) and only the parameter all-gather, which runs after the optimizer step
and is not overlapped, adds to the step; at worst all of the added traffic does.
"""

from __future__ import annotations

import argparse
import json
import sys

from falcon_h1.model.param_count import parameter_count
from falcon_h1.model.presets import preset_config

GRAD_BYTES, PARAM_BYTES = 4, 2  # float32 gradient reduction (the bf16 default), bf16 parameters


def data_parallel_bytes(parameters: int, layout: dict, dp: int, element_bytes: int = GRAD_BYTES + PARAM_BYTES) -> float:
    """Bytes each GPU sends per step for the distributed optimizer's gradient reduce-scatter and
    parameter all-gather over `dp` ranks (the model shard taken as an even split over TP x PP);
    `element_bytes=PARAM_BYTES` gives the all-gather's share alone."""
    shard = parameters / (layout["tp"] * layout["pp"])
    return shard * element_bytes * (dp - 1) / dp


def _data_parallel_only(layout: dict) -> bool:
    """All of the layout's communication is the data-parallel collectives (TP = PP = CP = 1, DP > 1)."""
    return (layout["tp"], layout["pp"], layout["cp"]) == (1, 1, 1) and layout["dp"] > 1


def bus_bandwidth(row: dict, parameters: int) -> float:
    """Bytes/s of the data-parallel collectives in a measured, profiled row whose communication is
    all data-parallel."""
    layout = row["layout"]
    if not _data_parallel_only(layout):
        raise ValueError(f"the bandwidth needs a data-parallel-only row (TP = PP = CP = 1, DP > 1), got {layout}")
    nccl_ms = (row.get("profiled_step") or {}).get("nccl_kernels_ms")
    if not nccl_ms:
        raise ValueError("the row has no profiled step: run the layout with --profile (tests/gpu/layouts.sh does)")
    return data_parallel_bytes(parameters, layout, layout["dp"]) / (nccl_ms / 1e3)


def project(row: dict, gpus: int, bandwidth: float, parameters: int) -> dict:
    """The row on `gpus` GPUs: the data-parallel size grows by gpus / row's GPUs, all else stays."""
    if gpus % row["gpus"]:
        raise ValueError(f"{gpus} GPUs is not a multiple of the measured {row['gpus']}")
    layout = row["layout"]
    dp = layout["dp"] * gpus // row["gpus"]

    def added_s(element_bytes):
        return (data_parallel_bytes(parameters, layout, dp, element_bytes)
                - data_parallel_bytes(parameters, layout, layout["dp"], element_bytes)) / bandwidth

    step, added_all_s = row["step_time_s"], added_s(GRAD_BYTES + PARAM_BYTES)
    tokens_per_gpu = row["global_batch_size"] * row["seq_length"] / row["gpus"]
    bounds = {"overlapped": step + added_s(PARAM_BYTES), "exposed": step + added_all_s}
    return dict(
        preset=row["preset"], seq_length=row["seq_length"], gpus=gpus, layout=dict(layout, dp=dp),
        measured_gpus=row["gpus"], measured_step_s=step, added_data_parallel_s=added_all_s,
        step_time_s=bounds, tokens_per_sec_per_gpu={k: tokens_per_gpu / s for k, s in bounds.items()},
        model_tflops_per_gpu={k: row["model_tflops_per_gpu"] * step / s for k, s in bounds.items()},
        mfu={k: row["mfu"] * step / s for k, s in bounds.items()} if row.get("mfu") else None)


def _parameters(preset: str) -> int:
    return parameter_count(preset_config(preset), padded_vocab=True)["total"]


def measured_bandwidth(rows: list[dict]) -> float:
    """The bus bandwidth of the first profiled data-parallel-only row of `rows`, of any preset."""
    reference = [row for row in rows if _data_parallel_only(row["layout"]) and row.get("profiled_step")]
    if not reference:
        raise ValueError("no profiled data-parallel-only row (TP = PP = CP = 1, DP > 1) to measure the bandwidth "
                         "from; give one with --bandwidth-rows, or state a rate with --bus-bandwidth")
    return bus_bandwidth(reference[0], _parameters(reference[0]["preset"]))


def project_rows(rows: list[dict], gpus: int, bandwidth_rows: list[dict] | None = None,
                 bandwidth: float | None = None) -> tuple[float, list[dict]]:
    """(the bus bandwidth, each row projected to `gpus`). A stated `bandwidth` (bytes/s) is used as
    given; otherwise it is measured on `bandwidth_rows` (default: `rows`)."""
    if bandwidth is None:
        bandwidth = measured_bandwidth(bandwidth_rows or rows)
    return bandwidth, [project(row, gpus, bandwidth, _parameters(row["preset"])) for row in rows]


def format_projection(bandwidth: float, projected: list[dict], assumed: bool = False) -> str:
    source = "assumed, not measured" if assumed else "measured"
    lines = [f"data-parallel bus bandwidth, {source}: {bandwidth / 1e9:.0f} GB/s per GPU",
             "| preset | seq | layout | GPUs (measured) | step s | tokens/s/GPU | TFLOP/s/GPU | MFU |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for p in projected:
        layout = p["layout"]
        name = f"tp{layout['tp']} pp{layout['pp']} cp{layout['cp']} dp{layout['dp']}" + (" sp" if layout.get("sp") else "")

        def span(values, fmt):
            return f"{fmt.format(values['exposed'])}-{fmt.format(values['overlapped'])}"

        mfu = span({k: v * 100 for k, v in p["mfu"].items()}, "{:.1f}") + "%" if p["mfu"] else "-"
        lines.append(f"| {p['preset']} | {p['seq_length']} | {name} | {p['gpus']} ({p['measured_gpus']}) | "
                     f"{span(p['step_time_s'], '{:.3f}')} | {span(p['tokens_per_sec_per_gpu'], '{:,.0f}')} | "
                     f"{span(p['model_tflops_per_gpu'], '{:.0f}')} | {mfu} |")
    lines.append("Ranges: all added data-parallel traffic exposed - only the parameter all-gather exposed "
                 "(the gradient reduce-scatter hidden under the backward).")
    return "\n".join(lines)


def _read_rows(path: str) -> list[dict]:
    """The project's measured rows of a bench output: JSON lines (tests/gpu/layouts.sh) or the JSON
    list `--json` writes; the peers' rows (transformers, Megatron GPT) and failed rows are left out."""
    with open(path) as f:
        text = f.read()
    rows = json.loads(text) if text.lstrip().startswith("[") else [json.loads(line) for line in text.splitlines()
                                                                   if line.strip()]
    return [row for row in rows if row.get("stack", "falcon_h1") == "falcon_h1" and "error" not in row]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m falcon_h1.benchmarks.scale_projection", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("rows", help="measured bench rows: JSON lines (tests/gpu/layouts.sh) or the bench's --json list")
    parser.add_argument("--bandwidth-rows", help="rows holding the profiled data-parallel-only run the bandwidth "
                                                 "comes from, if `rows` has none (the 7B layouts all use TP)")
    parser.add_argument("--bus-bandwidth", type=float, nargs="+", metavar="GB/s",
                        help="state the data-parallel bus bandwidth per GPU instead of measuring it (one table "
                             "per rate); the projection is then only as good as the rate")
    parser.add_argument("--gpus", type=int, default=8, help="GPUs to project to (default 8)")
    parser.add_argument("--json", help="also write the projections here")
    args = parser.parse_args(argv)
    if args.bus_bandwidth and args.bandwidth_rows:
        parser.error("give either --bandwidth-rows (a measured rate) or --bus-bandwidth (a stated one)")
    rows, bandwidth_rows = _read_rows(args.rows), _read_rows(args.bandwidth_rows) if args.bandwidth_rows else None
    if not rows:
        print(f"error: {args.rows} holds no measured falcon_h1 row", file=sys.stderr)
        return 2
    results = []
    try:
        for rate in [gbps * 1e9 for gbps in args.bus_bandwidth] if args.bus_bandwidth else [None]:
            bandwidth, projected = project_rows(rows, args.gpus, bandwidth_rows, bandwidth=rate)
            print(format_projection(bandwidth, projected, assumed=rate is not None))
            results.append(dict(bus_bandwidth_bytes_per_s=bandwidth, bandwidth_assumed=rate is not None,
                                rows=projected))
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
