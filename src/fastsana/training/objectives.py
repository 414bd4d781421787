"""The rectified-flow objective of the DiT, and the per-sample random draws it needs.

For clean latents x0 (already multiplied by the autoencoder's scaling factor), noise ε and a
noise level σ ∈ (0, 1):

    x_σ = (1 − σ)·x0 + σ·ε,     target v = ε − x0,     loss = mean((v̂ − v)²)

over all elements, unweighted. σ is logit-normal, u = sigmoid(N(m, s²)), then moved toward
the noise end by the model's flow shift, σ = k·u / (1 + (k − 1)·u) (the same shift the
sampler applies to its schedule); optionally a fraction of the samples draws σ uniformly from
a band next to 1 instead, where the layout of the image is decided. The network sees
t = 1000·σ.

Randomness per sample. Every random number a sample needs in one step (its noise, its σ,
whether its caption is dropped, an autoencoder crop) comes from a generator seeded with
``(seed, step, batch_index, key)``: ``key`` is the sample's file name and ``batch_index`` the
position of its micro-batch in the step's global batch (micro-batch i of rank r of R is
i·R + r, which is what one process accumulating R times as many micro-batches calls it). So
one process and N processes training on the same global batch draw identical noise, and a
resumed run redraws exactly what the interrupted one would have.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from fastsana.sampling import NUM_TRAIN_TIMESTEPS, shift_sigmas
from fastsana.seeding import keyed_generator


def sample_generator(seed: int, step: int, batch_index: int, key: str) -> torch.Generator:
    """A CPU generator that depends only on ``(seed, step, batch_index, key)``."""
    return keyed_generator(key, seed, step, batch_index)


@dataclass(frozen=True)
class FlowDraws:
    """The random inputs of one batch: noise like the latents, σ (B,), caption drop (B,)."""

    noise: Tensor
    sigmas: Tensor
    drop_caption: Tensor


def draw_flow_inputs(
    keys: Sequence[str],
    latent_shape: Sequence[int],
    *,
    seed: int,
    step: int,
    batch_index: int = 0,
    flow_shift: float,
    logit_mean: float = 0.0,
    logit_std: float = 1.0,
    caption_dropout: float = 0.1,
    high_sigma_fraction: float = 0.0,
    high_sigma_min: float = 0.95,
) -> FlowDraws:
    """Noise (B, *latent_shape), σ (B,) and caption-drop flags (B,).

    σ is shifted logit-normal, except that with probability ``high_sigma_fraction`` a sample
    draws it uniformly from [``high_sigma_min``, 1). Drawn on the CPU in float32 from each
    sample's own generator (see the module docstring); the band's draws come last, so a run
    without it draws exactly what it always did.
    """
    noise, normals, uniforms, band = [], [], [], []
    for key in keys:
        g = sample_generator(seed, step, batch_index, key)
        noise.append(torch.randn(tuple(latent_shape), generator=g))
        normals.append(torch.randn((), generator=g))
        uniforms.append(torch.rand((), generator=g))
        band.append(torch.rand(2, generator=g) if high_sigma_fraction > 0 else torch.ones(2))
    u = torch.sigmoid(logit_mean + logit_std * torch.stack(normals))  # (B,)
    sigmas = shift_sigmas(u, flow_shift)  # (B,)
    in_band, where = torch.stack(band).unbind(1)  # (B,), (B,) uniform in [0, 1)
    high = high_sigma_min + (1 - high_sigma_min) * where  # (B,) uniform in [min, 1)
    return FlowDraws(
        noise=torch.stack(noise),  # (B, C, h, w)
        sigmas=torch.where(in_band < high_sigma_fraction, high, sigmas),  # (B,)
        drop_caption=torch.stack(uniforms) < caption_dropout,  # (B,)
    )


def noisy_latents(x0: Tensor, noise: Tensor, sigmas: Tensor) -> Tensor:
    """x_σ = (1 − σ)·x0 + σ·ε, σ broadcast over each sample."""
    s = sigmas.to(x0.dtype).view(-1, *([1] * (x0.dim() - 1)))  # (B, 1, 1, 1)
    return (1 - s) * x0 + s * noise


def flow_matching_loss(
    model: nn.Module,
    x0: Tensor,
    text: Tensor,
    text_mask: Tensor,
    draws: FlowDraws,
) -> Tensor:
    """MSE between the model's velocity at x_σ and ε − x0, averaged over every element."""
    noise = draws.noise.to(x0.device, x0.dtype)
    sigmas = draws.sigmas.to(x0.device)
    x_t = noisy_latents(x0, noise, sigmas)  # (B, C, h, w)
    v = model(x_t, sigmas * NUM_TRAIN_TIMESTEPS, text, text_mask)  # (B, C, h, w)
    return torch.mean((v.float() - (noise - x0).float()) ** 2)


def drop_captions(
    text: Tensor, mask: Tensor, null_text: Tensor, null_mask: Tensor, drop: Tensor
) -> tuple[Tensor, Tensor]:
    """Replace the captions flagged in ``drop`` (B,) by the null caption (1, L', D).

    The null caption is padded or cut to the batch's length L; only its masked-out tail is
    touched, so nothing the model attends to changes.
    """
    length = text.shape[1]
    if null_mask.shape[1] > length and bool(null_mask[:, length:].any()):
        raise ValueError(
            f"the null caption has {int(null_mask[0].sum())} tokens, more than the batch's "
            f"length {length}; encode captions with at least as many tokens"
        )
    null_text = _fit_length(null_text, length).to(text.device, text.dtype)  # (1, L, D)
    null_mask = _fit_length(null_mask, length).to(mask.device, mask.dtype)  # (1, L)
    drop = drop.to(text.device)
    text = torch.where(drop[:, None, None], null_text, text)  # (B, L, D)
    mask = torch.where(drop[:, None], null_mask, mask)  # (B, L)
    return text, mask


def _fit_length(tensor: Tensor, length: int) -> Tensor:
    """Cut or zero-pad dimension 1 to ``length``."""
    if tensor.shape[1] >= length:
        return tensor[:, :length]
    padding = tensor.new_zeros((tensor.shape[0], length - tensor.shape[1], *tensor.shape[2:]))
    return torch.cat([tensor, padding], dim=1)
