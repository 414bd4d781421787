"""``fastsana shapes make``, ``fastsana shapes bench`` and ``fastsana shapes text-encoder``.

``add_shapes_commands(subparsers)`` adds the ``shapes`` command to the main CLI's subparsers;
each leaf command sets ``func``, which takes the parsed arguments and returns an exit code.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

from fastsana.shapes.bench import (
    CATEGORIES,
    Generate,
    bench_prompts,
    ground_truth_generator,
    prompts_per_category,
    run_bench,
    select_categories,
)
from fastsana.shapes.dataset import make_dataset
from fastsana.shapes.world import DEFAULT_SCENE_MIX, SceneMix

if TYPE_CHECKING:
    import torch


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text}")
    return value


def _non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a non-negative integer, got {text}")
    return value


def _categories(text: str) -> list[str]:
    names = [name.strip() for name in text.split(",") if name.strip()]
    try:
        select_categories([], names)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return names


def add_shapes_commands(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add the ``shapes`` commands to ``subparsers``; returns the ``shapes`` parser."""
    shapes = subparsers.add_parser(
        "shapes", help="the Shapes synthetic world: make a dataset, run ShapesBench"
    )
    commands = shapes.add_subparsers(dest="shapes_command", required=True)

    make = commands.add_parser("make", help="write a Shapes dataset (folder or WebDataset)")
    make.add_argument("out", type=Path, help="output folder")
    make.add_argument("--n", type=_positive_int, required=True, help="number of images")
    make.add_argument("--size", type=_positive_int, default=256, help="image side in pixels")
    make.add_argument("--seed", type=_non_negative_int, default=0)
    make.add_argument(
        "--webdataset-shards", type=_positive_int, default=None, help="write K tar shards"
    )
    make.add_argument(
        "--include-held-out",
        action="store_true",
        help="also draw the held-out colour/shape pairs",
    )
    make.add_argument(
        "--scene-mix",
        type=_scene_mix,
        default=DEFAULT_SCENE_MIX,
        metavar="NAME=P,...",
        help="scene kind probabilities (single, count, pair, mixed: sum 1) and the share of "
        "pairs in a clear relation (relation); unnamed ones keep their defaults "
        f"({_mix_text(DEFAULT_SCENE_MIX)})",
    )
    make.add_argument(
        "--workers",
        type=_positive_int,
        default=1,
        help="processes rendering in parallel (same files for any number)",
    )
    make.set_defaults(func=_make_command)

    bench = commands.add_parser("bench", help="score a model (or the ground truth) on ShapesBench")
    source = bench.add_mutually_exclusive_group()
    source.add_argument(
        "--model", type=Path, help="a pipeline folder (default: the embedded default model)"
    )
    source.add_argument(
        "--ground-truth",
        action="store_true",
        help="score exact renders of the prompts (checks the analyser; expect ≥ 0.99)",
    )
    bench.add_argument("--images-per-prompt", type=_positive_int, default=4)
    bench.add_argument(
        "--seed",
        type=_non_negative_int,
        default=0,
        help="image k of every prompt uses seed SEED + k, so runs with independent images need "
        "seeds at least --images-per-prompt apart (0, 2, 4, … for 2 images per prompt)",
    )
    bench.add_argument(
        "--prompts-per-category",
        type=_positive_int,
        default=None,
        help="score only the first N prompts of each category (main and held-out sets)",
    )
    bench.add_argument(
        "--categories",
        type=_categories,
        default=None,
        metavar="NAME,...",
        help=f"score only these categories (of {', '.join(CATEGORIES)})",
    )
    bench.add_argument("--steps", type=_positive_int, default=20, help="sampling steps")
    bench.add_argument("--sampler", default="flow_dpm")
    bench.add_argument(
        "--guidance", type=float, default=None, help="guidance scale (default: the model's)"
    )
    bench.add_argument("--batch-size", type=_positive_int, default=8)
    bench.add_argument(
        "--size",
        type=_positive_int,
        default=None,
        help="image side, generated at exactly this size (no resolution binning; default: "
        "256 for --ground-truth, else the model's native size)",
    )
    bench.add_argument(
        "--through-autoencoder",
        type=Path,
        default=None,
        metavar="DIR",
        help="with --ground-truth: encode and decode each render with this autoencoder folder "
        "(the best score a model using it can reach)",
    )
    bench.add_argument("--out", type=Path, default=None, help="write results.json/.md here")
    bench.add_argument("--save-images", action="store_true", help="also save images in --out")
    bench.set_defaults(func=_bench_command)

    text = commands.add_parser(
        "text-encoder",
        help="train the Shapes text encoder (a small Gemma-2 LM) and its tokenizer",
    )
    text.add_argument(
        "out", type=Path, help="pipeline folder: writes OUT/text_encoder and OUT/tokenizer"
    )
    text.add_argument("--steps", type=_positive_int, default=1500, help="training steps")
    text.add_argument("--seed", type=_non_negative_int, default=0)
    text.add_argument("--hidden", type=_positive_int, default=128, help="hidden size")
    text.add_argument("--layers", type=_positive_int, default=2, help="decoder layers")
    text.add_argument("--batch-size", type=_positive_int, default=64)
    text.add_argument("--lr", type=float, default=3e-3, help="peak AdamW learning rate")
    text.add_argument(
        "--recall-window",
        type=_non_negative_int,
        default=3,
        help="token-recall heads during training (0: a pure language model)",
    )
    text.add_argument(
        "--relation-recall",
        action="store_true",
        help="also train a head that reads the relation said so far from every token, so the "
        "second object's words carry its side of the image (docs/shapes.md, session 20)",
    )
    text.add_argument(
        "--init-from",
        type=Path,
        default=None,
        metavar="DIR",
        help="continue the encoder of this pipeline folder (its size replaces --hidden/--layers)",
    )
    text.add_argument(
        "--anchor-weight",
        type=float,
        default=3.0,
        help="with --init-from: weight of the loss that keeps the features near the starting "
        "encoder's, so a DiT trained on them still reads them (0: none; default 3)",
    )
    text.add_argument(
        "--threads",
        type=_positive_int,
        default=1,
        help="torch threads (default 1: the model is too small to gain from more)",
    )
    text.set_defaults(func=_text_encoder_command)
    return shapes


