"""ShapesBench of one model over solvers, step counts and guidance, as one table.

Runs Flow-DPM-Solver at 10/14/20 steps and Flow-Euler at 20/28/50 steps, each with the model's
classifier-free guidance and without it (scale 1), on the same prompts and seeds, and writes
one results folder per seed and setting (``--out/seedS/SETTING``) plus ``sweep.md`` /
``sweep.json`` in ``--out``. With several ``--seeds`` each row is the mean over the seeds (the
per-seed overall scores are listed beside it); image ``k`` of a prompt uses seed ``S + k``, as
``fastsana shapes bench --seed S`` does. Settings already scored (``results.json`` present) are
read back, so an interrupted sweep resumes and a second seed can be added later.

    .venv/bin/python bench/shapes_sweep.py --out runs/sweep                       # embedded model
    .venv/bin/python bench/shapes_sweep.py --seeds 0,2 --out runs/sweep           # two seeds
    .venv/bin/python bench/shapes_sweep.py --model DIR --prompts-per-category 8 --out runs/sweep
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from statistics import fmean as mean

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


def _seeds(text: str) -> list[int]:
    try:
        seeds = [int(s) for s in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected seeds like 0,2; got {text!r}") from None
    if not seeds or min(seeds) < 0 or len(set(seeds)) != len(seeds):
        raise argparse.ArgumentTypeError(f"expected distinct seeds >= 0; got {text!r}")
    return seeds


def mean_over_seeds(results: list[dict]) -> dict:
    """Category, overall and held-out scores of one setting, averaged over its seeds' runs.

    Every seed scores the same prompts, so the mean of the per-seed means is the mean over all
    images.
    """
    if not results:
        raise ValueError("need at least one result to average")
    return {
        "categories": {c: mean([r["categories"][c] for r in results]) for c in CATEGORIES},
        "held_out_categories": {
            c: mean([r["held_out_categories"][c] for r in results]) for c in CATEGORIES
        },
        "overall": mean([r["overall"] for r in results]),
        "held_out_overall": mean([r["held_out_overall"] for r in results]),
        "overall_per_seed": [r["overall"] for r in results],
        "held_out_per_seed": [r["held_out_overall"] for r in results],
    }


def _row(name: str, result: dict) -> str:
    cells = [f"{result['categories'][c]:.2f}" for c in CATEGORIES]
    per_seed = " / ".join(f"{v:.3f}" for v in result["overall_per_seed"])
    return (
        f"| {name} | " + " | ".join(cells) + f" | **{result['overall']:.3f}** | "
        f"{result['held_out_overall']:.3f} | {per_seed} |"
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", type=Path, default=None, help="default: the embedded model")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--seeds", type=_seeds, default=[0], help="comma-separated (default: 0)")
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
    header = "| setting | " + " | ".join(CATEGORIES) + " | overall | held-out | overall per seed |"
    lines = [header, "|" + "---|" * (len(CATEGORIES) + 4)]
    settings = [
        (sampler, steps, guidance, tag)
        for guidance, tag in ((args.guidance, "cfg"), (1.0, "no-cfg"))
        for sampler, steps in SETTINGS
    ]

    def folder(seed: int, sampler: str, steps: int, tag: str) -> Path:
        return args.out / f"seed{seed}" / f"{sampler}-{steps}-{tag}"

    # Seed-major, so a sweep cut short still has whole tables for its first seeds.
    for seed in args.seeds:
        for sampler, steps, guidance, tag in settings:
            out_dir = folder(seed, sampler, steps, tag)
            if (out_dir / "results.json").is_file():
                continue
            print(f"scoring {sampler} {steps} {tag}, seed {seed}", flush=True)
            generate = pipeline_generator(
                model, steps=steps, sampler=sampler, guidance=guidance, size=args.size
            )
            run_bench(
                generate,
                prompts=prompts,
                images_per_prompt=args.images_per_prompt,
                seed=seed,
                out_dir=out_dir,
                batch_size=args.batch_size,
            )

    summary = {}
    for sampler, steps, _, tag in settings:
        name = f"{sampler} {steps} {tag}"
        per_seed = [
            json.loads((folder(seed, sampler, steps, tag) / "results.json").read_text())
            for seed in args.seeds
        ]
        summary[name] = mean_over_seeds(per_seed)
        lines.append(_row(name, summary[name]))
    note = (
        f"\n{len(prompts)} prompts ({args.prompts_per_category or 'all'} per category), "
        f"{args.images_per_prompt} image(s) per prompt and seed, seeds "
        f"{', '.join(map(str, args.seeds))}, model {model}\n"
    )
    atomic_write_bytes(args.out / "sweep.md", ("\n".join(lines) + "\n" + note).encode())
    atomic_write_json(args.out / "sweep.json", summary)
    print("\n".join(lines) + note)


if __name__ == "__main__":
    main()
