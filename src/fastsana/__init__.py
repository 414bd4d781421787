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
}

if TYPE_CHECKING:
    from fastsana.checkpoints.common import CheckpointError
    from fastsana.checkpoints.transformer import (
        convert_transformer,
        load_transformer,
        save_transformer,
    )
    from fastsana.configs import DIT_PRESETS, DiTConfig
    from fastsana.models.dit import SanaTransformer


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
    "SanaTransformer",
    "convert_transformer",
    "load_transformer",
    "save_transformer",
]
