"""What reusing the caption's K/V across sampling steps saves, per DiT call.

    python bench/caption_kv.py [--model sana-0.6b] [--depth 2] [--sizes 512,1024] [--repeats 6]

One call of ``model(x, t, text, mask)`` (caption projection and every block's cross-attention
K/V computed inside) against ``model(x, t, context)`` with ``context = model.prepare_text(...)``
made once, as the pipeline does for a whole image. Batch 2 (classifier-free guidance), a
300-token caption, random weights; interleaved repeats, medians. The saving per call does not
depend on the depth (both sides scale with the number of blocks), so ``--depth 2`` keeps it
quick on a CPU.
"""

from __future__ import annotations

import argparse
import statistics

import torch

from bench import measure, models, report
from fastsana.runtime import configure_threads


def main() -> None:
    p = argparse.ArgumentParser(description="caption K/V reuse: time per DiT call")
    p.add_argument("--model", default="sana-0.6b", choices=models.DIT_MODELS)
    p.add_argument("--depth", type=int, default=2)
    p.add_argument("--sizes", default="512,1024")
    p.add_argument("--repeats", type=int, default=6)
    args = p.parse_args()
    configure_threads()
    print(report.machine_line(measure.machine_description()))
    print("| px | per call, caption recomputed | per call, context reused | saving |")
    print("|---|---|---|---|")
    config = models.dit_config(args.model, depth=args.depth)
    model = models.build_dit(config, "ours", torch.float32)
    for px in (int(s) for s in args.sizes.split(",")):
        inputs = models.dit_inputs(config, px, batch=2)
        with torch.no_grad():
            context = model.prepare_text(inputs.text, inputs.mask)
            calls = {
                "recomputed": lambda i=inputs: model(i.x, i.t, i.text, i.mask),
                "reused": lambda i=inputs, c=context: model(i.x, i.t, c),
            }
            timings = measure.interleaved(calls, args.repeats)
        full, reused = (statistics.median(timings[k].times) for k in ("recomputed", "reused"))
        print(f"| {px} | {full:.3f} s | {reused:.3f} s | {100 * (1 - reused / full):.1f} % |")


if __name__ == "__main__":
    main()
