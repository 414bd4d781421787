"""Latent and text-embedding cache: encode a folder dataset once, train from the cache.

Layout of ``cache_dir`` (``stem`` = the image's ``file_name`` without its suffix, keeping
sub-folders, e.g. ``sub/y`` for ``sub/y.jpg``)::

    cache_info.json              {"format": "fastsana-cache", "version": 1, "base_size": 512,
                                  "info": {...}}   ("info": free-form, e.g. the encoders used)
    index.jsonl                  one line per cached image, in dataset order:
                                 {"stem": "sub/y", "key": "sub/y.jpg", "latent_shape": [C, h, w]}
    latents/{stem}.safetensors   "latent": (C, h, w), as ``encode_images`` returned it
    text/{stem}.safetensors      per caption i: "emb_i" (n_i, D) and "mask_i" (n_i,);
                                 metadata "captions": JSON list of {"text", "clip_score"},
                                 "text_length": L (the encoder's padded length)

Text embeddings are stored without their trailing padding (``n_i`` = position of the last
unmasked token + 1) and padded back to ``L`` with zeros (mask 0) when read: masked positions
never reach the model, and most captions are much shorter than L = 300 tokens.

Writing (:func:`write_cache`) takes the encoders as plain callables, so this module does not
depend on the models; reading is :class:`CachedLatentDataset`, whose samples batch with the
same :class:`~fastsana.training.buckets.BucketBatchSampler` and
:func:`~fastsana.training.data.collate` as images (buckets are latent sizes).
"""

from __future__ import annotations

import json
import os
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm import tqdm

from fastsana.checkpoints.common import atomic_write, atomic_write_bytes, atomic_write_json
from fastsana.training.buckets import BucketBatchSampler, SampleRef, to_unit_range
from fastsana.training.captions import Caption, CaptionSelection
from fastsana.training.data import ImageFolderDataset, sample_rng

CACHE_FORMAT = "fastsana-cache"
CACHE_VERSION = 1
INFO_FILE = "cache_info.json"
INDEX_FILE = "index.jsonl"
LATENT_DIR = "latents"
TEXT_DIR = "text"

ImageEncoder = Callable[[torch.Tensor], torch.Tensor]
TextEncoder = Callable[[list[str]], tuple[torch.Tensor, torch.Tensor]]


class CacheError(ValueError):
    """A cache folder is missing, inconsistent, or was written with other settings."""


def cache_stem(file_name: str) -> str:
    """An image's name in the cache: its path without the suffix (``sub/y.jpg`` → ``sub/y``)."""
    return str(PurePosixPath(file_name).with_suffix(""))


def latent_path(cache_dir: str | os.PathLike[str], stem: str) -> Path:
    return Path(cache_dir) / LATENT_DIR / f"{stem}.safetensors"


def text_path(cache_dir: str | os.PathLike[str], stem: str) -> Path:
    return Path(cache_dir) / TEXT_DIR / f"{stem}.safetensors"


@dataclass(frozen=True)
class CacheSummary:
    """What :func:`write_cache` did: images encoded now, found already cached, unreadable."""

    written: int
    already_cached: int
    skipped: int


