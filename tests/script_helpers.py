"""Shared by the tests of scripts/: load a script by path, and build a tiny finished cache."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from types import ModuleType

import numpy as np
import torch
from PIL import Image

from fastsana.models.text_encoder import TextEncoder
from fastsana.shapes.text_model import build_text_model, build_tokenizer
from fastsana.training.cache import write_cache
from fastsana.training.components import encode_null_caption, save_null_caption

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"
LENGTH = 12


def load_script(name: str) -> ModuleType:
    """``scripts/NAME.py`` as a module (scripts/ is a folder of scripts, not a package)."""
    spec = importlib.util.spec_from_file_location(name, SCRIPTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_script(monkeypatch, name: str, *argv: str) -> None:
    """Run ``scripts/NAME.py ARGV...`` in this process."""
    monkeypatch.setattr(sys, "argv", [f"{name}.py", *argv])
    load_script(name).main()


def encoder_folder(root: Path, seed: int) -> Path:
    """A pipeline-like folder with a tiny random text encoder and the Shapes tokenizer."""
    tokenizer = build_tokenizer()
    model = build_text_model(len(tokenizer), hidden_size=64, layers=1, seed=seed)
    TextEncoder(model, tokenizer).save_pretrained(root / "text_encoder", root / "tokenizer")
    return root


def tiny_cache(root: Path, encoder_dir: Path, captions: list[list[str]]) -> Path:
    """A finished cache of one random image per entry of ``captions``, its captions scored in
    the given order (first best), encoded as `fastsana cache` does."""
    images = root / "images"
    images.mkdir(parents=True)
    lines = []
    for i, texts in enumerate(captions):
        pixels = np.random.default_rng(i).integers(0, 255, (256, 256, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(images / f"{i}.png")
        records = [{"text": t, "clip_score": 30.0 - k} for k, t in enumerate(texts)]
        lines.append(json.dumps({"file_name": f"{i}.png", "captions": records}))
    (images / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    encoder = TextEncoder.from_pretrained(
        encoder_dir / "text_encoder", encoder_dir / "tokenizer", dtype=torch.float32
    )

    def encode_text(texts):
        return encoder.encode(texts, instruction=None, max_length=LENGTH)

    info = {
        "text_encoder": str(encoder_dir / "text_encoder"),
        "tokenizer": str(encoder_dir / "tokenizer"),
        "text_max_length": LENGTH,
        "instruction": False,
        "echo": False,
        "dtype": "float32",
    }
    cache = root / "cache"
    write_cache(
        images,
        cache,
        base_size=256,
        encode_images=lambda pixels: torch.nn.functional.avg_pool2d(pixels, 32),
        encode_text=encode_text,
        info=info,
        progress=False,
    )
    save_null_caption(cache, *encode_null_caption(encoder, LENGTH))
    return cache
