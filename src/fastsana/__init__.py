"""fastsana: a fast, tested PyTorch implementation of SANA text-to-image.

Public API (imported lazily so ``import fastsana`` stays cheap)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_EXPORTS = {
    "DiTConfig": "fastsana.configs",
    "DIT_PRESETS": "fastsana.configs",
    "SanaTransformer": "fastsana.models.dit",
    "CheckpointError": "fastsana.checkpoints.common",
    "load_transformer": "fastsana.checkpoints.transformer",
    "save_transformer": "fastsana.checkpoints.transformer",
    "convert_transformer": "fastsana.checkpoints.transformer",
    "load_autoencoder": "fastsana.checkpoints.autoencoder",
    "save_autoencoder": "fastsana.checkpoints.autoencoder",
    "SanaPipeline": "fastsana.pipeline",
    "default_model_path": "fastsana.pipeline",
}

if TYPE_CHECKING:
    from fastsana.checkpoints.autoencoder import load_autoencoder, save_autoencoder
    from fastsana.checkpoints.common import CheckpointError
    from fastsana.checkpoints.transformer import (
        convert_transformer,
        load_transformer,
        save_transformer,
    )
    from fastsana.configs import DIT_PRESETS, DiTConfig
    from fastsana.models.dit import SanaTransformer
    from fastsana.pipeline import SanaPipeline, default_model_path


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'fastsana' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(module), name)


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])


__all__ = [
    "DIT_PRESETS",
    "CheckpointError",
    "DiTConfig",
    "SanaPipeline",
    "SanaTransformer",
    "convert_transformer",
    "default_model_path",
    "load_autoencoder",
    "load_transformer",
    "save_autoencoder",
    "save_transformer",
]