def write_cache(
    folder: str | os.PathLike[str],
    cache_dir: str | os.PathLike[str],
    *,
    base_size: int,
    encode_images: ImageEncoder,
    encode_text: TextEncoder,
    batch_size: int = 16,
    info: dict[str, Any] | None = None,
    progress: bool = True,
) -> CacheSummary:
    """Encode every image of an image folder, and all its captions, into ``cache_dir``.

    ``encode_images(pixels)``: float32 (B, 3, h, w) in [-1, 1], all one bucket of
    ``base_size`` → latents (B, C, h/f, w/f). Store raw autoencoder latents (before any
    scaling factor) so the cache does not depend on it, and say so in ``info``.
    ``encode_text(texts)``: N strings → (embeddings (N, L, D), mask (N, L)).
    Both run under ``torch.no_grad()``; cast their outputs to the dtype to store.

    Resumable: images whose two files exist are not encoded again (files are written
    atomically, so an existing file is complete). A cache written with another ``base_size``
    or ``info`` is refused. Unreadable images are skipped and counted. ``index.jsonl`` is
    rewritten at the end.
    """
    cache_dir = Path(cache_dir)
    dataset = ImageFolderDataset(folder, base_size)
    stems = [cache_stem(r.file_name) for r in dataset.records]
    duplicates = sorted(stem for stem, n in Counter(stems).items() if n > 1)
    if duplicates:
        raise CacheError(
            f"{folder}: images share a cache name (same path but suffix): {duplicates[:10]}"
        )
    _write_or_check_info(cache_dir, base_size, info or {})

    entries: dict[int, dict[str, Any]] = {}
    written = already = 0
    sampler = BucketBatchSampler(dataset.bucket_ids, batch_size, shuffle=False, drop_last=False)
    for batch in tqdm(sampler, desc="caching", unit="batch", disable=not progress):
        todo = []
        for index, _ in batch:
            stem = stems[index]
            if latent_path(cache_dir, stem).is_file() and text_path(cache_dir, stem).is_file():
                entries[index] = _index_entry(cache_dir, stem, dataset.records[index].file_name)
                already += 1
            else:
                todo.append(index)
        # load_pixels returns None for an unreadable image and counts it in dataset.num_skipped.
        loaded = [(index, dataset.load_pixels(index)) for index in todo]
        loaded = [(index, pixels) for index, pixels in loaded if pixels is not None]
        if not loaded:
            continue
        _encode_and_write(cache_dir, dataset, stems, loaded, encode_images, encode_text, entries)
        written += len(loaded)

    lines = [json.dumps(entries[i]) + "\n" for i in sorted(entries)]
    atomic_write_bytes(cache_dir / INDEX_FILE, "".join(lines).encode())
    return CacheSummary(written=written, already_cached=already, skipped=dataset.num_skipped)


def _write_or_check_info(cache_dir: Path, base_size: int, info: dict[str, Any]) -> None:
    expected = {
        "format": CACHE_FORMAT,
        "version": CACHE_VERSION,
        "base_size": base_size,
        "info": info,
    }
    path = cache_dir / INFO_FILE
    if path.is_file():
        existing = json.loads(path.read_text())
        # Compare through JSON so tuples and lists in ``info`` compare equal.
        if existing != json.loads(json.dumps(expected)):
            raise CacheError(
                f"{cache_dir} holds a cache written with other settings: {existing} "
                f"(this run: {expected}); use another cache_dir"
            )
    else:
        atomic_write_json(path, expected)


def _index_entry(cache_dir: Path, stem: str, key: str) -> dict[str, Any]:
    with safe_open(str(latent_path(cache_dir, stem)), framework="pt") as f:
        shape = f.get_slice("latent").get_shape()
    return {"stem": stem, "key": key, "latent_shape": list(shape)}


def _encode_and_write(
    cache_dir: Path,
    dataset: ImageFolderDataset,
    stems: list[str],
    loaded: list[tuple[int, torch.Tensor]],
    encode_images: ImageEncoder,
    encode_text: TextEncoder,
    entries: dict[int, dict[str, Any]],
) -> None:
    pixels = to_unit_range(torch.stack([p for _, p in loaded]))  # (B, 3, h, w)
    captions = [dataset.records[index].captions for index, _ in loaded]
    texts = [c.text for image_captions in captions for c in image_captions]
    with torch.no_grad():
        latents = encode_images(pixels)  # (B, C, h/f, w/f)
        embeds, masks = encode_text(texts)  # (N, L, D), (N, L)
    if not isinstance(latents, torch.Tensor) or latents.ndim != 4 or len(latents) != len(loaded):
        raise CacheError(
            f"encode_images must return a (B, C, h, w) tensor with B = {len(loaded)}, got "
            f"{tuple(latents.shape) if isinstance(latents, torch.Tensor) else type(latents)}"
        )
    if embeds.ndim != 3 or masks.shape != embeds.shape[:2] or len(embeds) != len(texts):
        raise CacheError(
            f"encode_text must return embeddings (N, L, D) and a mask (N, L) with N = "
            f"{len(texts)}, got {tuple(embeds.shape)} and {tuple(masks.shape)}"
        )
    text_length = embeds.shape[1]
    row = 0
    for (index, _), latent, image_captions in zip(loaded, latents, captions, strict=True):
        stem = stems[index]
        rows = slice(row, row + len(image_captions))
        text_tensors = caption_tensors(embeds[rows], masks[rows])
        row = rows.stop
        text_meta = {
            "captions": json.dumps(
                [{"text": c.text, "clip_score": c.clip_score} for c in image_captions]
            ),
            "text_length": str(text_length),
        }
        save_tensors(text_path(cache_dir, stem), text_tensors, text_meta)
        # The latent goes last: its presence (with the text file) marks the image as cached.
        save_tensors(latent_path(cache_dir, stem), {"latent": latent.clone()})
        entries[index] = {
            "stem": stem,
            "key": dataset.records[index].file_name,
            "latent_shape": list(latent.shape),
        }


