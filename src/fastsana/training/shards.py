"""Streaming training batches from WebDataset tar shards.

A shard holds samples as ``{key}.png|jpg|jpeg|webp`` plus ``{key}.json``, the JSON being a
``metadata.jsonl`` record without ``file_name`` (see :mod:`fastsana.training.data`). Shards
are read with the ``webdataset`` package; :class:`ShardStream` yields whole single-bucket
batches, so the DataLoader must not batch again::

    stream = ShardStream("data/shard-{000000..000099}.tar", base_size=512, batch_size=64)
    loader = DataLoader(stream, batch_size=None, num_workers=4)

Splitting: each epoch the shard list is shuffled with ``(seed, epoch)``; rank ``r`` of ``R``
takes shards ``r, r + R, ...`` and DataLoader worker ``w`` of ``W`` takes every ``W``-th of
those. Give at least ``R * W`` shards or some workers get none. Ranks see different numbers of
samples, so a distributed run should train by steps on ``repeat=True`` streams rather than by
epochs.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
from collections.abc import Iterator, Mapping, Sequence
from glob import glob
from pathlib import Path
from typing import Any

import numpy as np
import torch
import webdataset as wds
from torch.utils.data import IterableDataset, get_worker_info
from webdataset.shardlists import expand_urls

from fastsana.resolution import aspect_ratio_bins
from fastsana.training.buckets import bucket_batches, to_unit_range
from fastsana.training.captions import CaptionSelection, parse_captions
from fastsana.training.data import (
    CORRUPT_IMAGE_ERRORS,
    SkipCounter,
    collate,
    load_image_for_bucket,
    sample_rng,
)

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = ("png", "jpg", "jpeg", "webp")


def expand_shards(shards: str | os.PathLike[str] | Sequence[str | os.PathLike[str]]) -> list[str]:
    """Shard paths from a brace pattern (``a-{000..009}.tar``), a glob, or a list of either."""
    patterns = [shards] if isinstance(shards, str | os.PathLike) else list(shards)
    urls: list[str] = []
    for pattern in patterns:
        for url in expand_urls(os.fspath(pattern)):
            if any(c in url for c in "*?["):
                matches = sorted(glob(url))
                if not matches:
                    raise FileNotFoundError(f"shard pattern {url!r} matches no file")
                urls.extend(matches)
            elif "://" in url or url.startswith("pipe:") or Path(url).is_file():
                urls.append(url)
            else:
                raise FileNotFoundError(f"shard not found: {url}")
    if not urls:
        raise ValueError(f"no shard in {shards!r}")
    return urls


def _key_id(key: str) -> int:
    # A stable integer per sample key, for its random stream (Python's hash() is salted).
    return int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "little")


class ShardStream(IterableDataset):
    """Single-bucket batches streamed from WebDataset shards (see the module docstring).

    Each batch is ``{"pixels": float32 (B, 3, h, w) in [-1, 1], "captions", "keys",
    "num_skipped"}``. Samples are shuffled through a buffer of ``shuffle_buffer`` raw (still
    encoded) samples per worker before being bucketed; a bucket's batch is emitted when it
    holds ``batch_size`` samples, and partial buckets at the end of a pass are dropped. The
    caption of sample ``key`` is drawn from ``numpy.random.default_rng([seed, epoch,
    hash(key)])``.

    Unreadable images, samples lacking an image or JSON, bad caption records and unreadable
    shards are skipped, counted (``num_skipped`` of this process, and per batch the skips met
    since the previous batch) and logged once per name.

    ``repeat=True`` streams forever, epoch after epoch (``set_epoch`` sets the first).
    Rank and world size default to ``torch.distributed``'s when it is initialised.
    """

    def __init__(
        self,
        shards: str | os.PathLike[str] | Sequence[str | os.PathLike[str]],
        base_size: int,
        batch_size: int,
        *,
        captions: CaptionSelection | None = None,
        seed: int = 0,
        rank: int | None = None,
        num_replicas: int | None = None,
        shuffle: bool = True,
        shuffle_buffer: int = 1000,
        repeat: bool = False,
    ) -> None:
        super().__init__()
        if not isinstance(seed, int) or seed < 0:
            raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
        if not isinstance(shuffle_buffer, int) or shuffle_buffer < 0:
            raise ValueError(
                f"shuffle_buffer must be a non-negative integer, got {shuffle_buffer!r}"
            )
        aspect_ratio_bins(base_size)  # a bad base size must fail here, not skip every sample
        self.urls = expand_shards(shards)
        self.base_size = base_size
        self.batch_size = batch_size
        self.captions = captions if captions is not None else CaptionSelection()
        self.seed = seed
        distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
        self.rank = (
            rank if rank is not None else (torch.distributed.get_rank() if distributed else 0)
        )
        self.num_replicas = (
            num_replicas
            if num_replicas is not None
            else (torch.distributed.get_world_size() if distributed else 1)
        )
        if not 0 <= self.rank < self.num_replicas:
            raise ValueError(f"rank must be in [0, {self.num_replicas}), got {self.rank}")
        if len(self.urls) < self.num_replicas:
            raise ValueError(
                f"{len(self.urls)} shard(s) cannot be split across {self.num_replicas} ranks"
            )
        self.shuffle = shuffle
        self.shuffle_buffer = shuffle_buffer
        self.repeat = repeat
        self.epoch = 0
        self.skips = SkipCounter()

    @property
    def num_skipped(self) -> int:
        """Samples skipped so far in this process (DataLoader workers count their own)."""
        return self.skips.count

    def set_epoch(self, epoch: int) -> None:
        """Shard order and captions of the next pass (copied to workers when they start)."""
        if not isinstance(epoch, int) or epoch < 0:
            raise ValueError(f"epoch must be a non-negative integer, got {epoch!r}")
        self.epoch = epoch

    def shards_for(self, epoch: int, worker: int = 0, num_workers: int = 1) -> list[str]:
        """The shards this rank's ``worker`` reads in ``epoch``."""
        urls = list(self.urls)
        if self.shuffle:
            np.random.default_rng([self.seed, epoch]).shuffle(urls)
        return urls[self.rank :: self.num_replicas][worker::num_workers]

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        epoch = self.epoch
        # How many shards a worker gets does not depend on the epoch's order.
        if not self.shards_for(epoch, worker, num_workers):
            logger.warning("rank %d worker %d has no shard to read", self.rank, worker)
            return
        while True:
            yield from self._one_pass(epoch, worker, num_workers)
            if not self.repeat:
                return
            epoch += 1

    def _one_pass(self, epoch: int, worker: int, num_workers: int) -> Iterator[dict[str, Any]]:
        urls = self.shards_for(epoch, worker, num_workers)
        raw = wds.tarfile_samples(({"url": url} for url in urls), handler=self._shard_error)
        if self.shuffle and self.shuffle_buffer > 1:
            seed = int(
                np.random.SeedSequence([self.seed, epoch, self.rank, worker]).generate_state(1)[0]
            )
            raw = wds.shuffle(self.shuffle_buffer, initial=self.shuffle_buffer, seed=seed)(raw)
        prepared = (s for s in (self._prepare(r, epoch) for r in raw) if s is not None)
        reported = self.skips.count
        for samples in bucket_batches(prepared, self.batch_size, lambda s: s["pixels"].shape):
            batch = collate(samples)
            batch["pixels"] = to_unit_range(batch["pixels"])
            batch["num_skipped"] = self.skips.count - reported
            reported = self.skips.count
            yield batch

    def _shard_error(self, error: Exception) -> bool:
        # webdataset's handler protocol: True means skip what failed and go on.
        # webdataset appends the stream and URL to error.args, so repr names the shard.
        self.skips.skip(repr(error), "shard read error")
        return True

    def _prepare(self, raw: Mapping[str, Any], epoch: int) -> dict[str, Any] | None:
        """A raw tar sample → a fitted sample with its caption, or None (counted) if unusable."""
        key = raw["__key__"]
        where = f"{raw.get('__url__', '?')} sample {key!r}"
        ext = next((e for e in IMAGE_EXTENSIONS if e in raw), None)
        if ext is None or "json" not in raw:
            self.skips.skip(where, f"needs an image ({'/'.join(IMAGE_EXTENSIONS)}) and a .json")
            return None
        try:
            record = json.loads(raw["json"])
            if not isinstance(record, dict):
                raise ValueError(f"{where}: the .json must hold an object")
            captions = parse_captions(record, where)
        except (json.JSONDecodeError, UnicodeDecodeError, ValueError) as e:
            self.skips.skip(where, f"bad caption record ({e})")
            return None
        try:
            pixels = load_image_for_bucket(io.BytesIO(raw[ext]), self.base_size)
        except CORRUPT_IMAGE_ERRORS as e:
            self.skips.skip(where, f"unreadable image ({e})")
            return None
        chosen = self.captions.choose(captions, sample_rng(self.seed, epoch, _key_id(key)))
        return {"pixels": pixels, "caption": captions[chosen].text, "key": key, "num_skipped": 0}
