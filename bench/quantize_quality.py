"""Image quality of W8A8 against the unquantised model: same prompts, seeds and settings.

For each prompt and seed, the float pipeline and the ``quantize="w8a8"`` pipeline make one
image; the table gives the max and mean absolute pixel difference (0–255) and the PSNR of the
W8A8 image against the float one. With ``--bench-prompts N`` both are also scored on ShapesBench
(the first N prompts of each category, one image each) and the score change is reported.

    .venv/bin/python bench/quantize_quality.py                      # embedded model, 4 images
    .venv/bin/python bench/quantize_quality.py --model DIR --dtype bf16 --seeds 0,1,2
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import numpy as np
import torch

from fastsana.pipeline import SanaPipeline, default_model_path
from fastsana.runtime import configure_threads

PROMPTS = ("a red circle to the left of a blue square", "three yellow stars")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def _images(pipe: SanaPipeline, prompts: list[str], seed: int, steps: int) -> np.ndarray:
    out = pipe(prompts, seed=seed, num_inference_steps=steps, output_type="pt", progress=False)
    return (out.permute(0, 2, 3, 1).float().numpy() * 255).round()  # (B, H, W, 3) in 0..255


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", type=Path, default=None, help="default: the embedded model")
    p.add_argument("--dtype", choices=list(DTYPES), default="fp32")
    p.add_argument("--seeds", default="0,1", help="comma-separated seeds")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--bench-prompts", type=int, default=0, help="ShapesBench prompts/category")
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args()
    configure_threads(args.threads)
    model = args.model or default_model_path()
    dtype = DTYPES[args.dtype]
    pipes = {
        "float": SanaPipeline.from_pretrained(model, dtype=dtype),
        "w8a8": SanaPipeline.from_pretrained(model, dtype=dtype, quantize="w8a8"),
    }
    print(f"model {model}, {args.dtype}, {args.steps} steps, prompts {list(PROMPTS)}\n")
    print("| seed | max abs diff | mean abs diff | PSNR dB | float s | w8a8 s |")
    print("|---|---|---|---|---|---|")
    for seed in (int(s) for s in args.seeds.split(",")):
        images, seconds = {}, {}
        for name, pipe in pipes.items():
            start = time.perf_counter()
            images[name] = _images(pipe, list(PROMPTS), seed, args.steps)
            seconds[name] = time.perf_counter() - start
        diff = np.abs(images["w8a8"] - images["float"])
        mse = float(np.mean(diff**2))
        psnr = math.inf if mse == 0 else 10 * math.log10(255**2 / mse)
        print(
            f"| {seed} | {diff.max():.0f} | {diff.mean():.2f} | {psnr:.1f} | "
            f"{seconds['float']:.1f} | {seconds['w8a8']:.1f} |",
            flush=True,
        )
    if args.bench_prompts:
        from fastsana.shapes.bench import bench_prompts, prompts_per_category, run_bench
        from fastsana.shapes.cli import pipeline_generator

        specs = prompts_per_category(bench_prompts(), args.bench_prompts)
        for name in pipes:
            quantize = None if name == "float" else name
            generate = pipeline_generator(
                model, steps=args.steps, sampler="flow_dpm", guidance=None, quantize=quantize
            )
            result = run_bench(generate, prompts=specs, images_per_prompt=1)
            print(f"ShapesBench {name}: overall {result.overall:.3f}")


if __name__ == "__main__":
    main()
