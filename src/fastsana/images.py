"""Image helpers shared by the CLI and the trainer: grids and PNGs with settings metadata."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

from PIL import Image, PngImagePlugin

from fastsana.checkpoints.common import atomic_write

METADATA_KEY = "fastsana"  # PNG tEXt chunk holding the generation settings as JSON


def make_grid(
    images: Sequence[Image.Image], columns: int | None = None, pad: int = 2
) -> Image.Image:
    """Tile images (all the same size) row by row on a white canvas; ~square by default."""
    if not images:
        raise ValueError("make_grid needs at least one image")
    w, h = images[0].size
    if any(im.size != (w, h) for im in images):
        raise ValueError("make_grid needs images of one size")
    columns = columns or math.ceil(math.sqrt(len(images)))
    rows = math.ceil(len(images) / columns)
    grid = Image.new(
        "RGB", (columns * w + (columns + 1) * pad, rows * h + (rows + 1) * pad), "white"
    )
    for i, image in enumerate(images):
        row, col = divmod(i, columns)
        grid.paste(image.convert("RGB"), (pad + col * (w + pad), pad + row * (h + pad)))
    return grid


def save_png(
    image: Image.Image, path: str | os.PathLike[str], metadata: Mapping[str, object]
) -> Path:
    """Write ``image`` as a PNG atomically, with ``metadata`` as JSON in a text chunk (and the
    prompt, if any, in the conventional ``parameters`` chunk that image viewers show)."""
    info = PngImagePlugin.PngInfo()
    info.add_text(METADATA_KEY, json.dumps(metadata, sort_keys=True))
    if "prompt" in metadata:
        info.add_text("parameters", str(metadata["prompt"]))
    path = Path(path)
    atomic_write(path, lambda tmp: image.save(tmp, format="PNG", pnginfo=info))
    return path


def read_png_metadata(path: str | os.PathLike[str]) -> dict:
    """The settings ``save_png`` stored in a PNG (empty when there are none)."""
    with Image.open(path) as image:
        text = image.info.get(METADATA_KEY)
    return json.loads(text) if text else {}
