"""Validation grids: fixed prompts × fixed seeds through the real pipeline, one PNG per call.

Rows are prompts, columns seeds; each column is one pipeline call on all prompts with that
seed, so a grid at step N and at step M differ only by the weights.

Images are generated at exactly the asked size, without resolution binning: binning would
move a 256-px validation of a model whose ``sample_size`` says 512 px to the 512-px bin, so
the grid would show the model at a size it is not being trained at.
"""

from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image

from fastsana.images import make_grid, save_png
from fastsana.pipeline import SanaPipeline, to_pil
from fastsana.training.config import ValidationConfig


def validation_images(
    pipe: SanaPipeline, config: ValidationConfig, default_side: int
) -> list[list[Image.Image]]:
    """images[p][s]: prompt p with seed s."""
    columns = [
        pipe(
            list(config.prompts),
            negative_prompt=config.negative_prompt,
            height=config.height or default_side,
            width=config.width or default_side,
            num_inference_steps=config.steps,
            guidance_scale=config.guidance_scale,
            seed=seed,
            sampler=config.sampler,
            use_resolution_binning=False,
            progress=False,
        )
        for seed in config.seeds
    ]
    return [[column[p] for column in columns] for p in range(len(config.prompts))]


def save_validation_grid(
    pipe: SanaPipeline, config: ValidationConfig, default_side: int, path: Path, step: int
) -> Path:
    rows = validation_images(pipe, config, default_side)
    grid = make_grid([image for row in rows for image in row], columns=len(config.seeds))
    metadata = {
        "step": step,
        "prompts": list(config.prompts),
        "seeds": list(config.seeds),
        "steps": config.steps,
        "guidance_scale": config.guidance_scale,
        "sampler": config.sampler,
    }
    return save_png(grid, path, metadata)


def save_reconstruction_grid(
    images: torch.Tensor, recon: torch.Tensor, path: Path, step: int
) -> Path:
    """Autoencoder validation: inputs (top row) over reconstructions, (B, 3, H, W) in [-1, 1]."""
    pictures = to_pil(((torch.cat([images, recon]).float() + 1) / 2).clamp(0, 1))
    grid = make_grid(pictures, columns=len(images))
    return save_png(grid, path, {"step": step, "rows": ["input", "reconstruction"]})
