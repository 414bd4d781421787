"""The ``fastsana`` command line: thin wrappers over the public Python API.

Every command reports bad input as one line on stderr and exits with status 2.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable, Sequence

import torch

from fastsana.configs import DIT_PRESETS

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


class UsageError(Exception):
    """Bad user input detected by a command; printed as one line, exit status 2."""


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


# -------------------------------------------------------------------------------- parser


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fastsana", description="SANA text-to-image: generate, convert, train."
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

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
