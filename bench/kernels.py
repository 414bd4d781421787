"""Triton kernels against the PyTorch paths they replace, on CUDA, at SANA's real shapes.

    python bench/kernels.py [--model sana-0.6b] [--sizes 1024,2048,4096] [--dtype bf16]
    python bench/kernels.py --sweep-conv-tiles     # the dwconv + GLU kernel with each CONV_TILES

For each image size: the linear attention of one DiT block (q, k, v of (1, N, C)) and the
Mix-FFN's depthwise conv + GLU (input (1, 2h, H, W) channels-last), timed with CUDA events,
median of 50 calls after warm-up, both paths in one process, interleaved; plus the achieved
memory bandwidth (bytes each kernel must read and write once, over its time). Prints a
Markdown table. Needs a CUDA GPU (this project's CI machines have none; the kernels'
correctness tests run there in Triton's interpreter).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys

import torch

from fastsana import kernels
from fastsana.configs import DIT_PRESETS
from fastsana.models import attention, ops

# (BLOCK_W, BLOCK_C, num_warps) candidates for --sweep-conv-tiles: (16, 64, 4) was the first
# default, (8, 64, 4) the current one (fastsana.kernels._CONV_BLOCK_W/_C).
CONV_TILES = (
    (16, 64, 4),
    (32, 64, 4),
    (8, 128, 4),
    (4, 128, 4),
    (8, 128, 8),
    (4, 256, 4),
    (8, 256, 8),
    (8, 64, 4),
    (2, 256, 4),
)


def _time_cuda(fn, repeats: int = 50) -> float:
    """Median milliseconds of ``fn`` over ``repeats`` calls, timed with CUDA events."""
    for _ in range(3):
        fn()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="sana-0.6b", choices=sorted(DIT_PRESETS))
    p.add_argument("--sizes", default="1024,2048,4096", help="image sizes in px (f32 AE)")
    p.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"])
    p.add_argument("--sweep-conv-tiles", action="store_true", help="time dwconv + GLU tiles")
    args = p.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench/kernels.py needs a CUDA GPU")
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    cfg = DIT_PRESETS[args.model].config
    c, heads, hidden = cfg.hidden_size, cfg.num_heads, cfg.ffn_hidden
    size = torch.tensor([], dtype=dtype).element_size()
    print(f"GPU: {torch.cuda.get_device_name()}  model: {args.model}  dtype: {args.dtype}\n")
    conv = torch.nn.Conv2d(2 * hidden, 2 * hidden, 3, padding=1, groups=2 * hidden)
    conv = conv.to("cuda", dtype)
    if args.sweep_conv_tiles:
        _sweep_conv_tiles(args, conv, cfg, hidden, dtype)
        return
    print("| op | px | tokens | PyTorch ms | Triton ms | speed-up | Triton GB/s |")
    print("|---|---|---|---|---|---|---|")
    with torch.no_grad():
        for px in (int(s) for s in args.sizes.split(",")):
            side = px // 32 // cfg.patch_size
            n = side * side
            q, k, v = (torch.randn(1, n, c, device="cuda", dtype=dtype) for _ in range(3))
            x = torch.randn(1, n, 2 * hidden, device="cuda", dtype=dtype)
            x = x.view(1, side, side, -1).permute(0, 3, 1, 2)  # channels-last, as in MixFFN
            cases = {
                "linear attention": (
                    lambda qkv=(q, k, v): attention.linear_attention(*qkv, heads, out_dtype=dtype),
                    4 * n * c * size,  # read q, k, v, write out
                ),
                "dwconv + GLU": (
                    # The PyTorch path overwrites x with SiLU(x) in place; timing is unaffected.
                    lambda x=x: ops.depthwise_glu(conv, x, silu_input=True),
                    3 * n * hidden * size,  # read 2h, write h channels
                ),
            }
            for name, (fn, nbytes) in cases.items():
                ms = {}
                for i in range(4):  # interleaved: off, on, on, off
                    on = i in (1, 2)
                    os.environ["FASTSANA_TRITON"] = "1" if on else "0"  # read per call
                    os.environ["FASTSANA_TRITON_DWCONV_GLU"] = "1"  # even if turned off outside
                    ms.setdefault(on, []).append(_time_cuda(fn))
                torch_ms, triton_ms = min(ms[False]), min(ms[True])
                print(
                    f"| {name} | {px} | {n} | {torch_ms:.3f} | {triton_ms:.3f} | "
                    f"{torch_ms / triton_ms:.2f}× | {nbytes / triton_ms / 1e6:.0f} |"
                )


@torch.no_grad()
def _sweep_conv_tiles(args, conv, cfg, hidden: int, dtype: torch.dtype) -> None:
    """PyTorch's depthwise conv + GLU against the fused kernel with every tile of CONV_TILES."""
    print("| px | PyTorch ms | " + " | ".join(map(str, CONV_TILES)) + " |")
    print("|---|---|" + "---|" * len(CONV_TILES))
    for px in (int(s) for s in args.sizes.split(",")):
        side = px // 32 // cfg.patch_size
        x = torch.randn(1, side * side, 2 * hidden, device="cuda", dtype=dtype)
        x = x.view(1, side, side, -1).permute(0, 3, 1, 2)  # channels-last, as in MixFFN
        os.environ["FASTSANA_TRITON"] = "0"
        torch_ms = _time_cuda(lambda x=x: ops.depthwise_glu(conv, x, silu_input=True))
        cells = [
            _time_cuda(
                lambda t=t, x=x: kernels.dwconv_glu(
                    x, conv.weight, conv.bias, silu_input=True, tile=t
                )
            )
            for t in CONV_TILES
        ]
        print(f"| {px} | {torch_ms:.3f} | " + " | ".join(f"{c:.3f}" for c in cells) + " |")


if __name__ == "__main__":
    main()
