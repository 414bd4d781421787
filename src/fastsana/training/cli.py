"""``fastsana train``, ``fastsana cache`` and ``fastsana export`` (registered by the main CLI
through :func:`add_train_commands`)."""

from __future__ import annotations

import argparse
import logging

from fastsana.cli import UsageError


def cmd_train(args: argparse.Namespace) -> int:
    from fastsana.training.config import load_config
    from fastsana.training.trainer import train

    config = load_config(args.config, args.overrides)
    _log_to_stderr()
    summary = train(config, resume=args.resume)
    if summary.end_step == summary.start_step:
        print(f"nothing to do: the run is already at step {summary.end_step}")
    loss = f", last loss {summary.last_loss:.4g}" if summary.last_loss is not None else ""
    print(f"trained steps {summary.start_step}..{summary.end_step}{loss}")
    if summary.export_dir is not None:
        print(f"exported to {summary.export_dir}")
    return 0


def cmd_cache(args: argparse.Namespace) -> int:
    from fastsana.cli import parse_dtype
    from fastsana.training.components import component_paths
    from fastsana.training.config import ModelConfig
    from fastsana.training.precompute import cache_dataset

    if args.pipeline is None and (args.vae is None or args.text_encoder is None):
        raise UsageError("give --pipeline DIR, or --vae, --text-encoder and --tokenizer")
    model = ModelConfig(
        pipeline=args.pipeline,
        vae=args.vae,
        text_encoder=args.text_encoder,
        tokenizer=args.tokenizer or args.text_encoder,
    )
    _log_to_stderr()
    summary = cache_dataset(
        args.folder,
        args.cache_dir,
        component_paths(model),
        base_size=args.base_size,
        batch_size=args.batch_size,
        text_max_length=args.text_max_length,
        instruction=not args.no_instruction,
        echo=args.echo,
        device=args.device,
        dtype=parse_dtype(args.dtype),
    )
    print(
        f"cached {summary.written} image(s) in {args.cache_dir} ({summary.already_cached} "
        f"already cached, {summary.skipped} unreadable skipped)"
    )
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from fastsana.training.export import export_checkpoint

    out = export_checkpoint(args.checkpoint, args.out, weights=args.weights, dtype=args.dtype)
    print(f"exported {args.checkpoint} ({args.weights} weights) to {out}")
    return 0


def _log_to_stderr() -> None:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")


def add_train_commands(subparsers: argparse._SubParsersAction) -> None:
    train = subparsers.add_parser(
        "train",
        help="train the DiT, LoRA adapters or the autoencoder from a YAML config "
        "(torchrun-ready; see docs/training.md)",
    )
    train.add_argument("config", help="training config (YAML)")
    train.add_argument(
        "--resume",
        nargs="?",
        const="auto",
        default=None,
        metavar="PATH|auto",
        help="continue from a checkpoint: 'auto' (the default when the flag is bare) takes the "
        "newest valid one in output_dir; or a step-N folder or run folder",
    )
    train.add_argument(
        "--set",
        dest="overrides",
        action="extend",
        nargs="+",
        default=[],
        metavar="KEY=VALUE",
        help="override config fields, e.g. --set optimizer.lr=2e-4 data.batch_size=16 "
        "(values are YAML)",
    )
    train.set_defaults(func=cmd_train)

    cache = subparsers.add_parser(
        "cache", help="pre-compute autoencoder latents and caption embeddings of an image folder"
    )
    cache.add_argument("folder", help="image folder with metadata.jsonl")
    cache.add_argument("cache_dir", help="output cache folder (resumable)")
    cache.add_argument(
        "--pipeline", help="pipeline folder supplying vae/, text_encoder/, tokenizer/"
    )
    cache.add_argument("--vae", help="autoencoder folder (overrides the pipeline's)")
    cache.add_argument("--text-encoder", help="text encoder folder (overrides the pipeline's)")
    cache.add_argument("--tokenizer", help="tokenizer folder (default: --text-encoder)")
    cache.add_argument("--base-size", type=int, default=512, help="bucket base size (default 512)")
    cache.add_argument("--batch-size", type=int, default=16)
    cache.add_argument("--text-max-length", type=int, default=300, help="caption tokens (300)")
    cache.add_argument(
        "--no-instruction",
        action="store_true",
        help="encode bare captions, without the complex human instruction "
        "(train with model.text_instruction: false)",
    )
    cache.add_argument(
        "--echo",
        action="store_true",
        help="encode each caption twice and keep the second copy, whose tokens see the whole "
        "caption (train with model.text_echo: true)",
    )
    cache.add_argument(
        "--dtype",
        choices=["fp32", "bf16", "fp16"],
        default="fp32",
        help="stored dtype (bf16 halves the cache)",
    )
    cache.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    cache.set_defaults(func=cmd_cache)

    export = subparsers.add_parser(
        "export",
        help="turn a training checkpoint into a pipeline folder (DiT, LoRA merged) or an "
        "autoencoder folder",
    )
    export.add_argument("checkpoint", help="a step-N checkpoint folder or a run folder")
    export.add_argument("out", help="output folder")
    export.add_argument("--weights", choices=["ema", "model"], default="ema")
    export.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default="fp32")
    export.set_defaults(func=cmd_export)