def _mix_text(mix: SceneMix) -> str:
    return ",".join(f"{k}={v:g}" for k, v in mix.as_dict().items())


def _scene_mix(text: str) -> SceneMix:
    try:
        return SceneMix.parse(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def _make_command(args: argparse.Namespace) -> int:
    out = make_dataset(
        args.out,
        args.n,
        size=args.size,
        seed=args.seed,
        webdataset_shards=args.webdataset_shards,
        include_held_out=args.include_held_out,
        mix=args.scene_mix,
        workers=args.workers,
    )
    kind = f"{args.webdataset_shards} WebDataset shards" if args.webdataset_shards else "folder"
    print(f"wrote {args.n} images ({kind}) to {out}")
    return 0


def _bench_command(args: argparse.Namespace) -> int:
    if args.save_images and args.out is None:
        raise SystemExit("shapes bench: --save-images needs --out")
    if args.ground_truth:
        generate = ground_truth_generator(args.size or 256)
        if args.through_autoencoder is not None:
            generate = autoencoder_round_trip(generate, args.through_autoencoder)
    elif args.through_autoencoder is not None:
        raise SystemExit("shapes bench: --through-autoencoder needs --ground-truth")
    else:
        from fastsana.pipeline import default_model_path

        generate = pipeline_generator(
            args.model or default_model_path(),
            steps=args.steps,
            sampler=args.sampler,
            guidance=args.guidance,
            size=args.size,
        )
    prompts = bench_prompts()
    if args.categories is not None:
        prompts = select_categories(prompts, args.categories)
    if args.prompts_per_category is not None:
        prompts = prompts_per_category(prompts, args.prompts_per_category)
    result = run_bench(
        generate,
        prompts=prompts,
        images_per_prompt=args.images_per_prompt,
        seed=args.seed,
        out_dir=args.out,
        save_images=args.save_images,
        batch_size=args.batch_size,
    )
    print(result.to_markdown())
    if args.out is not None:
        print(f"results written to {args.out}")
    return 0


def _text_encoder_command(args: argparse.Namespace) -> int:
    # Lazy: torch and transformers load only for this command.
    from fastsana.shapes.text_model import make_text_encoder

    summary = make_text_encoder(
        args.out,
        steps=args.steps,
        seed=args.seed,
        hidden_size=args.hidden,
        layers=args.layers,
        batch_size=args.batch_size,
        lr=args.lr,
        recall_window=args.recall_window,
        relation_recall=args.relation_recall,
        init_from=args.init_from,
        anchor_weight=args.anchor_weight,
        threads=args.threads,
    )
    before, after = summary["before"], summary["after"]
    print(
        f"text encoder: {summary['parameters']:,} parameters, vocabulary {summary['vocab_size']}, "
        f"{args.steps} steps in {summary['train_seconds']:.0f} s "
        f"({summary['steps_per_second']:.2f} steps/s)"
    )
    print(f"final training loss {summary['final_loss']:.4f}")
    if summary["feature_cosine_to_start"] is not None:
        print(f"mean feature cosine to the starting encoder {summary['feature_cosine_to_start']}")
    for name in after:
        print(f"  {name:<20} {before[name]:>9.4f} -> {after[name]:.4f}")
    for name, size in summary["files"].items():
        print(f"  {args.out / name}  {size:,} bytes")
    return 0


def autoencoder_round_trip(generate: Generate, folder: Path) -> Generate:
    """``generate``'s images encoded and decoded by the autoencoder in ``folder``."""
    import torch

    from fastsana.checkpoints.autoencoder import load_autoencoder
    from fastsana.pipeline import to_pil

    ae = load_autoencoder(folder).eval()

    def round_trip(prompts: list[str], seeds: list[int]) -> list[Image.Image]:
        images = generate(prompts, seeds)
        x = torch.from_numpy(np.stack([np.asarray(im.convert("RGB")) for im in images]))
        x = x.permute(0, 3, 1, 2).float() / 127.5 - 1  # (B, 3, H, W) in [-1, 1]
        with torch.no_grad():
            y = ae.decode(ae.encode(x))  # (B, 3, H, W)
        return to_pil((y / 2 + 0.5).clamp(0, 1))

    return round_trip


def pipeline_generator(
    model_dir: Path,
    *,
    steps: int,
    sampler: str,
    guidance: float | None,
    size: int | None = None,
    quantize: str | None = None,
) -> Generate:
    """ShapesBench generator backed by ``fastsana.SanaPipeline`` (the only pipeline wiring).
    ``size``: image side (default: the model's native size), generated at exactly that size
    (no resolution binning, which would otherwise score a 512-px model's 256-px request at
    512 px, resized); ``quantize``: e.g. ``"w8a8"``."""
    import torch

    from fastsana import SanaPipeline  # lazy: loads torch and the model only when benchmarking

    pipe = SanaPipeline.from_pretrained(model_dir, quantize=quantize)
    options: dict = {
        "num_inference_steps": steps,
        "sampler": sampler,
        "output_type": "pil",
        "height": size,
        "width": size,
        "use_resolution_binning": False,
        "progress": False,  # the benchmark shows its own progress bar
    }
    if guidance is not None:
        options["guidance_scale"] = guidance

    side = size or pipe.native_size
    f = pipe.vae.spatial_compression
    latent_shape = (pipe.transformer.config.in_channels, side // f, side // f)

    def generate(prompts: list[str], seeds: list[int]) -> list[Image.Image]:
        images: list[Image.Image | None] = [None] * len(prompts)
        for seed in dict.fromkeys(seeds):  # one call per distinct seed, its prompts batched
            where = [i for i, s in enumerate(seeds) if s == seed]
            noise = torch.stack([image_noise(prompts[i], seed, latent_shape) for i in where])
            outputs = pipe([prompts[i] for i in where], latents=noise, **options)
            for i, image in zip(where, outputs, strict=True):
                images[i] = image
        return images  # type: ignore[return-value]  # every slot was filled above

    return generate


def image_noise(prompt: str, seed: int, shape: tuple[int, ...]) -> torch.Tensor:
    """The initial noise of one benchmark image, drawn from ``(seed, prompt)`` alone.

    A pipeline call draws one noise tensor for its whole batch, so an image would change with
    the prompts batched beside it: ``--batch-size`` and a ``--categories`` subset would then
    change the scores. Per-image noise makes an image depend only on its prompt and seed."""
    import torch  # lazy, as in pipeline_generator

    from fastsana.seeding import keyed_generator

    return torch.randn(shape, generator=keyed_generator(prompt, seed), dtype=torch.float32)
