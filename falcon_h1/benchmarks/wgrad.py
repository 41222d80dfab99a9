"""Time the weight-gradient GEMMs of one training micro-batch, fused with the float32 main-gradient
accumulation (falcon_h1/kernels/wgrad_fusion.py) or not, at a preset's shapes.

    python -m falcon_h1.benchmarks.wgrad --preset 1.5b --tokens 8192

Unfused is what Megatron does with gradient_accumulation_fusion off: the GEMM writes a bf16
gradient (times the µP row scale, for the in-projection and fc1), then DDP's hook adds it into the
float32 main_grad. Fused is one addmm with a float32 output into main_grad (one GEMM per run of
equal row scale). Each linear of a layer (TP = 1) and the output layer, at `tokens` tokens per
micro-batch; the in-projection and fc1 also with another preset's µP multipliers (the 1.5B preset
has none), which split them into a GEMM per run. Times are CUDA-event medians; the error columns
are relative to a float64 product; "kernels" lists what one fused call launches (cuBLAS only:
no temporary, no add). The last row sums one micro-batch of the whole model (layers x linears +
output layer).
"""

from __future__ import annotations

import argparse
import json
import sys

import torch

from falcon_h1.benchmarks.timing import cuda_median_ms
from falcon_h1.kernels import wgrad_fusion
from falcon_h1.parity import relative_error

MULTIPLIER_FIELDS = ("key_multiplier", "attention_in_multiplier", "attention_out_multiplier", "ssm_in_multiplier",
                     "ssm_multipliers", "mlp_multipliers")


def linear_shapes(config) -> list[dict]:
    """name, rows (out), cols (in), row scale (float32 [rows] or None) of each linear of one layer at TP = 1."""
    from falcon_h1.model.layout import mixer_layout
    from falcon_h1.model.mixer import HybridMixer

    layout = mixer_layout(config, 1, 0)
    in_scale, _, _ = HybridMixer._input_multipliers(config, layout.in_proj)
    ffn, hidden = config.ffn_hidden_size, config.hidden_size
    gate, down = config.mlp_multipliers
    fc1_scale = None if (gate, down) == (1.0, 1.0) else torch.tensor([gate] * ffn + [down] * ffn)
    return [dict(name="in_proj", rows=layout.in_proj_rows, cols=hidden, scale=in_scale),
            dict(name="out_proj", rows=hidden, cols=layout.out_proj_cols, scale=None),
            dict(name="linear_fc1", rows=2 * ffn, cols=hidden, scale=fc1_scale),
            dict(name="linear_fc2", rows=hidden, cols=ffn, scale=None)]


def time_wgrad(tokens: int, rows: int, cols: int, scale: torch.Tensor | None, repeats: int) -> dict:
    """Unfused and fused times (ms), their errors against float64, and the fused call's kernels."""
    x = torch.randn(tokens, cols, device="cuda").bfloat16()
    grad_output = torch.randn(tokens, rows, device="cuda").bfloat16()
    start = torch.randn(rows, cols, device="cuda")
    row_scale = None if scale is None else scale.float().cuda()
    runs = ((0, rows, 1.0),) if scale is None else wgrad_fusion.scale_runs(row_scale)
    main_grad = start.clone()
    target = main_grad if scale is None else wgrad_fusion.row_scaled_main_grad(main_grad, runs)

    def unfused():
        grad = grad_output.t() @ x  # Megatron's bf16 weight gradient
        if row_scale is not None:  # scaled_linear._ScaleRows.backward
            grad = torch.mul(grad, row_scale[:, None], out=torch.empty_like(grad))
        main_grad.add_(grad)  # DDP's hook

    def fused():
        wgrad_fusion.wgrad_gemm_accum_fp32(x, grad_output, target)

    product = grad_output.double().t() @ x.double()
    want = start.double() + (product if row_scale is None else row_scale.double()[:, None] * product)
    errors = {}
    for name, fn in (("unfused", unfused), ("fused", fused)):
        main_grad.copy_(start)
        fn()
        errors[name] = relative_error(main_grad, want)
    del product, want
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as profile:
        fused()
        torch.cuda.synchronize()
    kernels = [e.name for e in profile.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    gemm_only = cuda_median_ms(lambda: grad_output.t() @ x, repeats)
    return dict(unfused_ms=cuda_median_ms(unfused, repeats), fused_ms=cuda_median_ms(fused, repeats),
                bf16_gemm_ms=gemm_only, gemms=len(runs), unfused_error=errors["unfused"],
                fused_error=errors["fused"], kernels=kernels)


def run(preset: str, tokens: int, multipliers_of: str, repeats: int) -> list[dict]:
    from falcon_h1.model.presets import preset_config

    config = preset_config(preset)
    source = preset_config(multipliers_of)
    mup = preset_config(preset, **{field: getattr(source, field) for field in MULTIPLIER_FIELDS})
    cases = [dict(case, count=config.num_layers) for case in linear_shapes(config)]
    cases.append(dict(name="output_layer", rows=config.padded_vocab_size, cols=config.hidden_size, scale=None, count=1))
    cases += [dict(case, name=f"{case['name']} (µP of {multipliers_of})", count=0)
              for case in linear_shapes(mup) if case["scale"] is not None]
    rows = []
    for case in cases:
        result = time_wgrad(tokens, case["rows"], case["cols"], case["scale"], repeats)
        rows.append(dict(preset=preset, tokens=tokens, linear=case["name"], rows=case["rows"], cols=case["cols"],
                         per_micro_batch=case["count"], **result))
        torch.cuda.empty_cache()
    total = {key: sum(r[key] * r["per_micro_batch"] for r in rows) for key in ("unfused_ms", "fused_ms", "bf16_gemm_ms")}
    rows.append(dict(preset=preset, tokens=tokens, linear="micro-batch total", **total))
    return rows


def print_table(rows: list[dict]) -> None:
    print(f"{'linear':34} {'rows x cols':>13} {'x':>3} {'GEMMs':>5} {'bf16 GEMM':>9} {'unfused':>8} {'fused':>8} "
          f"{'saved':>7} {'err unfused':>11} {'err fused':>9}  fused kernels")
    for r in rows:
        if "rows" not in r:
            print(f"{r['linear']:34} {'':>13} {'':>3} {'':>5} {r['bf16_gemm_ms']:9.3f} {r['unfused_ms']:8.3f} "
                  f"{r['fused_ms']:8.3f} {r['unfused_ms'] - r['fused_ms']:7.3f}")
            continue
        names = sorted({k.split("(")[0][:40] for k in r["kernels"]})
        print(f"{r['linear']:34} {r['rows']:>6} x{r['cols']:>6} {r['per_micro_batch']:>3} {r['gemms']:>5} "
              f"{r['bf16_gemm_ms']:9.3f} {r['unfused_ms']:8.3f} {r['fused_ms']:8.3f} "
              f"{r['unfused_ms'] - r['fused_ms']:7.3f} {r['unfused_error']:11.1e} {r['fused_error']:9.1e}  "
              f"{len(r['kernels'])}: {', '.join(names)}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="1.5b")
    parser.add_argument("--tokens", type=int, default=8192, help="tokens per micro-batch (sequence x micro-batch size)")
    parser.add_argument("--multipliers-of", default="1.5b-deep",
                        help="the preset whose µP multipliers the extra in_proj / fc1 rows use")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--json", help="write the rows to this file")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available() or not wgrad_fusion.available():
        sys.exit("needs a CUDA GPU and a torch whose addmm takes out_dtype")
    rows = run(args.preset, args.tokens, args.multipliers_of, args.repeats)
    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}; times in ms per call")
    print_table(rows)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
