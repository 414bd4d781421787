"""scripts/reencode_cache.py: a cache's captions re-encoded by another text encoder."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from script_helpers import LENGTH, encoder_folder, run_script, tiny_cache

from fastsana.models.text_encoder import TextEncoder
from fastsana.training.cache import CachedLatentDataset

CAPTIONS = [
    ["a red circle to the left of a blue square", "a red circle and a blue square"],
    ["three green stars", "a green star", "two purple triangles above a white circle"],
    ["a black star below an orange square", "a shape"],
]


def _run(monkeypatch, *argv: str) -> None:
    run_script(monkeypatch, "reencode_cache", *argv)


def _cache(root: Path, encoder_dir: Path) -> Path:
    return tiny_cache(root, encoder_dir, CAPTIONS)


def _texts(cache: Path) -> dict[str, dict[str, torch.Tensor]]:
    return {p.stem: load_file(p) for p in sorted((cache / "text").glob("*.safetensors"))}


def test_same_encoder_reproduces_the_cache_exactly(tmp_path, monkeypatch) -> None:
    encoder = encoder_folder(tmp_path / "enc", seed=0)
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
    first = encoder_folder(tmp_path / "first", seed=0)
    second = encoder_folder(tmp_path / "second", seed=1)
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
    encoder = encoder_folder(tmp_path / "enc", seed=0)
    cache = _cache(tmp_path, encoder)
    (tmp_path / "taken").mkdir()
    with pytest.raises(SystemExit):
        _run(monkeypatch, str(cache), str(tmp_path / "taken"), "--pipeline", str(encoder))
    with pytest.raises(SystemExit):
        _run(monkeypatch, str(cache), str(tmp_path / "new"), "--pipeline", str(tmp_path))
    assert not (tmp_path / "new").exists()
