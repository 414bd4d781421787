"""Benchmark W8A8 linear layers (not a test): float ``F.linear`` vs ``W8A8Linear``.

    .venv/bin/python -m bench.quantize                           # CPU, fp32, 1024 and 4096 tokens
    .venv/bin/python -m bench.quantize --tokens 256 --repeats 2  # a quick check
    .venv/bin/python -m bench.quantize --device cuda --dtype bf16
    .venv/bin/python -m bench.quantize --device cuda --dtype bf16 --sweep-tiles  # int8 GEMM tiles

Shapes are the DiT's quantised matmuls: Sana-0.6B (width 1152: attention projections
1152→1152, Mix-FFN 1152→2·2880 and 2880→1152) and sana-small (width 256: 256→256, 256→2·640,
640→256). Weights and inputs are random gaussians (weights scaled by 1/√in). For each shape the
three calls (float, W8A8, the bare ``torch._int_mm`` inside it) run interleaved, ``--repeats``
times after one warm-up; the table gives medians, the W8A8/float time ratio and the relative
error ‖y_w8a8 − y_float‖/‖y_float‖. On CPU torch's ``_int_mm`` is a slow generic kernel, so the
default run takes minutes there. On CUDA, ``W8A8`` is the layer as it runs (Triton kernels,
``fastsana.kernels``) and ``W8A8 torch`` its PyTorch path (``torch._int_mm`` between
elementwise kernels, ``FASTSANA_TRITON_W8A8=0``). ``--sweep-tiles`` times the int8 GEMM
kernel with each tile in ``TILES`` instead (CUDA only).
"""

from __future__ import annotations

import argparse
import contextlib
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
# (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages) candidates for --sweep-tiles.
TILES = (
    (128, 128, 128, 8, 4),
    (128, 128, 64, 4, 4),
    (128, 256, 128, 8, 3),
    (64, 128, 128, 4, 4),
    (128, 64, 128, 4, 4),
    (256, 128, 128, 8, 3),
)


@contextlib.contextmanager
def _torch_path():
    """The layer's PyTorch path: its Triton kernels switched off for the duration."""
    old = os.environ.get("FASTSANA_TRITON_W8A8")
    os.environ["FASTSANA_TRITON_W8A8"] = "0"
    try:
        yield
    finally:
        if old is None:
            del os.environ["FASTSANA_TRITON_W8A8"]
        else:
            os.environ["FASTSANA_TRITON_W8A8"] = old


def _run_torch_path(layer: W8A8Linear, x: torch.Tensor) -> torch.Tensor:
    with _torch_path():
        return layer(x)


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

    calls = {
        "float": lambda: F.linear(x, layer.weight, layer.bias),
        "w8a8": lambda: quantized(x),
        "int_mm": lambda: torch._int_mm(q_x, q_wt),
    }
    if device.type == "cuda":
        calls["w8a8_torch"] = lambda: _run_torch_path(quantized, x)
    if args.sweep_tiles:
        from fastsana import kernels

        s_x = torch.rand(tokens, 1, device=device)
        calls = {"float": calls["float"]} | {
            str(tile): lambda tile=tile: kernels.int8_linear(
                q_x, s_x, quantized.qweight, quantized.weight_scale, quantized.bias, dtype, tile
            )
            for tile in TILES
        }
    with torch.no_grad():
        timings = interleaved(calls, args.repeats, device=device)
        medians = {name: t.median for name, t in timings.items()}
        want = F.linear(x.float(), layer.weight.float(), layer.bias.float())
        error = (quantized(x).float() - want).norm() / want.norm()
        if device.type == "cuda":  # the two paths must agree
            torch_error = (_run_torch_path(quantized, x).float() - want).norm() / want.norm()
            medians["torch_error"] = torch_error.item()
    return {**medians, "error": error.item()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", default="1024,4096", help="comma-separated token counts (rows)")
    parser.add_argument("--repeats", type=int, default=3, help="timed calls per variant")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--dtype", choices=list(DTYPES), default="fp32", help="float baseline")
    parser.add_argument("--threads", type=int, default=None, help="default: physical cores")
    parser.add_argument("--sweep-tiles", action="store_true", help="time int8 GEMM tiles (CUDA)")
    args = parser.parse_args()
    if args.sweep_tiles and args.device != "cuda":
        parser.error("--sweep-tiles needs --device cuda (the kernel is Triton)")
    try:
        tokens = [int(t) for t in args.tokens.split(",") if t]
    except ValueError:
        parser.error(f"--tokens must be comma-separated ints, got {args.tokens!r}")
    if not tokens or min(tokens) < 1 or args.repeats < 1:
        parser.error("--tokens must be positive ints and --repeats ≥ 1")

    threads = configure_threads(args.threads)
    load = ", ".join(f"{v:.2f}" for v in os.getloadavg())
    print(f"device {args.device}, baseline {args.dtype}, {threads} threads, load {load}\n")
    if args.sweep_tiles:
        print("| tokens | layer | in→out | float ms | " + " | ".join(map(str, TILES)) + " |")
        print("|---|---|---|---|" + "---|" * len(TILES))
        for n in tokens:
            for label, k, m in SHAPES:
                r = measure(n, k, m, args)
                cells = " | ".join(f"{r[str(t)] * 1e3:.3f}" for t in TILES)
                print(f"| {n} | {label} | {k}→{m} | {r['float'] * 1e3:.3f} | {cells} |", flush=True)
        return
    cuda = args.device == "cuda"
    extra = " W8A8 torch ms | torch/float | torch rel. error |" if cuda else ""
    head = "| tokens | layer | in→out | float ms | W8A8 ms | int_mm ms | W8A8/float | rel. error |"
    print(head + extra)
    print("|---|---|---|---|---|---|---|---|" + ("---|---|---|" if cuda else ""))
    worst = 0.0
    for n in tokens:
        for label, k, m in SHAPES:
            r = measure(n, k, m, args)
            tail = (
                f" {r['w8a8_torch'] * 1e3:.2f} | {r['w8a8_torch'] / r['float']:.2f}× "
                f"| {r['torch_error']:.2%} |"
                if cuda
                else ""
            )
            worst = max(worst, r["error"])
            print(
                f"| {n} | {label} | {k}→{m} | {r['float'] * 1e3:.2f} | {r['w8a8'] * 1e3:.2f} "
                f"| {r['int_mm'] * 1e3:.2f} | {r['w8a8'] / r['float']:.2f}× "
                f"| {r['error']:.2%} |{tail}",
                flush=True,
            )
    print(f"\nmax relative error: {worst:.2%}")


if __name__ == "__main__":
    main()
