"""The image-folder training dataset, its metadata format, and the batch collate.

Folder format (written by the data generator)::

    folder/
      metadata.jsonl   one JSON object per line
      x.png, sub/y.jpg ...

Each line is ``{"file_name": "x.png", "captions": [{"text": "...", "clip_score": 31.2}, ...]}``
(``file_name`` relative to the folder; caption shorthands in
:func:`fastsana.training.captions.parse_captions`; other keys are ignored). Blank lines are
allowed; a malformed line raises :class:`MetadataError` naming the file and line.

Use with :class:`~fastsana.training.buckets.BucketBatchSampler` and :func:`collate`::

    ds = ImageFolderDataset("data/", base_size=512)
    sampler = BucketBatchSampler(ds.bucket_ids, batch_size=64, seed=0)
    loader = DataLoader(ds, batch_sampler=sampler, collate_fn=collate, num_workers=4)

Unreadable images never stop training: an image whose header cannot be read is left out when
the dataset is built; one that fails to decode later is replaced by the next image of its
bucket. Either way it is counted and logged (once per file and process).
"""

from __future__ import annotations

import json
import logging
import os
import struct
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from fastsana.resolution import aspect_ratio_bins, bin_for
from fastsana.training.buckets import SampleRef, fit_to_bucket, to_unit_range
from fastsana.training.captions import Caption, CaptionSelection, parse_captions

logger = logging.getLogger(__name__)

METADATA_FILE = "metadata.jsonl"

# What Pillow raises on a truncated, corrupt or non-image file (plugins differ); anything
# else is a bug and must surface rather than be counted as a bad image.
CORRUPT_IMAGE_ERRORS = (
    OSError,
    ValueError,
    SyntaxError,
    EOFError,
    struct.error,
    zlib.error,
    Image.DecompressionBombError,
)


class MetadataError(ValueError):
    """A metadata record is malformed; the message names the file and line."""


@dataclass(frozen=True)
class ImageRecord:
    """One line of ``metadata.jsonl``: an image path relative to the folder and its captions."""

    file_name: str
    captions: tuple[Caption, ...]


def read_metadata(path: str | os.PathLike[str]) -> list[ImageRecord]:
    """Parse a ``metadata.jsonl`` file; errors name the line (1-based)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"metadata file not found: {path}")
    records = []
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, start=1):
            if not line.strip():
                continue
            where = f"{path} line {line_no}"
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise MetadataError(f"{where}: invalid JSON: {e.msg} (column {e.colno})") from e
            if not isinstance(obj, dict):
                raise MetadataError(f"{where}: expected a JSON object, got {type(obj).__name__}")
            file_name = obj.get("file_name")
            if not isinstance(file_name, str) or not file_name:
                raise MetadataError(f"{where}: missing 'file_name' (a non-empty string)")
            try:
                captions = parse_captions(obj, where)
            except ValueError as e:
                raise MetadataError(str(e)) from e
            records.append(ImageRecord(file_name, captions))
    return records


class SkipCounter:
    """Counts skipped samples (every time one is skipped); logs each name once per process."""

    def __init__(self) -> None:
        self.count = 0
        self._logged: set[str] = set()

    def skip(self, name: str, reason: str) -> None:
        self.count += 1
        if name not in self._logged:
            self._logged.add(name)
            logger.warning("skipping %s: %s", name, reason)


def load_image_for_bucket(
    source: str | os.PathLike[str] | IO[bytes], base_size: int
) -> torch.Tensor:
    """Decode an image and fit it to its bucket of ``base_size``: uint8 (3, h, w).

    Raises one of :data:`CORRUPT_IMAGE_ERRORS` when the image cannot be read.
    """
    with Image.open(source) as image:
        return fit_to_bucket(image, *bin_for(image.height, image.width, base_size))


def sample_rng(seed: int, epoch: int, sample_id: int) -> np.random.Generator:
    """The generator for one sample's random choices: a pure function of its arguments."""
    return np.random.default_rng([seed, epoch, sample_id])


def _unpack(ref: int | SampleRef) -> SampleRef:
    # A plain index (e.g. ds[3]) uses epoch 0.
    return (int(ref[0]), int(ref[1])) if isinstance(ref, tuple) else (int(ref), 0)