def caption_tensors(embeds: torch.Tensor, masks: torch.Tensor) -> dict[str, torch.Tensor]:
    """A text file's tensors for one image's K captions, embeddings (K, L, D) and masks (K, L):
    ``emb_i`` (n_i, D) and ``mask_i`` (n_i,), each without its trailing padding."""
    tensors = {}
    for i, (emb, mask) in enumerate(zip(embeds, masks, strict=True)):
        valid = mask.nonzero()
        n = int(valid[-1]) + 1 if len(valid) else 0  # drop trailing padding only
        # clone: a view would make safetensors see the whole batch's storage.
        tensors[f"emb_{i}"] = emb[:n].clone()
        tensors[f"mask_{i}"] = mask[:n].clone()
    return tensors


def save_tensors(
    path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None
) -> None:
    """Write a cache file atomically (safetensors, with ``metadata``)."""
    atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata))


class CachedLatentDataset(torch.utils.data.Dataset):
    """Reads a cache written by :func:`write_cache` instead of images and captions.

    ``bucket_ids[i]`` is the latent size ``(h, w)`` of sample ``i``. ``dataset[(index,
    epoch)]`` (or ``dataset[index]``, epoch 0) returns::

        {"latents": (C, h, w), "text_embeds": (L, D), "text_mask": (L,), "caption": str,
         "key": file_name, "num_skipped": 0}

    with the caption drawn by ``captions`` from ``numpy.random.default_rng([seed, epoch,
    index])`` among the image's cached captions (their scores are in the text file). ``info``
    is the ``cache_info.json`` content (base size and the writer's ``info``).
    """

    def __init__(
        self,
        cache_dir: str | os.PathLike[str],
        *,
        captions: CaptionSelection | None = None,
        seed: int = 0,
    ) -> None:
        if not isinstance(seed, int) or seed < 0:
            raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
        self.cache_dir = Path(cache_dir)
        self.captions = captions if captions is not None else CaptionSelection()
        self.seed = seed
        self.info = self._read_info()
        self.entries = self._read_index()
        self.bucket_ids: list[tuple[int, int]] = [
            (e["latent_shape"][1], e["latent_shape"][2]) for e in self.entries
        ]

    def _read_info(self) -> dict[str, Any]:
        path = self.cache_dir / INFO_FILE
        if not path.is_file():
            raise CacheError(f"{self.cache_dir} is not a cache: {INFO_FILE} not found")
        info = json.loads(path.read_text())
        if info.get("format") != CACHE_FORMAT or info.get("version") != CACHE_VERSION:
            raise CacheError(
                f"{path}: expected format {CACHE_FORMAT!r} version {CACHE_VERSION}, "
                f"got {info.get('format')!r} version {info.get('version')!r}"
            )
        return info

    def _read_index(self) -> list[dict[str, Any]]:
        path = self.cache_dir / INDEX_FILE
        if not path.is_file():
            raise CacheError(f"{path} not found; the cache was not finished (run it again)")
        entries = []
        for line_no, line in enumerate(path.read_text().splitlines(), start=1):
            if not line.strip():
                continue
            try:
                entry = json.loads(line)
                shape = entry["latent_shape"]
                if not (isinstance(entry["stem"], str) and isinstance(entry["key"], str)):
                    raise TypeError("stem and key must be strings")
                if len(shape) != 3:
                    raise TypeError("latent_shape must be [C, h, w]")
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise CacheError(f"{path} line {line_no}: bad index entry ({e})") from e
            entries.append(entry)
        if not entries:
            raise CacheError(f"{path} lists no image")
        return entries

    def __len__(self) -> int:
        return len(self.entries)

    def __getitem__(self, ref: int | SampleRef) -> dict[str, Any]:
        index, epoch = (int(ref[0]), int(ref[1])) if isinstance(ref, tuple) else (int(ref), 0)
        entry = self.entries[index]
        with _open(latent_path(self.cache_dir, entry["stem"])) as f:
            latent = f.get_tensor("latent")
        with _open(text_path(self.cache_dir, entry["stem"])) as f:
            meta = f.metadata()
            captions = [Caption(c["text"], c["clip_score"]) for c in json.loads(meta["captions"])]
            chosen = self.captions.choose(captions, sample_rng(self.seed, epoch, index))
            emb = f.get_tensor(f"emb_{chosen}")
            mask = f.get_tensor(f"mask_{chosen}")
        return {
            "latents": latent,
            "text_embeds": _pad_rows(emb, int(meta["text_length"])),
            "text_mask": _pad_rows(mask, int(meta["text_length"])),
            "caption": captions[chosen].text,
            "key": entry["key"],
            "num_skipped": 0,
        }


