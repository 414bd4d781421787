"""Training the DC-AE on random crops (task ``ae``).

The autoencoder is convolutional, so it trains on crops (``data.crop_size``, a multiple of the
spatial compression) of the bucketed images: a 256-px crop costs a quarter of a 512-px image
and teaches the same local statistics. The crop of each sample is drawn from its own
generator (:func:`~fastsana.training.objectives.sample_generator`), so it is the same on any
number of processes and after a resume.

Loss: ``l1_weight``·L1 + ``ssim_weight``·(1 − SSIM), plus, from
``adversarial_start_step`` on, ``adversarial_weight``·(−D(x̂)) with a patch discriminator
trained by the hinge loss in the same step (its own optimizer, same schedule).

Export measures ``scaling_factor = 1/std(latents)`` on ``ae_loss.scaling_factor_batches``
batches, so the DiT trained on this autoencoder sees unit-variance latents.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from fastsana.checkpoints.autoencoder import save_autoencoder
from fastsana.checkpoints.common import load_state_dict_into
from fastsana.models.dcae import DCAE
from fastsana.training.ae_losses import (
    PatchDiscriminator,
    discriminator_loss,
    generator_adversarial_loss,
    psnr,
    reconstruction_loss,
)
from fastsana.training.config import TrainConfig
from fastsana.training.distributed import DistEnv, no_gradient_sync, wrap
from fastsana.training.loader import build_batches
from fastsana.training.model_setup import arch_dict, build_autoencoder
from fastsana.training.objectives import sample_generator
from fastsana.training.parts import Part, autocast
from fastsana.training.validation import save_reconstruction_grid

logger = logging.getLogger(__name__)

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
VALIDATION_IMAGES = 8


def random_crops(
    pixels: Tensor, keys: list[str], size: int, *, seed: int, step: int, batch_index: int
) -> Tensor:
    """A ``size``×``size`` crop of each image (B, C, H, W), at an offset drawn per sample.

    ``size`` is capped at the batch's smaller side.
    """
    _, _, height, width = pixels.shape
    side = min(size, height, width)
    crops = []
    for image, key in zip(pixels, keys, strict=True):
        g = sample_generator(seed, step, batch_index, key)
        top = int(torch.randint(height - side + 1, (), generator=g))
        left = int(torch.randint(width - side + 1, (), generator=g))
        crops.append(image[:, top : top + side, left : left + side])
    return torch.stack(crops)  # (B, C, side, side)


class AETask:
    def __init__(self, config: TrainConfig, env: DistEnv) -> None:
        self.config = config
        self.env = env
        self.batches = build_batches(config.data, seed=config.seed, env=env)
        ae = build_autoencoder(config.model, config.seed)
        f = ae.spatial_compression
        if config.data.crop_size % f:
            raise ValueError(
                f"data.crop_size ({config.data.crop_size}) must be a multiple of the "
                f"autoencoder's spatial compression {f}"
            )
        if config.model.gradient_checkpointing:
            ae.gradient_checkpointing = True
        self.ae = ae.to(env.device).train()
        module = wrap(self.ae, env, "ddp", None)
        self.part = Part("model", module, self.ae, config.optimizer, config.ema)
        self.parts = [self.part]
        self.disc: Part | None = None
        loss_cfg = config.ae_loss
        if loss_cfg.adversarial_weight > 0:
            torch.manual_seed(config.seed + 1)
            disc = PatchDiscriminator(
                ae.config.in_channels,
                loss_cfg.discriminator_channels,
                loss_cfg.discriminator_layers,
            ).to(env.device)
            disc_module = wrap(disc, env, "ddp", None)
            ema_off = dataclasses.replace(config.ema, enabled=False)
            self.disc = Part(
                "discriminator",
                disc_module,
                disc,
                config.optimizer,
                ema_off,
                lr=loss_cfg.discriminator_lr,
            )
            self.parts.append(self.disc)

    def arch(self) -> dict[str, Any]:
        return {"ae": arch_dict(self.ae.config)}

    def _crops(self, batch: dict[str, Any], step: int, batch_index: int) -> Tensor:
        crops = random_crops(
            batch["pixels"],
            batch["keys"],
            self.config.data.crop_size,
            seed=self.config.seed,
            step=step,
            batch_index=batch_index,
        )
        side = crops.shape[-1] - crops.shape[-1] % self.ae.spatial_compression
        return crops[..., :side, :side].to(self.env.device)

    def train_step(self, micro_batches: list[dict[str, Any]], step: int) -> dict[str, float]:
        env, cfg, n = self.env, self.config.ae_loss, len(micro_batches)
        adversarial = self.disc is not None and step >= cfg.adversarial_start_step
        sums: dict[str, float] = {}
        pairs = []
        for i, batch in enumerate(micro_batches):
            x = self._crops(batch, step, i * env.world_size + env.rank)
            with no_gradient_sync(self.part.module, i < n - 1):
                with autocast(env.device, self.config.model.precision):
                    recon = self.part.module(x)  # (B, 3, s, s)
                    loss, parts = reconstruction_loss(
                        x, recon, cfg.l1_weight, cfg.ssim_weight, cfg.mse_weight
                    )
                    if adversarial:
                        # The unwrapped discriminator: its gradients from this pass are
                        # discarded below, and DDP must not reduce them.
                        g_adv = generator_adversarial_loss(self.disc.model(recon))
                        loss = loss + cfg.adversarial_weight * g_adv
                        parts["g_adv"] = float(g_adv.detach())
                (loss / n).backward()
            parts["recon_loss"] = float(loss.detach())
            parts["psnr"] = psnr(x, recon)
            for key, value in parts.items():
                sums[key] = sums.get(key, 0.0) + value / n
            pairs.append((x, recon.detach()))
        metrics = {"loss": sums.pop("recon_loss"), **sums}
        metrics["grad_norm"] = self.part.step(step, self.config.schedule)
        if self.disc is None:
            return metrics
        # The same columns every step (the CSV's are fixed by its first row): NaN until the
        # discriminator joins.
        metrics.setdefault("g_adv", math.nan)
        metrics["d_loss"] = metrics["d_grad_norm"] = math.nan
        if adversarial:
            self.disc.optimizer.zero_grad(set_to_none=True)
            d_total = 0.0
            for i, (x, recon) in enumerate(pairs):
                with no_gradient_sync(self.disc.module, i < n - 1):
                    with autocast(env.device, self.config.model.precision):
                        # One forward on [real, fake]: DDP allows one forward per backward,
                        # and GroupNorm is per sample, so this equals two separate calls.
                        logits = self.disc.module(torch.cat([x, recon]))  # (2B, 1, h, w)
                        d_loss = discriminator_loss(*logits.chunk(2))
                    (d_loss / n).backward()
                d_total += float(d_loss.detach()) / n
            metrics["d_loss"] = d_total
            metrics["d_grad_norm"] = self.disc.step(step, self.config.schedule)
        return metrics

    # --------------------------------------------------------- validation and export

    def export_model(self, which: str) -> DCAE | None:
        weights = self.part.full_weights(which)
        if not self.env.is_main:
            return None
        with torch.device("meta"):
            ae = DCAE(self.ae.config)
        load_state_dict_into(ae, weights, f"{which} weights", torch.float32, self.env.device)
        return ae.eval()

    def _fixed_batches(self, count: int) -> list[Tensor]:
        """The pixels of the first ``count`` batches of a fresh pass (the same every call)."""
        batches = build_batches(
            dataclasses.replace(self.config.data, num_workers=0),
            seed=self.config.seed,
            env=dataclasses.replace(self.env, rank=0, world_size=1),
        )
        out = []
        for batch in batches:
            side = min(batch["pixels"].shape[-2:])
            side -= side % self.ae.spatial_compression
            out.append(batch["pixels"][..., :side, :side])
            if len(out) == count:
                break
        return out

    def validate(self, step: int, run_dir: Path) -> None:
        ae = self.export_model(self.config.export.weights)
        if self.env.is_main:
            images = self._fixed_batches(1)[0][:VALIDATION_IMAGES].to(self.env.device)
            with torch.no_grad():
                recon = ae(images)
            path = run_dir / "validation" / f"step-{step:08d}.png"
            save_reconstruction_grid(images.cpu(), recon.cpu(), path, step)
            logger.info("validation reconstructions: %s", path)
        self.env.barrier()

    @torch.no_grad()
    def measure_scaling_factor(self, ae: DCAE) -> float:
        """1 / std of the latents of the first ``scaling_factor_batches`` batches."""
        batches = self._fixed_batches(self.config.ae_loss.scaling_factor_batches)
        latents = [ae.encode(b.to(self.env.device)).float().flatten() for b in batches]
        return float(1.0 / torch.cat(latents).std())

    def export(self, folder: Path, which: str, dtype: str) -> None:
        ae = self.export_model(which)
        if self.env.is_main:
            if self.config.ae_loss.scaling_factor_batches > 0:
                factor = self.measure_scaling_factor(ae)
                ae.config = dataclasses.replace(ae.config, scaling_factor=factor)
                logger.info("measured scaling_factor = %.5f", factor)
            save_autoencoder(ae, folder, dtype=DTYPES[dtype])
            logger.info("exported the autoencoder to %s", folder)
        self.env.barrier()