class ImageFolderDataset(Dataset):
    """Images of a folder with ``metadata.jsonl``, each fitted to its aspect-ratio bucket.

    Building it reads every image header (not the pixels) to find the buckets:
    ``bucket_ids[i]`` is the ``(height, width)`` of sample ``i``'s bucket.

    ``dataset[(index, epoch)]`` (or ``dataset[index]``, epoch 0) returns::

        {"pixels": float32 (3, h, w) in [-1, 1], "caption": str, "key": file_name,
         "num_skipped": int}

    The caption is drawn with ``captions`` from ``numpy.random.default_rng([seed, epoch,
    index])``, so it is reproducible and independent of the DataLoader's workers.
    ``num_skipped`` counts the unreadable images this sample stands in for.
    """

    def __init__(
        self,
        folder: str | os.PathLike[str],
        base_size: int,
        *,
        captions: CaptionSelection | None = None,
        seed: int = 0,
    ) -> None:
        if not isinstance(seed, int) or seed < 0:
            raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
        aspect_ratio_bins(base_size)  # a bad base size must fail here, not skip every image
        self.folder = Path(folder)
        self.base_size = base_size
        self.captions = captions if captions is not None else CaptionSelection()
        self.seed = seed
        self.skips = SkipCounter()
        self.records: list[ImageRecord] = []
        self.bucket_ids: list[tuple[int, int]] = []
        for record in read_metadata(self.folder / METADATA_FILE):
            path = self.folder / record.file_name
            try:
                with Image.open(path) as image:
                    size = image.height, image.width
            except FileNotFoundError:
                self.skips.skip(str(path), "file not found")
                continue
            except CORRUPT_IMAGE_ERRORS as e:
                self.skips.skip(str(path), f"unreadable image ({e})")
                continue
            self.records.append(record)
            self.bucket_ids.append(bin_for(*size, base_size))
        if not self.records:
            raise ValueError(f"{self.folder}: no readable image listed in {METADATA_FILE}")
        self._bucket_members: dict[tuple[int, int], list[int]] = {}
        self._position: list[int] = []
        for index, bucket in enumerate(self.bucket_ids):
            members = self._bucket_members.setdefault(bucket, [])
            self._position.append(len(members))
            members.append(index)
        self._unreadable: set[int] = set()

    @property
    def num_skipped(self) -> int:
        """Unreadable images skipped so far in this process (each time one is met)."""
        return self.skips.count

    def __len__(self) -> int:
        return len(self.records)

    def load_pixels(self, index: int) -> torch.Tensor | None:
        """Sample ``index`` fitted to its bucket, uint8 (3, h, w); None (counted) if unreadable."""
        path = self.folder / self.records[index].file_name
        if index in self._unreadable:
            self.skips.skip(str(path), "unreadable image")
            return None
        try:
            return load_image_for_bucket(path, self.base_size)
        except CORRUPT_IMAGE_ERRORS as e:
            self._unreadable.add(index)
            self.skips.skip(str(path), f"unreadable image ({e})")
            return None

    def __getitem__(self, ref: int | SampleRef) -> dict[str, Any]:
        index, epoch = _unpack(ref)
        members = self._bucket_members[self.bucket_ids[index]]
        start = self._position[index]
        # Stand in the next readable image of the same bucket so the batch keeps its shape.
        for attempt in range(len(members)):
            candidate = members[(start + attempt) % len(members)]
            pixels = self.load_pixels(candidate)
            if pixels is not None:
                break
        else:
            raise RuntimeError(
                f"every image of bucket {self.bucket_ids[index]} in {self.folder} is unreadable"
            )
        record = self.records[candidate]
        chosen = self.captions.choose(record.captions, sample_rng(self.seed, epoch, candidate))
        return {
            "pixels": to_unit_range(pixels),
            "caption": record.captions[chosen].text,
            "key": record.file_name,
            "num_skipped": attempt,
        }


_STACKED = ("pixels", "latents", "text_embeds", "text_mask")


def collate(samples: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Samples of one bucket → a batch.

    Returns ``{"pixels" or "latents": (B, ...), "captions": list[str], "keys": list[str],
    "num_skipped": int}`` plus ``"text_embeds"`` (B, L, D) and ``"text_mask"`` (B, L) for
    cached text embeddings.
    """
    if not samples:
        raise ValueError("cannot collate an empty batch")
    batch: dict[str, Any] = {
        "captions": [s["caption"] for s in samples],
        "keys": [s["key"] for s in samples],
        "num_skipped": sum(s["num_skipped"] for s in samples),
    }
    for name in _STACKED:
        if name not in samples[0]:
            continue
        shapes = {tuple(s[name].shape) for s in samples}
        if len(shapes) > 1:
            raise ValueError(
                f"batch mixes {name} shapes {sorted(shapes)}; batch with BucketBatchSampler "
                "so a batch holds one bucket"
            )
        batch[name] = torch.stack([s[name] for s in samples])
    return batch
