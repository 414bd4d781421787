"""Training the Linear DiT (task ``dit``) or LoRA adapters on it (task ``lora``).

One micro-batch: latents x0 (encoded by the frozen autoencoder, or read from the cache) times
the autoencoder's scaling factor; caption embeddings (encoded by the frozen text encoder, or
read from the cache); the per-sample draws of :mod:`fastsana.training.objectives`; captions
dropped to the null caption; the flow-matching loss through the (wrapped) DiT.

Validation and export use the EMA weights (``export.weights``) in a plain, unsharded
:class:`~fastsana.models.dit.SanaTransformer` on rank 0; for LoRA the adapters are merged
into it, so the export is an ordinary pipeline folder.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from fastsana.checkpoints.common import load_state_dict_into
from fastsana.configs import SamplingDefaults
from fastsana.models.dit import SanaTransformer
from fastsana.models.text_encoder import DEFAULT_INSTRUCTION
from fastsana.pipeline import SanaPipeline
from fastsana.training import lora
from fastsana.training.cache import CachedLatentDataset
from fastsana.training.components import (
    component_paths,
    encode_null_caption,
    load_frozen_text_encoder,
    load_frozen_vae,
    read_null_caption,
)
from fastsana.training.config import TrainConfig
from fastsana.training.config_parse import ConfigError
from fastsana.training.distributed import DistEnv, no_gradient_sync, wrap
from fastsana.training.loader import build_batches
from fastsana.training.model_setup import arch_dict, build_transformer, flow_shift_for
from fastsana.training.objectives import draw_flow_inputs, drop_captions, flow_matching_loss
from fastsana.training.parts import Part, autocast
from fastsana.training.validation import save_validation_grid

logger = logging.getLogger(__name__)

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def _check_cache_text(info: dict[str, Any], config: TrainConfig) -> None:
    """The cache's captions must be encoded as the config says: the exported pipeline encodes
    prompts that way (caches written before these fields existed used SANA's defaults)."""
    model = config.model
    cached = (
        info.get("text_max_length", 300),
        info.get("instruction", True),
        info.get("echo", False),
    )
    wanted = (model.text_max_length, model.text_instruction, model.text_echo)
    if cached != wanted:
        raise ConfigError(
            f"data.cache_dir holds captions encoded with text_max_length={cached[0]}, "
            f"instruction={cached[1]}, echo={cached[2]}, but model.text_max_length="
            f"{wanted[0]}, model.text_instruction={wanted[1]}, model.text_echo={wanted[2]}: "
            "set these to match the cache (or re-cache with --text-max-length / "
            "--no-instruction / --echo)"
        )


class DiTTask:
    def __init__(self, config: TrainConfig, env: DistEnv) -> None:
        self.config = config
        self.env = env
        self.batches = build_batches(config.data, seed=config.seed, env=env)
        cached = config.data.cache_dir is not None
        cache_info = self.batches.dataset.info if cached else None
        paths = component_paths(config.model, cache_info)
        if cache_info is not None:
            _check_cache_text(cache_info["info"], config)
        # Rank 0 decodes validation images and writes the export; every rank encodes on the fly.
        needs_pipeline = env.is_main and (
            bool(config.validation.prompts) or config.export.on_finish
        )
        self.vae = None
        if not cached or needs_pipeline:
            if paths.vae is None:
                raise ValueError(
                    "an autoencoder is needed (images encoded on the fly, validation or export): "
                    "set model.pipeline or model.vae, or train from data.cache_dir with "
                    "validation.prompts empty and export.on_finish false"
                )
            self.vae = load_frozen_vae(paths.vae, env.device)
        self.text_encoder = None
        if not cached or needs_pipeline:
            self.text_encoder = load_frozen_text_encoder(paths, env.device)
        if self.vae is not None:
            self.scaling_factor = self.vae.scaling_factor
        else:
            self.scaling_factor = float(cache_info["info"]["scaling_factor"])
        if cached:  # the cache's own, encoded with its caption length (the same on every rank)
            null = read_null_caption(config.data.cache_dir)
        else:
            null = encode_null_caption(
                self.text_encoder, config.model.text_max_length, config.model.text_echo
            )
        self.null_text, self.null_mask = (t.to(env.device) for t in null)

        model, sampling = build_transformer(config.model, config.seed)
        self._check_shapes(model)
        if config.task == "lora":
            lora.apply_lora(model, config.lora)
        if config.model.gradient_checkpointing:
            model.enable_gradient_checkpointing()
        self.model = model.to(env.device).train()
        self.dit_config = model.config
        self.flow_shift = flow_shift_for(config.objective.flow_shift, sampling, config.model.preset)
        self.defaults: SamplingDefaults = dataclasses.replace(sampling, flow_shift=self.flow_shift)
        module = wrap(self.model, env, config.distributed.strategy, self.model.transformer_blocks)
        self.part = Part("model", module, self.model, config.optimizer, config.ema)
        self.parts = [self.part]

    def _check_shapes(self, model: SanaTransformer) -> None:
        cfg = model.config
        latent_channels = (
            self.vae.config.latent_channels
            if self.vae is not None
            else self.batches.dataset.entries[0]["latent_shape"][0]
        )
        if latent_channels != cfg.in_channels:
            raise ValueError(
                f"the autoencoder's latents have {latent_channels} channels but the DiT's "
                f"in_channels is {cfg.in_channels}"
            )
        text_dim = self.null_text.shape[-1]
        if text_dim != cfg.caption_channels:
            raise ValueError(
                f"the text embeddings have {text_dim} channels but the DiT's caption_channels "
                f"is {cfg.caption_channels}"
            )

    # ------------------------------------------------------------------------ training

    def arch(self) -> dict[str, Any]:
        return {
            "dit": arch_dict(self.dit_config),
            "flow_shift": self.flow_shift,
            "scaling_factor": self.scaling_factor,
        }

    @torch.no_grad()
    def condition(self, batch: dict[str, Any]) -> tuple[Tensor, Tensor, Tensor]:
        """Scaled latents x0 (B, C, h, w) and caption embeddings (B, L, D) + mask (B, L).

        The frozen encoders run in fp32 outside autocast: their depthwise convolutions have
        no fast bf16 CPU kernel, and their outputs are inputs, not trained activations.
        """
        device, cfg = self.env.device, self.config
        if "latents" in batch:
            x0 = batch["latents"].to(device, torch.float32)  # (B, C, h, w) unscaled
        else:
            x0 = self.vae.encode(batch["pixels"].to(device)).float()  # (B, C, h, w)
        if "text_embeds" in batch:
            text = batch["text_embeds"].to(device, torch.float32)  # (B, L, D)
            mask = batch["text_mask"].to(device)  # (B, L)
        else:
            text, mask = self.text_encoder.encode(
                batch["captions"],
                instruction=DEFAULT_INSTRUCTION if cfg.model.text_instruction else None,
                max_length=cfg.model.text_max_length,
                echo=cfg.model.text_echo,
            )
        return x0 * self.scaling_factor, text.float(), mask

    def loss(self, batch: dict[str, Any], step: int, batch_index: int) -> Tensor:
        """The flow-matching loss of one micro-batch (``batch_index``: see train_step)."""
        cfg = self.config
        x0, text, mask = self.condition(batch)
        draws = draw_flow_inputs(
            batch["keys"],
            x0.shape[1:],
            seed=cfg.seed,
            step=step,
            batch_index=batch_index,
            flow_shift=self.flow_shift,
            logit_mean=cfg.objective.logit_mean,
            logit_std=cfg.objective.logit_std,
            caption_dropout=cfg.objective.caption_dropout,
            high_sigma_fraction=cfg.objective.high_sigma_fraction,
            high_sigma_min=cfg.objective.high_sigma_min,
        )
        text, mask = drop_captions(text, mask, self.null_text, self.null_mask, draws.drop_caption)
        with autocast(self.env.device, cfg.model.precision):
            return flow_matching_loss(self.part.module, x0, text, mask, draws)

    def train_step(self, micro_batches: list[dict[str, Any]], step: int) -> dict[str, float]:
        env, n = self.env, len(micro_batches)
        losses = []
        for i, batch in enumerate(micro_batches):
            # Micro-batch i of this rank is global batch i·world + rank of the step, the
            # index a single process with n·world micro-batches would give it.
            with no_gradient_sync(self.part.module, i < n - 1):
                loss = self.loss(batch, step, i * env.world_size + env.rank)
                (loss / n).backward()
            losses.append(float(loss.detach()))
        grad_norm = self.part.step(step, self.config.schedule)
        return {"loss": sum(losses) / n, "grad_norm": grad_norm}

    # --------------------------------------------------------- validation and export

    def export_model(self, which: str) -> SanaTransformer | None:
        """A plain DiT with the ``which`` weights on rank 0 (None elsewhere); collective."""
        weights = self.part.full_weights(which)
        if not self.env.is_main:
            return None
        if self.config.task == "lora":
            state = lora.merged_state_dict(self.model, weights)
        else:
            state = weights
        with torch.device("meta"):
            transformer = SanaTransformer(self.dit_config)
        load_state_dict_into(transformer, state, f"{which} weights", torch.float32, self.env.device)
        return transformer.eval()

    def pipeline(self, transformer: SanaTransformer) -> SanaPipeline:
        return SanaPipeline(
            transformer, self.vae, self.text_encoder, self.defaults, offload_text_encoder=False
        )

    def validate(self, step: int, run_dir: Path) -> None:
        if not self.config.validation.prompts:
            return
        transformer = self.export_model(self.config.export.weights)
        if self.env.is_main:
            path = run_dir / "validation" / f"step-{step:08d}.png"
            side = self._native_side()
            with torch.no_grad():
                save_validation_grid(
                    self.pipeline(transformer), self.config.validation, side, path, step
                )
            logger.info("validation grid: %s", path)
            del transformer
        self.env.barrier()

    def _native_side(self) -> int:
        """Validation images default to the training base size."""
        dataset = getattr(self.batches, "dataset", None)
        if isinstance(dataset, CachedLatentDataset):
            return int(dataset.info["base_size"])
        return self.config.data.base_size

    def export(self, folder: Path, which: str, dtype: str) -> None:
        transformer = self.export_model(which)
        if self.env.is_main:
            self.pipeline(transformer).save_pretrained(folder, dtype=DTYPES[dtype])
            if self.config.task == "lora":  # LoRA runs use DDP: the weights are whole
                adapter = self.config.run_dir / "lora_adapter.safetensors"
                lora.save_adapter(self.part.weights(which), adapter, self.config.lora)
            logger.info("exported the pipeline to %s", folder)
        self.env.barrier()
