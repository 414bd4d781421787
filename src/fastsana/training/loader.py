"""Endless streams of training batches whose position a checkpoint can save.

- Image folders and caches (map-style): :class:`~fastsana.training.buckets.BucketBatchSampler`
  over the rank's share, epoch after epoch. The position is ``(epoch, batches of this rank
  consumed in it)``; restoring it makes the next batch exactly the one the interrupted run
  would have drawn.
- WebDataset shards (a stream): ``ShardStream(repeat=True)``. A stream cannot seek, so a
  resumed run restarts it with a fresh, deterministic shard order (its epoch set to the
  resumed step) instead of replaying the batches already consumed.

The position counts batches handed to the trainer, not batches the DataLoader prefetched.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from torch.utils.data import DataLoader

from fastsana.training.buckets import BucketBatchSampler
from fastsana.training.cache import CachedLatentDataset
from fastsana.training.captions import CaptionSelection
from fastsana.training.config import DataConfig
from fastsana.training.data import ImageFolderDataset, collate
from fastsana.training.distributed import DistEnv
from fastsana.training.shards import ShardStream


def caption_selection(data: DataConfig) -> CaptionSelection:
    return CaptionSelection(
        threshold=data.caption_threshold,
        temperature=data.caption_temperature,
        weighting=data.caption_weighting,
    )


class MapBatches:
    """Batches of a map-style dataset (image folder or cache) for this rank."""

    def __init__(
        self,
        dataset: ImageFolderDataset | CachedLatentDataset,
        batch_size: int,
        *,
        seed: int,
        env: DistEnv,
        num_workers: int = 0,
    ) -> None:
        self.dataset = dataset
        self.sampler = BucketBatchSampler(
            dataset.bucket_ids,
            batch_size,
            seed=seed,
            num_replicas=env.world_size,
            rank=env.rank,
        )
        self.loader = DataLoader(
            dataset,
            batch_sampler=self.sampler,
            collate_fn=collate,
            num_workers=num_workers,
            pin_memory=env.device.type == "cuda",
        )
        self.epoch = 0
        self.batch = 0

    def position(self) -> dict[str, int]:
        return {"epoch": self.epoch, "batch": self.batch}

    def restore(self, position: dict[str, int], step: int, saved_world_size: int) -> None:
        """Continue after ``position``, saved by a run of ``saved_world_size`` processes.

        Every rank walks the same plan of the epoch, rank r taking batches r, r + R, …, so
        ``batch`` batches per rank of R ranks are the plan's first batch·R; another number of
        processes continues from the same place when it divides that.
        """
        epoch, consumed = int(position["epoch"]), int(position["batch"]) * saved_world_size
        world = self.sampler.num_replicas
        if consumed % world:
            raise ValueError(
                f"cannot resume on {world} processes: the checkpoint's data position ({consumed} "
                f"batches of epoch {epoch}) is not a multiple of {world}"
            )
        batch = consumed // world
        if batch > self.sampler.batches_per_epoch:
            raise ValueError(
                f"the checkpoint's data position (epoch {epoch}, batch {batch}) is past this "
                f"dataset's {self.sampler.batches_per_epoch} batches per epoch: was the data, "
                "batch size or number of processes changed?"
            )
        self.epoch, self.batch = epoch, batch

    def __iter__(self) -> Iterator[dict[str, Any]]:
        while True:
            self.sampler.set_epoch(self.epoch, self.batch)
            for batch in self.loader:
                self.batch += 1
                yield batch
            self.epoch += 1
            self.batch = 0


class StreamBatches:
    """Batches streamed from WebDataset shards (see the module docstring for resuming)."""

    def __init__(self, stream: ShardStream, num_workers: int, env: DistEnv) -> None:
        self.stream = stream
        self.num_workers = num_workers
        self.pin_memory = env.device.type == "cuda"
        self.batches = 0

    def position(self) -> dict[str, int]:
        return {"stream_epoch": self.stream.epoch, "batches": self.batches}

    def restore(self, position: dict[str, int], step: int, saved_world_size: int) -> None:
        self.stream.set_epoch(step)
        self.batches = int(position["batches"])

    def __iter__(self) -> Iterator[dict[str, Any]]:
        loader = DataLoader(
            self.stream, batch_size=None, num_workers=self.num_workers, pin_memory=self.pin_memory
        )
        for batch in loader:
            self.batches += 1
            yield batch


def build_batches(data: DataConfig, *, seed: int, env: DistEnv) -> MapBatches | StreamBatches:
    """The batch stream for ``data`` (a folder, shards or a cache)."""
    captions = caption_selection(data)
    if data.cache_dir is not None:
        dataset = CachedLatentDataset(data.cache_dir, captions=captions, seed=seed)
        return MapBatches(
            dataset, data.batch_size, seed=seed, env=env, num_workers=data.num_workers
        )
    if data.folder is not None:
        dataset = ImageFolderDataset(data.folder, data.base_size, captions=captions, seed=seed)
        return MapBatches(
            dataset, data.batch_size, seed=seed, env=env, num_workers=data.num_workers
        )
    stream = ShardStream(
        data.shards,
        data.base_size,
        data.batch_size,
        captions=captions,
        seed=seed,
        rank=env.rank,
        num_replicas=env.world_size,
        shuffle_buffer=data.shuffle_buffer,
        repeat=True,
    )
    return StreamBatches(stream, data.num_workers, env)
