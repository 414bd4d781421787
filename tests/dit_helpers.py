"""Inputs and randomised models shared by the DiT tests."""

from __future__ import annotations

import torch

from fastsana.configs import DiTConfig
from fastsana.models.dit import SanaTransformer


def dit_inputs(config: DiTConfig, batch: int = 2, size: tuple[int, int] = (8, 6), seed: int = 0):
    """Latents, timesteps, a 5-token caption and its mask (the first caption padded)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, config.in_channels, *size, generator=g)
    t = torch.rand(batch, generator=g) * 1000
    text = torch.randn(batch, 5, config.caption_channels, generator=g)
    mask = torch.ones(batch, 5, dtype=torch.bool)
    mask[0, 3:] = False
    return x, t, text, mask


def random_dit(config: DiTConfig, seed: int = 0) -> SanaTransformer:
    """Random values in every parameter (the training init zeroes some on purpose)."""
    torch.manual_seed(seed)
    model = SanaTransformer(config)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.1)
    return model