def _open(path: Path) -> Any:
    if not path.is_file():
        raise CacheError(f"cache file missing: {path} (is the index from another cache?)")
    return safe_open(str(path), framework="pt")


def _pad_rows(tensor: torch.Tensor, length: int) -> torch.Tensor:
    """Zero-pad dimension 0 of ``tensor`` to ``length``."""
    padded = tensor.new_zeros((length, *tensor.shape[1:]))
    padded[: len(tensor)] = tensor
    return padded


def merge_caches(out_dir: str | os.PathLike[str], sources: list[str | os.PathLike[str]]) -> int:
    """Join finished caches into one at ``out_dir`` without copying their tensors; returns
    the number of images.

    Source ``k``'s ``latents/`` and ``text/`` become symbolic links ``latents/part{k}`` and
    ``text/part{k}``, so its stem ``s`` is ``part{k}/s`` in the merged index (stems from
    different sources cannot collide). The sources must have been cached with the same
    settings (equal ``cache_info.json``) and hold the same other files (e.g. the null
    caption), which are copied. The sources must stay where they are.
    """
    out = Path(out_dir)
    if not sources:
        raise CacheError("merge_caches needs at least one source cache")
    if out.exists():
        raise CacheError(f"{out} exists; merge into a new folder")
    roots = [Path(s).resolve() for s in sources]
    readers = [CachedLatentDataset(root) for root in roots]  # checks format and index
    for root, reader in zip(roots[1:], readers[1:], strict=True):
        if reader.info != readers[0].info:
            raise CacheError(
                f"{root} was cached with other settings than {roots[0]}: "
                f"{reader.info} != {readers[0].info}"
            )
    reserved = {INFO_FILE, INDEX_FILE}
    extras = {
        p.name: p.read_bytes()
        for p in sorted(roots[0].iterdir())
        if p.is_file() and p.name not in reserved
    }
    for root in roots[1:]:
        for name, data in extras.items():
            if not (root / name).is_file() or (root / name).read_bytes() != data:
                raise CacheError(f"{root / name} is missing or differs from {roots[0] / name}")
    for sub in (LATENT_DIR, TEXT_DIR):
        (out / sub).mkdir(parents=True)
        for k, root in enumerate(roots):
            (out / sub / f"part{k}").symlink_to(root / sub, target_is_directory=True)
    for name, data in extras.items():
        atomic_write_bytes(out / name, data)
    lines = [
        json.dumps({**entry, "stem": f"part{k}/{entry['stem']}"})
        for k, reader in enumerate(readers)
        for entry in reader.entries
    ]
    # cache_info.json last: a merge cut short is not read as a cache.
    atomic_write_bytes(out / INDEX_FILE, ("\n".join(lines) + "\n").encode())
    atomic_write_json(out / INFO_FILE, readers[0].info)
    return len(lines)
