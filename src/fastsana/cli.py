"""The ``fastsana`` command line: thin wrappers over the public Python API.

Every command reports bad input as one line on stderr and exits with status 2.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import NoReturn

import torch

from fastsana.configs import DIT_PRESETS
from fastsana.resolution import MAX_SIDE

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


class UsageError(Exception):
    """Bad user input detected by a command; printed as one line, exit status 2."""


class _Parser(argparse.ArgumentParser):
    """argparse whose errors are one line (no usage dump), exit status 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def parse_dtype(name: str | None) -> torch.dtype | None:
    if name is None:
        return None
    try:
        return DTYPES[name]
    except KeyError:
        raise UsageError(f"--dtype must be one of {', '.join(DTYPES)}, got {name!r}") from None


# ------------------------------------------------------------------------------ commands


def cmd_demo(args: argparse.Namespace) -> None:
    """One forward pass of a preset with random weights (until a default model ships)."""
    from fastsana.models.dit import SanaTransformer, count_parameters

    preset = DIT_PRESETS[args.preset]
    config = preset.config
    torch.manual_seed(0)
    model = SanaTransformer(config).eval().to(parse_dtype(args.dtype) or torch.float32)
    side = args.latent_size or config.sample_size
    x = torch.randn(1, config.in_channels, side, side)
    text = torch.randn(
        1, 300 if args.text_tokens is None else args.text_tokens, config.caption_channels
    )
    start = time.perf_counter()
    with torch.no_grad():
        v = model(x, torch.tensor([500.0]), text, torch.ones(text.shape[:2]))
    elapsed = time.perf_counter() - start
    print(
        f"{args.preset}: {count_parameters(model):,} parameters ({preset.description}); "
        f"forward on a {side}×{side} latent ({side * 32}² px with DC-AE f32) and "
        f"{text.shape[1]} text tokens → {tuple(v.shape)} in {elapsed:.2f} s "
        f"({model.dtype}, {torch.get_num_threads()} threads)"
    )


def cmd_convert(args: argparse.Namespace) -> None:
    """Convert an official or diffusers checkpoint to a diffusers-format folder."""
    from fastsana.checkpoints.transformer import convert_transformer

    config = convert_transformer(args.src, args.dst, dtype=parse_dtype(args.dtype))
    print(f"wrote {args.dst} (transformer: depth {config.depth}, width {config.hidden_size})")


# ------------------------------------------------------------------------------ generate


def parse_size(text: str) -> tuple[int, int]:
    """'WIDTHxHEIGHT' (or one number for a square) → (height, width)."""
    parts = text.lower().replace("*", "x").split("x")
    try:
        sides = [int(p) for p in parts]
    except ValueError:
        raise UsageError(f"--size must look like 1024x768 (width x height), got {text!r}") from None
    if len(sides) == 1:
        sides = sides * 2
    if len(sides) != 2:
        raise UsageError(f"--size must look like 1024x768 (width x height), got {text!r}")
    width, height = sides
    for name, side in (("width", width), ("height", height)):
        # Every SANA autoencoder compresses 32× per side.
        if not 32 <= side <= MAX_SIDE or side % 32:
            raise UsageError(
                f"--size {name} must be a multiple of 32 between 32 and {MAX_SIDE}, got {side}"
            )
    return height, width


def read_prompts(args: argparse.Namespace) -> list[str]:
    prompts = [args.prompt] if args.prompt is not None else []
    if args.prompt_file is not None:
        path = Path(args.prompt_file)
        if not path.is_file():
            raise UsageError(f"--prompt-file {path} does not exist")
        prompts += [line.strip() for line in path.read_text().splitlines() if line.strip()]
        if not prompts:
            raise UsageError(f"--prompt-file {path} has no prompts (one per line)")
    if not prompts:
        raise UsageError("give a prompt or --prompt-file FILE")
    if any(not p.strip() for p in prompts):
        raise UsageError("the prompt is empty")
    return prompts


def output_paths(output: Path, count: int) -> list[Path]:
    if count == 1:
        return [output]
    return [output.with_name(f"{output.stem}-{i:03d}{output.suffix}") for i in range(count)]


