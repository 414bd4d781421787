"""``fastsana cache``: encode an image folder once with the real autoencoder and text encoder.

Writes the cache of :mod:`fastsana.training.cache` (unscaled latents per image, embeddings
of every caption) plus the null caption (:mod:`fastsana.training.components`). The cache
records the encoders' paths, the scaling factor and the caption length, so a run with
``data.cache_dir`` needs neither model in memory to train (rank 0 still loads them for
validation images and the export).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from fastsana.models.text_encoder import DEFAULT_INSTRUCTION
from fastsana.training.cache import CacheSummary, write_cache
from fastsana.training.components import (
    ComponentPaths,
    encode_null_caption,
    load_frozen_text_encoder,
    load_frozen_vae,
    save_null_caption,
)


def cache_dataset(
    folder: str | os.PathLike[str],
    cache_dir: str | os.PathLike[str],
    paths: ComponentPaths,
    *,
    base_size: int,
    batch_size: int = 16,
    text_max_length: int = 300,
    instruction: bool = True,
    echo: bool = False,
    device: str | torch.device | None = None,
    dtype: torch.dtype = torch.float32,
    progress: bool = True,
) -> CacheSummary:
    """Encode ``folder`` into ``cache_dir`` (resumable; see ``write_cache``).

    ``dtype``: what the tensors are stored as (bf16 halves the cache); encoding runs in fp32.
    ``instruction``: prefix captions with the complex human instruction (as training on the
    fly does with ``model.text_instruction``). ``echo``: encode with echo (``model.text_echo``).
    """
    if paths.vae is None:
        raise ValueError("cache: the autoencoder is needed (--vae or --pipeline)")
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    vae = load_frozen_vae(paths.vae, device)
    encoder = load_frozen_text_encoder(paths, device)

    chi = DEFAULT_INSTRUCTION if instruction else None

    def encode_images(pixels: torch.Tensor) -> torch.Tensor:
        return vae.encode(pixels.to(device)).to(dtype).cpu()  # unscaled latents

    def encode_text(texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        emb, mask = encoder.encode(texts, instruction=chi, max_length=text_max_length, echo=echo)
        return emb.to(dtype).cpu(), mask.cpu()

    info = {
        "vae": str(Path(paths.vae).resolve()),
        "text_encoder": str(Path(paths.text_encoder).resolve()),
        "tokenizer": str(Path(paths.tokenizer).resolve()),
        "scaling_factor": vae.scaling_factor,
        "latents": "unscaled",
        "text_max_length": text_max_length,
        "instruction": instruction,
        "echo": echo,
        "dtype": str(dtype).removeprefix("torch."),
    }
    summary = write_cache(
        folder,
        cache_dir,
        base_size=base_size,
        encode_images=encode_images,
        encode_text=encode_text,
        batch_size=batch_size,
        info=info,
        progress=progress,
    )
    with torch.no_grad():
        emb, mask = encode_null_caption(encoder, text_max_length, echo)
    save_null_caption(cache_dir, emb.to(dtype), mask)
    return summary
