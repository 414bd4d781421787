"""Flow-matching error of DiTs on a cache, at fixed noise levels: which model denoises better?

The training loss mixes all noise levels with the objective's own σ distribution and is
logged on training batches. To compare models (e.g. before and after a fine-tune) on *new*
scenes, this script takes the last ``--n`` samples of a ``fastsana cache``, noises them with
the same noise for every model, and reports mean((v̂ − (ε − x0))²) per σ:

    x_σ = (1 − σ)·x0 + σ·ε,   v̂ = model(x_σ, 1000·σ, caption)

The caption of each sample is the one the cache's caption selection draws (seed 0, default
τ). Latents are multiplied by the autoencoder scaling factor recorded in the cache.

    .venv/bin/python bench/denoise_mse.py --cache cache/rel-256-val \
        --model src/fastsana/assets/sana-shapes --model models/rel256-1500
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from fastsana.checkpoints.transformer import load_transformer
from fastsana.training.cache import CachedLatentDataset
from fastsana.training.data import collate


def transformer_folder(path: Path) -> Path:
    """A pipeline folder's transformer/, or the folder itself."""
    return path / "transformer" if (path / "transformer").is_dir() else path


def denoise_mse(
    model: torch.nn.Module,
    x0: torch.Tensor,
    text: torch.Tensor,
    mask: torch.Tensor,
    sigmas: list[float],
    seed: int,
) -> list[float]:
    """MSE of the velocity at each σ; the noise is drawn from ``seed`` (the same per model)."""
    errors = []
    for sigma in sigmas:
        noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(seed))
        x_t = (1 - sigma) * x0 + sigma * noise  # (B, C, h, w)
        t = torch.full((len(x0),), sigma * 1000.0)  # (B,)
        with torch.no_grad():
            v = model(x_t, t, text, mask)  # (B, C, h, w)
        errors.append(float(((v - (noise - x0)) ** 2).mean()))
    return errors


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cache", type=Path, required=True, help="a fastsana cache folder")
    parser.add_argument("--model", type=Path, action="append", required=True, help="repeatable")
    parser.add_argument("--sigmas", default="0.2,0.5,0.8,0.95,1.0")
    parser.add_argument("--n", type=int, default=64, help="samples from the end of the cache")
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()

    sigmas = [float(s) for s in args.sigmas.split(",")]
    if not all(0.0 <= s <= 1.0 for s in sigmas):
        parser.error(f"--sigmas must lie in [0, 1], got {args.sigmas}")
    dataset = CachedLatentDataset(args.cache)
    n = min(args.n, len(dataset))
    batch = collate([dataset[i] for i in range(len(dataset) - n, len(dataset))])
    scale = float(dataset.info["info"]["scaling_factor"])
    x0 = batch["latents"].float() * scale  # (n, C, h, w)
    text, mask = batch["text_embeds"].float(), batch["text_mask"]  # (n, L, D), (n, L)

    print(f"{n} samples of {args.cache}, latents {tuple(x0.shape[1:])}")
    print("| model | " + " | ".join(f"σ = {s:g}" for s in sigmas) + " |")
    print("|---|" + "---|" * len(sigmas))
    for path in args.model:
        model = load_transformer(transformer_folder(path), dtype=torch.float32).eval()
        errors = denoise_mse(model, x0, text, mask, sigmas, args.seed)
        print(f"| {path} | " + " | ".join(f"{e:.4f}" for e in errors) + " |")


if __name__ == "__main__":
    main()
