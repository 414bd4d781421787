"""Aspect-ratio buckets: fitting an image to its bucket, and batching by bucket.

Every training image goes to the bin of the training base size nearest its aspect ratio
(:func:`fastsana.resolution.bin_for`); it is scaled, keeping its aspect, until it covers the
bin, then centre-cropped to it. A batch holds images of one bucket only, so it stacks into one
tensor.

- :class:`BucketBatchSampler` batches a map-style dataset (deterministic per (seed, epoch),
  distributed, resumable at a batch position).
- :func:`bucket_batches` batches a stream with one buffer per bucket.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Hashable, Iterable, Iterator, Sequence
from typing import TypeVar

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Sampler

T = TypeVar("T")

# A sample reference handed to the datasets: (index, epoch). The epoch makes per-sample
# randomness (the caption drawn) differ between epochs and stay reproducible whatever the
# number of DataLoader workers or whether they persist.
SampleRef = tuple[int, int]


def fit_to_bucket(image: Image.Image, height: int, width: int) -> torch.Tensor:
    """``image`` scaled to cover ``height x width`` (aspect kept), centre-cropped: uint8 (3, h, w).

    Cropping and scaling are one bicubic resample of the centred source box, so no pixel is
    lost to rounding an intermediate size. Transparent images are composited on white.
    """
    scale = max(height / image.height, width / image.width)
    # JPEG can decode at 1/2, 1/4, 1/8 scale for free; draft() keeps the result >= the target.
    image.draft("RGB", (math.ceil(image.width * scale), math.ceil(image.height * scale)))
    image = _to_rgb(image)
    scale = max(height / image.height, width / image.width)
    box_w, box_h = width / scale, height / scale
    left, top = (image.width - box_w) / 2, (image.height - box_h) / 2
    image = image.resize(
        (width, height), Image.Resampling.BICUBIC, box=(left, top, left + box_w, top + box_h)
    )
    return torch.from_numpy(np.array(image, dtype=np.uint8)).permute(2, 0, 1)


def _to_rgb(image: Image.Image) -> Image.Image:
    if image.mode == "RGB":
        return image
    if image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def to_unit_range(pixels: torch.Tensor) -> torch.Tensor:
    """uint8 pixels in [0, 255] → float32 in [-1, 1], the range the autoencoder expects."""
    return pixels.to(torch.float32) / 127.5 - 1.0


class BucketBatchSampler(Sampler[list[SampleRef]]):
    """Batches of ``(index, epoch)`` references, each batch from a single bucket.

    ``bucket_ids[i]`` is the bucket of sample ``i`` (any hashable, e.g. an ``(h, w)`` size).
    For an epoch, each bucket's samples are shuffled and cut into batches of ``batch_size``
    (a last partial batch per bucket is dropped when ``drop_last``, else kept), then the order
    of all batches is shuffled -- all from ``numpy.random.default_rng([seed, epoch])``, so
    the plan depends only on (seed, epoch). With ``shuffle=False`` buckets come in order of
    first appearance and samples in index order.

    Distributed: every rank computes the same plan and takes batches ``rank, rank +
    num_replicas, ...``; the plan is cut to a multiple of ``num_replicas`` batches, so every
    rank gets the same number, ``batches_per_epoch``, and no sample twice.

    Position and resuming: ``set_epoch(epoch, start_batch)`` makes the next iteration yield
    this rank's batches ``start_batch, start_batch + 1, ...`` of ``epoch``. Iterating does not
    move the position (the DataLoader prefetches, so only the trainer knows how many batches it
    consumed); the trainer saves its own ``(epoch, batches consumed)`` and passes them back::

        sampler = BucketBatchSampler(ds.bucket_ids, 64, seed=0, rank=rank, num_replicas=world)
        loader = DataLoader(ds, batch_sampler=sampler, collate_fn=collate, num_workers=4)
        for epoch in range(start_epoch, num_epochs):
            sampler.set_epoch(epoch, start_batch if epoch == start_epoch else 0)
            for step, batch in enumerate(loader, start=sampler.start_batch):
                ...  # checkpoint (epoch, step + 1)
    """

    def __init__(
        self,
        bucket_ids: Sequence[Hashable],
        batch_size: int,
        *,
        seed: int = 0,
        num_replicas: int = 1,
        rank: int = 0,
        shuffle: bool = True,
        drop_last: bool = True,
    ) -> None:
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
        if not isinstance(num_replicas, int) or num_replicas < 1:
            raise ValueError(f"num_replicas must be a positive integer, got {num_replicas!r}")
        if not isinstance(rank, int) or not 0 <= rank < num_replicas:
            raise ValueError(f"rank must be in [0, {num_replicas}), got {rank!r}")
        if not isinstance(seed, int) or seed < 0:
            raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
        self.batch_size = batch_size
        self.seed = seed
        self.num_replicas = num_replicas
        self.rank = rank
        self.shuffle = shuffle
        self.drop_last = drop_last
        self._buckets: dict[Hashable, list[int]] = {}
        for index, bucket in enumerate(bucket_ids):
            self._buckets.setdefault(bucket, []).append(index)
        per_bucket = (
            len(members) // batch_size if drop_last else -(-len(members) // batch_size)
            for members in self._buckets.values()
        )
        self.batches_per_epoch = sum(per_bucket) // num_replicas
        if self.batches_per_epoch == 0:
            raise ValueError(
                f"no batch to draw: {len(bucket_ids)} samples in {len(self._buckets)} buckets "
                f"give fewer than {num_replicas} batch(es) of {batch_size}"
                + (" (drop_last=True drops partial batches)" if drop_last else "")
            )
        self.epoch = 0
        self.start_batch = 0

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        """Position the next iteration at batch ``start_batch`` (of this rank) of ``epoch``."""
        if not isinstance(epoch, int) or epoch < 0:
            raise ValueError(f"epoch must be a non-negative integer, got {epoch!r}")
        if not isinstance(start_batch, int) or not 0 <= start_batch <= self.batches_per_epoch:
            raise ValueError(
                f"start_batch must be in [0, {self.batches_per_epoch}], got {start_batch!r}"
            )
        self.epoch = epoch
        self.start_batch = start_batch

    def _plan(self, epoch: int) -> list[list[int]]:
        """All ranks' batches of ``epoch``, in order."""
        rng = np.random.default_rng([self.seed, epoch])
        batches: list[list[int]] = []
        for members in self._buckets.values():
            order = rng.permutation(members).tolist() if self.shuffle else members
            stop = len(order) - len(order) % self.batch_size if self.drop_last else len(order)
            batches.extend(order[i : i + self.batch_size] for i in range(0, stop, self.batch_size))
        if self.shuffle:
            batches = [batches[i] for i in rng.permutation(len(batches))]
        return batches[: self.batches_per_epoch * self.num_replicas]

    def __iter__(self) -> Iterator[list[SampleRef]]:
        mine = self._plan(self.epoch)[self.rank :: self.num_replicas]
        for batch in mine[self.start_batch :]:
            yield [(index, self.epoch) for index in batch]

    def __len__(self) -> int:
        """Batches the next iteration yields (from ``start_batch`` to the end of the epoch)."""
        return self.batches_per_epoch - self.start_batch


def bucket_batches(
    samples: Iterable[T], batch_size: int, bucket_of: Callable[[T], Hashable]
) -> Iterator[list[T]]:
    """Group a stream into single-bucket batches: one buffer per bucket, emitted when full.

    Partial buffers left when the stream ends are dropped, so every batch has ``batch_size``
    samples. Memory: at most ``batch_size - 1`` samples per bucket are held.
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    buffers: dict[Hashable, list[T]] = {}
    for sample in samples:
        bucket = bucket_of(sample)
        buffer = buffers.setdefault(bucket, [])
        buffer.append(sample)
        if len(buffer) == batch_size:
            del buffers[bucket]
            yield buffer