def cmd_generate(args: argparse.Namespace) -> None:
    """Generate images from prompts and write PNGs with their settings as metadata."""
    import random

    from fastsana.images import make_grid, save_png
    from fastsana.pipeline import (
        MODEL_DEFAULT,
        SanaPipeline,
        default_model_path,
        encode_prompts,
        free_memory,
        load_text_encoder,
    )

    prompts = read_prompts(args)
    height, width = parse_size(args.size) if args.size else (None, None)
    output = Path(args.output)
    if output.suffix.lower() != ".png":
        raise UsageError(f"-o/--output must end in .png, got {output}")
    if args.batch < 1:
        raise UsageError(f"--batch must be ≥ 1, got {args.batch}")
    if args.guidance is not None and not (math.isfinite(args.guidance) and args.guidance >= 0):
        raise UsageError(f"--guidance must be a finite number ≥ 0, got {args.guidance}")
    model = args.model or default_model_path()
    dtype = parse_dtype(args.dtype)

    # Encode every prompt with the text encoder alone and free it before the DiT and the
    # autoencoder are loaded: for SANA's Gemma-2-2B it is the largest part (5-10 GB), so the
    # peak is the larger of the two stages, not their sum (docs/benchmarks.md, "Memory").
    encoder, defaults = load_text_encoder(model, dtype=dtype, device=args.device)
    guidance = defaults.guidance_scale if args.guidance is None else args.guidance
    use_instruction = defaults.instruction and not args.no_instruction
    per_call = max(1, args.max_batch // args.batch)
    starts = range(0, len(prompts), per_call)
    conditions = [
        encode_prompts(
            encoder,
            defaults,
            prompts[start : start + per_call],
            args.negative,
            None if args.no_instruction else MODEL_DEFAULT,
            guidance=guidance != 1.0,
        )
        for start in starts
    ]
    del encoder
    free_memory()

    pipe = SanaPipeline.from_pretrained(
        model, dtype=dtype, device=args.device, quantize=args.quantize, load_text_encoder=False
    )
    pipe.cuda_graphs = not args.no_cuda_graphs
    settings = pipe.resolve(height, width, args.steps, guidance, args.sampler, args.seed)
    seed = settings.seed if settings.seed is not None else random.randrange(2**31)

    images, records = [], []
    for start, (cond, uncond) in zip(starts, conditions, strict=True):
        chunk = prompts[start : start + per_call]
        call_seed = seed + start  # each call draws its own batch of noise from its seed
        images += pipe(
            prompt_embeds=cond,
            negative_prompt_embeds=uncond,
            height=settings.height,
            width=settings.width,
            num_inference_steps=settings.steps,
            guidance_scale=settings.guidance_scale,
            seed=call_seed,
            sampler=settings.sampler,
            num_images_per_prompt=args.batch,
            use_resolution_binning=not args.no_binning,
        )
        for i, prompt in enumerate(p for p in chunk for _ in range(args.batch)):
            records.append(
                {
                    "prompt": prompt,
                    "negative_prompt": args.negative,
                    "seed": call_seed,
                    "batch_index": i,
                    "batch_size": len(chunk) * args.batch,
                    "size": f"{settings.width}x{settings.height}",
                    "steps": settings.steps,
                    "guidance_scale": settings.guidance_scale,
                    "sampler": settings.sampler,
                    "flow_shift": settings.flow_shift,
                    "complex_human_instruction": use_instruction,
                    "echo": defaults.echo,
                    "model": str(model),
                    "quantize": args.quantize,
                }
            )
    if args.grid:
        save_png(make_grid(images), output, {"images": records})
        print(f"wrote {output} ({len(images)} images in a grid)")
        return
    for image, record, path in zip(images, records, output_paths(output, len(images)), strict=True):
        save_png(image, path, record)
        print(f"wrote {path}")


def add_generate_command(sub: argparse._SubParsersAction) -> None:
    from fastsana.quantize import QUANTIZATION_MODES
    from fastsana.sampling import SAMPLERS

    gen = sub.add_parser(
        "generate",
        help="generate images from a prompt (default: the embedded Shapes model)",
        description="Generate images. Unset options come from the model's defaults "
        "(steps, guidance, flow shift, native size).",
    )
    gen.add_argument("prompt", nargs="?", default=None, help="the prompt (or use --prompt-file)")
    gen.add_argument(
        "-o",
        "--output",
        default="fastsana.png",
        help="PNG path (default %(default)s); "
        "several images are numbered out-000.png, out-001.png, …",
    )
    gen.add_argument("--prompt-file", help="text file with one prompt per line")
    gen.add_argument("--model", help="pipeline folder or Hub id (default: the embedded model)")
    gen.add_argument("--size", help="WIDTHxHEIGHT, multiples of 32 (default: the model's native)")
    gen.add_argument("--steps", type=int, default=None, help="sampling steps (default: model's)")
    gen.add_argument("--guidance", type=float, default=None, help="CFG scale; 1 disables CFG")
    gen.add_argument("--seed", type=int, default=None, help="noise seed (default: random)")
    gen.add_argument(
        "--sampler",
        choices=sorted(SAMPLERS),
        default=None,
        help="flow_dpm (Flow-DPM-Solver, default) or flow_euler",
    )
    gen.add_argument("--negative", default="", help="negative prompt")
    gen.add_argument("--batch", type=int, default=1, help="images per prompt")
    gen.add_argument("--max-batch", type=int, default=8, help="images per forward batch")
    gen.add_argument("--grid", action="store_true", help="write all images as one grid PNG")
    gen.add_argument("--device", default=None, help="cpu, cuda, cuda:1 … (default: cuda if any)")
    gen.add_argument(
        "--dtype",
        choices=list(DTYPES),
        default=None,
        help="weights dtype (default: bf16 on CUDA, fp32 on CPU)",
    )
    gen.add_argument(
        "--quantize",
        choices=list(QUANTIZATION_MODES),
        default=None,
        help="w8a8: int8 weights and activations in the transformer's linear layers "
        "(int8 matmuls: meant for CUDA, much slower than fp32 on CPU; default: off)",
    )
    gen.add_argument(
        "--no-instruction",
        action="store_true",
        help="encode the prompt without the complex human instruction "
        "(models trained without one never use it)",
    )
    gen.add_argument(
        "--no-cuda-graphs",
        action="store_true",
        help="on CUDA, run the DiT eagerly instead of replaying it from CUDA graphs",
    )
    gen.add_argument(
        "--no-binning",
        action="store_true",
        help="generate at the exact size instead of the nearest trained aspect ratio",
    )
    gen.set_defaults(func=cmd_generate)


# -------------------------------------------------------------------------------- parser


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="fastsana", description="SANA text-to-image: generate, convert, train.")
    sub = parser.add_subparsers(
        dest="command", required=True, metavar="COMMAND", parser_class=_Parser
    )
    add_generate_command(sub)

    demo = sub.add_parser("demo", help="run a forward pass of a preset (random weights)")
    demo.add_argument("--preset", choices=list(DIT_PRESETS), default="sana-small")
    demo.add_argument("--latent-size", type=int, default=None, help="latent side (default: native)")
    demo.add_argument("--text-tokens", type=int, default=None, help="caption length (default 300)")
    demo.add_argument("--dtype", choices=list(DTYPES), default="fp32")
    demo.set_defaults(func=cmd_demo)

    convert = sub.add_parser(
        "convert",
        help="convert an official NVlabs .pth/.safetensors (or diffusers) transformer "
        "checkpoint to a diffusers-format folder",
    )
    convert.add_argument("src", help="official checkpoint file or diffusers folder")
    convert.add_argument("dst", help="output folder (config.json + safetensors)")
    convert.add_argument("--dtype", choices=list(DTYPES), default=None, help="default: as stored")
    convert.set_defaults(func=cmd_convert)

    from fastsana.shapes.cli import add_shapes_commands
    from fastsana.training.cli import add_train_commands

    add_train_commands(sub)
    add_shapes_commands(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    from fastsana.checkpoints.common import CheckpointError

    parser = build_parser()
    args = parser.parse_args(argv)
    func: Callable[[argparse.Namespace], int | None] = args.func
    try:
        status = func(args)
    except (UsageError, CheckpointError, FileNotFoundError, ValueError) as e:
        print(f"fastsana {args.command}: error: {e}".splitlines()[0], file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return status or 0


if __name__ == "__main__":
    sys.exit(main())
