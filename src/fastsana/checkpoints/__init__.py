"""Checkpoint formats: diffusers folders, official files, and our writers."""

from fastsana.checkpoints.common import CheckpointError
from fastsana.checkpoints.transformer import (
    convert_transformer,
    load_transformer,
    save_transformer,
)

__all__ = ["CheckpointError", "convert_transformer", "load_transformer", "save_transformer"]
