"""Benchmark W8A8 linear layers (not a test): float ``F.linear`` vs ``W8A8Linear``.

    .venv/bin/python -m bench.quantize                           # CPU, fp32, 1024 and 4096 tokens
    .venv/bin/python -m bench.quantize --tokens 256 --repeats 2  # a quick check
    .venv/bin/python -m bench.quantize --device cuda --dtype bf16

Shapes are the DiT's quantised matmuls: Sana-0.6B (width 1152: attention projections
1152→1152, Mix-FFN 1152→2·2880 and 2880→1152) and sana-small (width 256: 256→256, 256→2·640,
640→256). Weights and inputs are random gaussians (weights scaled by 1/√in). For each shape the
three calls (float, W8A8, the bare ``torch._int_mm`` inside it) run interleaved, ``--repeats``
times after one warm-up; the table gives medians, the W8A8/float time ratio and the relative
error ‖y_w8a8 − y_float‖/‖y_float‖. On CPU torch's ``_int_mm`` is a slow generic kernel, so the
default run takes minutes there.
"""

from __future__ import annotations

import argparse
import os

import torch
import torch.nn.functional as F

from bench.measure import interleaved
from fastsana.quantize import W8A8Linear
from fastsana.runtime import configure_threads

# (label, in_features, out_features)
SHAPES = (
    ("0.6B attn q/k/v/out", 1152, 1152),
    ("0.6B ffn inverted", 1152, 2 * 2880),
    ("0.6B ffn point", 2880, 1152),
    ("small attn q/k/v/out", 256, 256),
    ("small ffn inverted", 256, 2 * 640),
    ("small ffn point", 640, 256),
)
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def measure(
    tokens: int, in_features: int, out_features: int, args: argparse.Namespace
) -> dict[str, float]:
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    layer = torch.nn.Linear(in_features, out_features, device=device)
    with torch.no_grad():
        layer.weight.normal_(0.0, in_features**-0.5)
        layer.bias.normal_(0.0, 0.1)
    layer = layer.to(dtype)
    quantized = W8A8Linear.from_float(layer)
    x = torch.randn(tokens, in_features, device=device).to(dtype)
    q_x = torch.randint(-127, 128, (tokens, in_features), dtype=torch.int8, device=device)
    q_wt = quantized.qweight.t()

    with torch.no_grad():
        timings = interleaved(
            {
                "float": lambda: F.linear(x, layer.weight, layer.bias),
                "w8a8": lambda: quantized(x),
                "int_mm": lambda: torch._int_mm(q_x, q_wt),
            },
            args.repeats,
            device=device,
        )
        medians = {name: t.median for name, t in timings.items()}
        want = F.linear(x.float(), layer.weight.float(), layer.bias.float())
        error = (quantized(x).float() - want).norm() / want.norm()
    return {**medians, "error": error.item()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", default="1024,4096", help="comma-separated token counts (rows)")
    parser.add_argument("--repeats", type=int, default=3, help="timed calls per variant")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--dtype", choices=list(DTYPES), default="fp32", help="float baseline")
    parser.add_argument("--threads", type=int, default=None, help="default: physical cores")
    args = parser.parse_args()
    try:
        tokens = [int(t) for t in args.tokens.split(",") if t]
    except ValueError:
        parser.error(f"--tokens must be comma-separated ints, got {args.tokens!r}")
    if not tokens or min(tokens) < 1 or args.repeats < 1:
        parser.error("--tokens must be positive ints and --repeats ≥ 1")

    threads = configure_threads(args.threads)
    load = ", ".join(f"{v:.2f}" for v in os.getloadavg())
    print(f"device {args.device}, baseline {args.dtype}, {threads} threads, load {load}\n")
    print("| tokens | layer | in→out | float ms | W8A8 ms | int_mm ms | W8A8/float | rel. error |")
    print("|---|---|---|---|---|---|---|---|")
    worst = 0.0
    for n in tokens:
        for label, k, m in SHAPES:
            r = measure(n, k, m, args)
            worst = max(worst, r["error"])
            print(
                f"| {n} | {label} | {k}→{m} | {r['float'] * 1e3:.2f} | {r['w8a8'] * 1e3:.2f} "
                f"| {r['int_mm'] * 1e3:.2f} | {r['w8a8'] / r['float']:.2f}× "
                f"| {r['error']:.2%} |",
                flush=True,
            )
    print(f"\nmax relative error: {worst:.2%}")


if __name__ == "__main__":
    main()
