"""Writing Shapes datasets: the trainer's folder format, or WebDataset tar shards.

Folder format::

    out/00000000.png, out/00000001.png, …
    out/metadata.jsonl   one line per image:
        {"file_name": "00000000.png", "captions": [{"text", "clip_score", "kind"}, …],
         "objects": [{"shape", "colour", "cx", "cy", "size", "bbox"}, …]}

WebDataset format: ``out/shard-000000.tar`` … each holding ``{key}.png`` and ``{key}.json``
(the same record without ``file_name``) for consecutive keys ``00000000``, ``00000001``, ….

Image ``i`` depends only on ``(seed, i)`` (its random generator is seeded with both), so a
dataset is reproducible and a larger one extends a smaller one with the same seed. Every file
is written to a temporary name and renamed.
"""

from __future__ import annotations

import functools
import io
import json
import os
import tarfile
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from fastsana.checkpoints.common import atomic_write, atomic_write_bytes, atomic_write_json
from fastsana.shapes.grammar import scene_captions
from fastsana.shapes.world import (
    DEFAULT_SCENE_MIX,
    HELD_OUT_PAIRS,
    SceneMix,
    allowed_pairs,
    render_scene,
    sample_scene,
)

METADATA_FILE = "metadata.jsonl"
INFO_FILE = "shapes_info.json"
FORMAT_VERSION = 1


def make_record(
    index: int,
    *,
    seed: int,
    size: int,
    include_held_out: bool,
    mix: SceneMix = DEFAULT_SCENE_MIX,
) -> tuple[Image.Image, dict]:
    """Image ``index`` of the dataset with ``seed``, and its record (captions and objects)."""
    rng = np.random.default_rng([seed, index])
    pairs = allowed_pairs(include_held_out)
    objects = sample_scene(rng, pairs, mix)
    captions = scene_captions(objects, rng, pairs)
    record = {
        "captions": [c.to_dict() for c in captions],
        "objects": [o.to_dict() for o in objects],
    }
    return render_scene(objects, size), record


def _png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def make_dataset(
    out_dir: str | os.PathLike[str],
    n: int,
    size: int = 256,
    seed: int = 0,
    webdataset_shards: int | None = None,
    include_held_out: bool = False,
    *,
    mix: SceneMix = DEFAULT_SCENE_MIX,
    workers: int = 1,
    progress: bool = True,
) -> Path:
    """Write ``n`` images with captions to ``out_dir``; returns ``out_dir``.

    With ``webdataset_shards=K`` the images go into K tar shards (contiguous, near-equal runs
    of keys) instead of the folder format. ``include_held_out`` lets images contain the
    ``HELD_OUT_PAIRS`` colour/shape combinations, which are otherwise never drawn. ``mix``
    sets the scene kinds' probabilities and how many pairs stand in a relation (a
    ``SceneMix``; the default is the shipped model's data).
    ``workers`` processes render in parallel (images in the folder format, whole shards in the
    WebDataset format); the files are the same for any number of workers.
    """
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be a positive number of images, got {n!r}")
    if not isinstance(size, int) or size < 32:
        raise ValueError(f"size must be an image side of at least 32 pixels, got {size!r}")
    if not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    if webdataset_shards is not None and not (
        isinstance(webdataset_shards, int) and 1 <= webdataset_shards <= n
    ):
        raise ValueError(
            f"webdataset_shards must be None or an integer in 1..n={n}, got {webdataset_shards!r}"
        )
    if not isinstance(mix, SceneMix):
        raise TypeError(f"mix must be a SceneMix, got {type(mix).__name__}")
    if not isinstance(workers, int) or workers < 1:
        raise ValueError(f"workers must be a positive integer, got {workers!r}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    record = functools.partial(
        make_record, seed=seed, size=size, include_held_out=include_held_out, mix=mix
    )

    with tqdm(total=n, desc="shapes dataset", unit="img", disable=not progress) as bar:
        if webdataset_shards is None:
            lines = []
            write = functools.partial(_write_image, out, record)
            for line in _ordered_map(write, range(n), workers, chunksize=64):
                lines.append(line)
                bar.update()
            atomic_write_bytes(out / METADATA_FILE, ("\n".join(lines) + "\n").encode())
        else:
            bounds = np.linspace(0, n, webdataset_shards + 1).round().astype(int)
            runs = [range(int(bounds[k]), int(bounds[k + 1])) for k in range(webdataset_shards)]
            write = functools.partial(_write_shard_file, out, record)
            for count in _ordered_map(write, list(enumerate(runs)), workers, chunksize=1):
                bar.update(count)
    atomic_write_json(
        out / INFO_FILE,
        {
            "generator": "fastsana.shapes",
            "format_version": FORMAT_VERSION,
            "n": n,
            "size": size,
            "seed": seed,
            "include_held_out": include_held_out,
            "scene_mix": mix.as_dict(),
            "held_out_pairs": sorted(list(p) for p in HELD_OUT_PAIRS),
            "webdataset_shards": webdataset_shards,
        },
    )
    return out


def _ordered_map(fn: Callable, items, workers: int, chunksize: int) -> Iterator:
    """``map(fn, items)``, in ``workers`` processes when more than one (results in order)."""
    if workers == 1:
        yield from map(fn, items)
        return
    with ProcessPoolExecutor(workers) as pool:
        yield from pool.map(fn, items, chunksize=chunksize)


def _write_image(out: Path, record: Callable[[int], tuple[Image.Image, dict]], i: int) -> str:
    """Render image ``i``, write its PNG; returns its metadata line."""
    image, rec = record(i)
    name = f"{i:08d}.png"
    atomic_write_bytes(out / name, _png_bytes(image))
    return json.dumps({"file_name": name, **rec})


def _write_shard_file(
    out: Path, record: Callable[[int], tuple[Image.Image, dict]], job: tuple[int, range]
) -> int:
    """Write shard ``k`` holding ``keys``; returns the number of images in it."""
    k, keys = job
    atomic_write(out / f"shard-{k:06d}.tar", lambda tmp: _write_shard(tmp, keys, record))
    return len(keys)


def _write_shard(
    path: Path, keys: range, record: Callable[[int], tuple[Image.Image, dict]]
) -> None:
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
        for i in keys:
            image, rec = record(i)
            key = f"{i:08d}"
            for name, data in (
                (f"{key}.png", _png_bytes(image)),
                (f"{key}.json", json.dumps(rec).encode()),
            ):
                # Fixed metadata so that equal inputs give byte-identical shards.
                info = tarfile.TarInfo(name)
                info.size = len(data)
                info.mode = 0o644
                info.mtime = 0
                tar.addfile(info, io.BytesIO(data))
