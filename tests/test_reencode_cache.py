"""scripts/reencode_cache.py: a cache's captions re-encoded by another text encoder."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file

from fastsana.models.text_encoder import TextEncoder
from fastsana.shapes.text_model import build_text_model, build_tokenizer
from fastsana.training.cache import CachedLatentDataset, write_cache
from fastsana.training.components import encode_null_caption, save_null_caption

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "reencode_cache.py"
LENGTH = 12
CAPTIONS = [
    ["a red circle to the left of a blue square", "a red circle and a blue square"],
    ["three green stars", "a green star", "two purple triangles above a white circle"],
    ["a black star below an orange square", "a shape"],
]


def _load_script():
    # scripts/ is a folder of scripts, not a package; load it by path.
    spec = importlib.util.spec_from_file_location("reencode_cache", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _encoder_folder(root: Path, seed: int) -> Path:
    tokenizer = build_tokenizer()
    model = build_text_model(len(tokenizer), hidden_size=64, layers=1, seed=seed)
    TextEncoder(model, tokenizer).save_pretrained(root / "text_encoder", root / "tokenizer")
    return root


def _cache(root: Path, encoder_dir: Path) -> Path:
    """A finished cache of three images, captions encoded as `fastsana cache` does."""
    images = root / "images"
    images.mkdir(parents=True)
    lines = []
    for i, captions in enumerate(CAPTIONS):
        pixels = np.random.default_rng(i).integers(0, 255, (256, 256, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(images / f"{i}.png")
        records = [{"text": t, "clip_score": 30.0 - k} for k, t in enumerate(captions)]
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


def _run(monkeypatch, *argv: str) -> None:
    monkeypatch.setattr(sys, "argv", ["reencode_cache.py", *argv])
    _load_script().main()


def _texts(cache: Path) -> dict[str, dict[str, torch.Tensor]]:
    return {p.stem: load_file(p) for p in sorted((cache / "text").glob("*.safetensors"))}


def test_same_encoder_reproduces_the_cache_exactly(tmp_path, monkeypatch) -> None:
    encoder = _encoder_folder(tmp_path / "enc", seed=0)
    cache = _cache(tmp_path, encoder)
    _run(monkeypatch, str(cache), str(tmp_path / "again"), "--pipeline", str(encoder))
    original, again = _texts(cache), _texts(tmp_path / "again")
    assert original.keys() == again.keys() and len(again) == len(CAPTIONS)
    for stem, tensors in original.items():
        assert tensors.keys() == again[stem].keys()
        for key, value in tensors.items():
            assert torch.equal(value, again[stem][key]), (stem, key)
        with safe_open(str(cache / "text" / f"{stem}.safetensors"), "pt") as f:
            meta = f.metadata()
        with safe_open(str(tmp_path / "again" / "text" / f"{stem}.safetensors"), "pt") as f:
            assert f.metadata() == meta
    null = "null_caption.safetensors"
    assert torch.equal(load_file(cache / null)["emb"], load_file(tmp_path / "again" / null)["emb"])


def test_other_encoder_writes_its_own_features(tmp_path, monkeypatch) -> None:
    first = _encoder_folder(tmp_path / "first", seed=0)
    second = _encoder_folder(tmp_path / "second", seed=1)
    cache = _cache(tmp_path, first)
    out = tmp_path / "second-cache"
    _run(monkeypatch, str(cache), str(out), "--pipeline", str(second), "--batch-size", "2")
    encoder = TextEncoder.from_pretrained(
        second / "text_encoder", second / "tokenizer", dtype=torch.float32
    )
    info = json.loads((out / "cache_info.json").read_text())["info"]
    assert info["text_encoder"] == str((second / "text_encoder").resolve())
    assert info["text_max_length"] == LENGTH and info["instruction"] is False
    dataset = CachedLatentDataset(out)
    original = CachedLatentDataset(cache)
    assert len(dataset) == len(CAPTIONS)
    for stem, tensors in _texts(out).items():
        captions = CAPTIONS[int(stem)]
        emb, mask = encoder.encode(captions, instruction=None, max_length=LENGTH)
        for i in range(len(captions)):
            n = int(mask[i].sum())
            torch.testing.assert_close(tensors[f"emb_{i}"], emb[i, :n])
            assert torch.equal(tensors[f"mask_{i}"], mask[i, :n])
            old = load_file(cache / "text" / f"{stem}.safetensors")[f"emb_{i}"]
            assert not torch.allclose(old, tensors[f"emb_{i}"])  # really re-encoded
    for index in range(len(dataset)):  # the latents are the source's, unchanged
        assert torch.equal(dataset[index]["latents"], original[index]["latents"])
    assert (out / "latents").is_symlink()


def test_refuses_an_existing_output_or_a_folder_without_encoder(tmp_path, monkeypatch) -> None:
    encoder = _encoder_folder(tmp_path / "enc", seed=0)
    cache = _cache(tmp_path, encoder)
    (tmp_path / "taken").mkdir()
    with pytest.raises(SystemExit):
        _run(monkeypatch, str(cache), str(tmp_path / "taken"), "--pipeline", str(encoder))
    with pytest.raises(SystemExit):
        _run(monkeypatch, str(cache), str(tmp_path / "new"), "--pipeline", str(tmp_path))
    assert not (tmp_path / "new").exists()
