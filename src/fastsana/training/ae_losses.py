"""Reconstruction losses of the autoencoder, none of which needs downloaded weights.

- L1 on pixels in [-1, 1].
- SSIM (Wang et al. 2004) on pixels mapped to [0, 1], per channel, with an 11×11 Gaussian
  window (σ = 1.5), C1 = 0.01², C2 = 0.03², averaged over the valid (unpadded) positions;
  the loss term is 1 − SSIM. It rewards matching local means, contrasts and structure, the
  textures L1 alone blurs.
- An optional hinge GAN term with a small patch discriminator
  (:class:`PatchDiscriminator`): the generator minimises −D(x̂); the discriminator minimises
  relu(1 − D(x)) + relu(1 + D(x̂)).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

SSIM_WINDOW = 11
SSIM_SIGMA = 1.5
SSIM_C1 = 0.01**2
SSIM_C2 = 0.03**2


def gaussian_window(size: int = SSIM_WINDOW, sigma: float = SSIM_SIGMA) -> Tensor:
    """Normalised (size, size) Gaussian, float64."""
    coords = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-(coords**2) / (2 * sigma**2))
    g = g / g.sum()
    return g[:, None] * g[None, :]


def ssim(x: Tensor, y: Tensor) -> Tensor:
    """Mean SSIM of two image batches (B, C, H, W) in [-1, 1]; H, W >= 11. Computed in fp32."""
    if x.shape != y.shape or x.dim() != 4:
        raise ValueError(
            f"ssim needs two (B, C, H, W) batches of one shape, got {x.shape}, {y.shape}"
        )
    if min(x.shape[-2:]) < SSIM_WINDOW:
        raise ValueError(
            f"ssim needs images of at least {SSIM_WINDOW} pixels a side, got {x.shape}"
        )
    channels = x.shape[1]
    x = (x.float() + 1) / 2  # (B, C, H, W) in [0, 1]
    y = (y.float() + 1) / 2
    w = gaussian_window().to(x.device, torch.float32)
    w = w.expand(channels, 1, SSIM_WINDOW, SSIM_WINDOW)  # depthwise: one window per channel

    def blur(t: Tensor) -> Tensor:
        return F.conv2d(t, w, groups=channels)  # (B, C, H−10, W−10)

    mu_x, mu_y = blur(x), blur(y)
    var_x = blur(x * x) - mu_x**2
    var_y = blur(y * y) - mu_y**2
    cov = blur(x * y) - mu_x * mu_y
    num = (2 * mu_x * mu_y + SSIM_C1) * (2 * cov + SSIM_C2)
    den = (mu_x**2 + mu_y**2 + SSIM_C1) * (var_x + var_y + SSIM_C2)
    return (num / den).mean()


def reconstruction_loss(
    x: Tensor, recon: Tensor, l1_weight: float, ssim_weight: float, mse_weight: float = 0.0
) -> tuple[Tensor, dict[str, float]]:
    """l1_weight·|x − x̂| + mse_weight·(x − x̂)² + ssim_weight·(1 − SSIM(x, x̂)), means over
    pixels; also returns the parts for logging."""
    error = recon.float() - x.float()
    l1 = error.abs().mean()
    loss = l1_weight * l1
    parts = {"l1": float(l1.detach())}
    if mse_weight > 0:
        mse = error.square().mean()
        loss = loss + mse_weight * mse
        parts["mse"] = float(mse.detach())
    if ssim_weight > 0:
        s = ssim(recon, x)
        loss = loss + ssim_weight * (1 - s)
        parts["ssim"] = float(s.detach())
    return loss, parts


def psnr(x: Tensor, recon: Tensor) -> float:
    """Peak signal-to-noise ratio in dB for images in [-1, 1] (peak-to-peak 2)."""
    mse = torch.mean((recon.detach().float().clamp(-1, 1) - x.float()) ** 2)
    return float(10 * torch.log10(4.0 / mse.clamp_min(1e-12)))


def generator_adversarial_loss(fake_logits: Tensor) -> Tensor:
    return -fake_logits.float().mean()


def discriminator_loss(real_logits: Tensor, fake_logits: Tensor) -> Tensor:
    real = F.relu(1 - real_logits.float()).mean()
    fake = F.relu(1 + fake_logits.float()).mean()
    return real + fake


class PatchDiscriminator(nn.Module):
    """A PatchGAN discriminator: strided 4×4 convs → one logit per overlapping patch.

    ``layers`` stride-2 stages widen ``channels`` ×2 each (capped at 8×); GroupNorm instead of
    BatchNorm so the statistics do not depend on the per-process batch under DDP.
    """

    def __init__(self, in_channels: int = 3, channels: int = 64, layers: int = 3) -> None:
        super().__init__()
        stages: list[nn.Module] = [
            nn.Conv2d(in_channels, channels, 4, stride=2, padding=1),
            nn.LeakyReLU(0.2),
        ]
        width = channels
        for i in range(1, layers + 1):
            out = channels * min(2**i, 8)
            stride = 2 if i < layers else 1
            stages += [
                nn.Conv2d(width, out, 4, stride=stride, padding=1, bias=False),
                nn.GroupNorm(math.gcd(out, 32), out),
                nn.LeakyReLU(0.2),
            ]
            width = out
        stages.append(nn.Conv2d(width, 1, 4, stride=1, padding=1))
        self.net = nn.Sequential(*stages)
        self.init_weights()

    def init_weights(self) -> None:
        """N(0, 0.02) convolutions and unit norms: the DCGAN/pix2pix recipe, which keeps the
        initial logits near 0 so neither side of the hinge loss saturates at the start."""
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.normal_(module.weight, std=0.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.GroupNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)  # (B, 1, h, w) patch logits
