"""The frozen components around the trained DiT: autoencoder, text encoder, null caption.

Paths are resolved in this order: the explicit ``model.vae`` / ``model.text_encoder`` /
``model.tokenizer``; the ``vae/``, ``text_encoder/``, ``tokenizer/`` folders of
``model.pipeline``; and, when training from a cache, the paths ``fastsana cache`` recorded.

The null caption (what caption dropout trains on, for classifier-free guidance) is the empty
negative prompt encoded the way the pipeline encodes its unconditional branch:
``TextEncoder.encode_negative([""])``, without the complex human instruction. Training on that
exact embedding keeps training and inference consistent. ``fastsana cache`` stores it in the
cache folder (``null_caption.safetensors``) so a run from a cache needs no text encoder.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor

from fastsana.checkpoints.autoencoder import load_autoencoder
from fastsana.checkpoints.common import CheckpointError, atomic_write
from fastsana.models.dcae import DCAE
from fastsana.models.text_encoder import TextEncoder
from fastsana.training.config import ModelConfig

NULL_CAPTION_FILE = "null_caption.safetensors"


@dataclass(frozen=True)
class ComponentPaths:
    vae: Path | None
    text_encoder: Path | None
    tokenizer: Path | None


def component_paths(model: ModelConfig, cache_info: dict[str, Any] | None = None) -> ComponentPaths:
    """Where the autoencoder, text encoder and tokenizer are (None: not configured)."""
    recorded = (cache_info or {}).get("info", {})

    def pick(explicit: str | None, sub: str) -> Path | None:
        if explicit is not None:
            return Path(explicit)
        if model.pipeline is not None:
            return Path(model.pipeline) / sub
        return Path(recorded[sub]) if recorded.get(sub) else None

    return ComponentPaths(
        vae=pick(model.vae, "vae"),
        text_encoder=pick(model.text_encoder, "text_encoder"),
        tokenizer=pick(model.tokenizer, "tokenizer"),
    )


def load_frozen_vae(path: Path, device: torch.device) -> DCAE:
    """An autoencoder in eval mode with gradients off, in float32."""
    vae = load_autoencoder(path, dtype=torch.float32, device=device)
    vae.requires_grad_(False)
    return vae.eval()


def load_frozen_text_encoder(paths: ComponentPaths, device: torch.device) -> TextEncoder:
    if paths.text_encoder is None or paths.tokenizer is None:
        raise ValueError(
            "a text encoder is needed (captions encoded on the fly, validation or export): set "
            "model.pipeline, or model.text_encoder and model.tokenizer"
        )
    encoder = TextEncoder.from_pretrained(
        paths.text_encoder, paths.tokenizer, dtype=torch.float32, device=device
    )
    encoder.model.requires_grad_(False)
    return encoder


def encode_null_caption(
    encoder: TextEncoder, max_length: int, echo: bool = False
) -> tuple[Tensor, Tensor]:
    """The null caption (1, L, D) and its mask (1, L) (see the module docstring)."""
    return encoder.encode_negative([""], max_length=max_length, echo=echo)


def save_null_caption(cache_dir: str | os.PathLike[str], emb: Tensor, mask: Tensor) -> Path:
    """Store the null caption (1, L, D), (1, L) beside a cache."""
    path = Path(cache_dir) / NULL_CAPTION_FILE
    tensors = {"emb": emb[0].contiguous().cpu(), "mask": mask[0].contiguous().cpu()}
    atomic_write(path, lambda tmp: save_file(tensors, str(tmp), {"format": "pt"}))
    return path


def read_null_caption(cache_dir: str | os.PathLike[str]) -> tuple[Tensor, Tensor]:
    """The null caption stored by ``fastsana cache``: (1, L, D), (1, L)."""
    path = Path(cache_dir) / NULL_CAPTION_FILE
    if not path.is_file():
        raise CheckpointError(
            f"{path} not found: caches written by `fastsana cache` hold the null caption for "
            "caption dropout; otherwise set model.text_encoder/model.tokenizer to encode it"
        )
    with safe_open(str(path), framework="pt") as f:
        return f.get_tensor("emb")[None], f.get_tensor("mask")[None]
