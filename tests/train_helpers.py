"""Shared fixtures of the training tests: tiny frozen components, Shapes data, caches, configs.

Everything is small enough for a training step to take tens of milliseconds on a CPU: the
``sana-tiny`` DiT (2 blocks of width 64), the ``dc-ae-tiny`` autoencoder (32× compression, 32
latent channels, random weights) and a 2-layer Gemma-2 of width 64 with a word-level
tokenizer covering the Shapes captions.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import pytest
import torch
from tiny_text import make_text_components, save_text_components

from fastsana.checkpoints.autoencoder import save_autoencoder
from fastsana.configs import AE_PRESETS
from fastsana.models.dcae import DCAE
from fastsana.shapes import make_dataset
from fastsana.training.components import ComponentPaths
from fastsana.training.precompute import cache_dataset


@pytest.fixture(autouse=True)
def one_thread():
    """One intra-op thread per process. On a shared 2-core machine, OpenMP threads waiting
    for a busy core make the tiny matmuls of these tests ~100× slower; torchrun sets
    OMP_NUM_THREADS=1 in its workers for the same reason."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


TEXT_WIDTH = 64  # = sana-tiny's caption_channels
TEXT_TOKENS = 16


def captions_of(folder: Path) -> list[str]:
    lines = (folder / "metadata.jsonl").read_text().splitlines()
    return [c["text"] for line in lines if line.strip() for c in json.loads(line)["captions"]]


def make_shapes(folder: Path, n: int = 8, seed: int = 0) -> Path:
    return make_dataset(folder, n, size=64, seed=seed, progress=False)


def make_components(folder: Path, texts: list[str]) -> ComponentPaths:
    """A tiny autoencoder (scaling factor set for unit-variance latents on random images) and
    a tiny text encoder, saved as ``folder/{vae,text_encoder,tokenizer}``."""
    torch.manual_seed(0)
    ae = DCAE(AE_PRESETS["dc-ae-tiny"]).eval()
    with torch.no_grad():
        std = ae.encode(torch.rand(2, 3, 64, 64) * 2 - 1).std()
    ae.config = dataclasses.replace(ae.config, scaling_factor=round(float(1 / std), 4))
    save_autoencoder(ae, folder / "vae")
    model, tokenizer = make_text_components(texts, hidden_size=TEXT_WIDTH)
    save_text_components(folder, model, tokenizer)
    return ComponentPaths(folder / "vae", folder / "text_encoder", folder / "tokenizer")


def make_cache(data: Path, cache_dir: Path, paths: ComponentPaths) -> Path:
    cache_dataset(
        data,
        cache_dir,
        paths,
        base_size=256,
        batch_size=8,
        text_max_length=TEXT_TOKENS,
        device="cpu",
        progress=False,
    )
    return cache_dir


def dit_config(output_dir: Path, paths: ComponentPaths, **sections: Any) -> dict[str, Any]:
    """A fast DiT config as plain data; ``sections`` update it section by section."""
    config: dict[str, Any] = {
        "output_dir": str(output_dir),
        "task": "dit",
        "seed": 0,
        "device": "cpu",  # bitwise checks are CPU facts; keep them off any GPU
        "model": {
            "preset": "sana-tiny",
            "vae": str(paths.vae),
            "text_encoder": str(paths.text_encoder),
            "tokenizer": str(paths.tokenizer),
            "text_max_length": TEXT_TOKENS,
            "precision": "fp32",
        },
        "data": {"base_size": 256, "batch_size": 2},
        "optimizer": {"lr": 1e-3, "grad_clip": 1.0},
        "schedule": {"max_steps": 10},
        "ema": {"decay": 0.9},
        "logging": {"every": 1, "progress": False, "plot": False},
        "checkpointing": {"every": 5, "keep_last": 100},
        "export": {"on_finish": False},
    }
    for name, values in sections.items():
        if isinstance(values, dict) and isinstance(config.get(name), dict):
            config[name] = {**config[name], **values}
        else:
            config[name] = values
    return config
