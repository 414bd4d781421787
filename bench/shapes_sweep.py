"""ShapesBench of one model over solvers, step counts and guidance, as one table.

Runs Flow-DPM-Solver at 10/14/20 steps and Flow-Euler at 20/28/50 steps, each with the model's
classifier-free guidance and without it (scale 1), on the same prompts and seeds, and writes
one results folder per setting plus ``sweep.md`` / ``sweep.json`` in ``--out``. Settings
already scored (``results.json`` present) are read back, so an interrupted sweep resumes.

    .venv/bin/python bench/shapes_sweep.py --out runs/sweep                       # embedded model
    .venv/bin/python bench/shapes_sweep.py --model DIR --prompts-per-category 8 --out runs/sweep
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from fastsana.checkpoints.common import atomic_write_bytes, atomic_write_json
from fastsana.pipeline import default_model_path
from fastsana.runtime import configure_threads
from fastsana.shapes.bench import CATEGORIES, bench_prompts, prompts_per_category, run_bench
from fastsana.shapes.cli import pipeline_generator

SETTINGS = (
    ("flow_dpm", 10),
    ("flow_dpm", 14),
    ("flow_dpm", 20),
    ("flow_euler", 20),
    ("flow_euler", 28),
    ("flow_euler", 50),
)


def _row(name: str, result: dict) -> str:
    cells = [f"{result['categories'][c]:.2f}" for c in CATEGORIES]
    return (
        f"| {name} | " + " | ".join(cells) + f" | **{result['overall']:.3f}** | "
        f"{result['held_out_overall']:.3f} |"
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", type=Path, default=None, help="default: the embedded model")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--images-per-prompt", type=int, default=1)
    p.add_argument("--prompts-per-category", type=int, default=None, help="default: all")
    p.add_argument("--guidance", type=float, default=None, help="CFG scale (default: model's)")
    p.add_argument("--size", type=int, default=None, help="image side (default: native)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args()
    configure_threads(args.threads)

    model = args.model or default_model_path()
    prompts = bench_prompts()
    if args.prompts_per_category is not None:
        prompts = prompts_per_category(prompts, args.prompts_per_category)
    header = "| setting | " + " | ".join(CATEGORIES) + " | overall | held-out |"
    lines = [header, "|" + "---|" * (len(CATEGORIES) + 3)]
    summary = {}
    for guidance, tag in ((args.guidance, "cfg"), (1.0, "no-cfg")):
        for sampler, steps in SETTINGS:
            name = f"{sampler} {steps} {tag}"
            folder = args.out / f"{sampler}-{steps}-{tag}"
            if not (folder / "results.json").is_file():
                print(f"scoring {name}", flush=True)
                generate = pipeline_generator(
                    model, steps=steps, sampler=sampler, guidance=guidance, size=args.size
                )
                run_bench(
                    generate,
                    prompts=prompts,
                    images_per_prompt=args.images_per_prompt,
                    out_dir=folder,
                    batch_size=args.batch_size,
                )
            result = json.loads((folder / "results.json").read_text())
            summary[name] = {k: v for k, v in result.items() if k != "prompts"}
            lines.append(_row(name, result))
            print(lines[-1], flush=True)
    note = (
        f"\n{len(prompts)} prompts ({args.prompts_per_category or 'all'} per category), "
        f"{args.images_per_prompt} image(s) per prompt, model {model}\n"
    )
    atomic_write_bytes(args.out / "sweep.md", ("\n".join(lines) + "\n" + note).encode())
    atomic_write_json(args.out / "sweep.json", summary)
    print("\n".join(lines) + note)


if __name__ == "__main__":
    main()
