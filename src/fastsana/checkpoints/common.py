"""Format-independent checkpoint I/O shared by every model loader.

- ``read_state_dict``: safetensors (single or sharded with ``*.index.json``) or a PyTorch file
  read with ``weights_only=True``; never unpickles code.
- ``load_state_dict_into``: strict key/shape check with one error that lists every problem,
  then ``load_state_dict(assign=True)`` into a model built on the meta device, so a large model
  never exists twice in memory.
- ``atomic_write_*``: write to a temporary file in the same folder, fsync, rename; a crash
  never leaves a half-written file under the final name.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

SAFETENSORS_INDEX_SUFFIX = ".safetensors.index.json"


class CheckpointError(ValueError):
    """A checkpoint file is missing, unreadable, or does not match the model."""


def read_state_dict(path: str | os.PathLike[str], device: str | torch.device = "cpu") -> dict:
    """Read tensors from ``.safetensors``, a sharded ``*.index.json``, or ``.pt/.pth/.bin``.

    PyTorch files are read with ``weights_only=True``; a dict holding ``state_dict`` (the
    official NVlabs layout) or ``model`` is unwrapped.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint file not found: {path}")
    name = path.name
    if name.endswith(".index.json"):
        return _read_sharded(path, device)
    if name.endswith(".safetensors"):
        try:
            return load_file(str(path), device=str(device))
        except Exception as e:  # safetensors raises its own error types
            raise CheckpointError(f"could not read safetensors file {path}: {e}") from e
    if path.suffix in (".pt", ".pth", ".bin", ".ckpt"):
        try:
            obj = torch.load(path, map_location=device, weights_only=True, mmap=True)
        except Exception as e:
            raise CheckpointError(
                f"could not read {path} as a weights-only PyTorch checkpoint: {e}"
            ) from e
        for key in ("state_dict", "model"):
            if isinstance(obj, dict) and isinstance(obj.get(key), dict):
                obj = obj[key]
                break
        if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
            raise CheckpointError(f"{path} does not hold a dict of tensors (a state dict)")
        return obj
    raise CheckpointError(
        f"unsupported checkpoint file {path}: expected .safetensors, .safetensors.index.json, "
        ".pt, .pth, .bin or .ckpt"
    )


def _read_sharded(index_path: Path, device: str | torch.device) -> dict:
    try:
        weight_map = json.loads(index_path.read_text())["weight_map"]
    except (OSError, json.JSONDecodeError, KeyError) as e:
        raise CheckpointError(f"invalid shard index {index_path}: {e}") from e
    state: dict[str, torch.Tensor] = {}
    for shard in sorted(set(weight_map.values())):
        state.update(read_state_dict(index_path.parent / shard, device))
    missing = set(weight_map) - set(state)
    if missing:
        raise CheckpointError(f"{index_path}: shards lack {len(missing)} indexed tensors")
    return state


def find_weights_file(folder: Path, stem: str, variant: str | None = None) -> Path:
    """The weights of a diffusers component folder: ``stem.safetensors`` or its shard index.

    Precision variants (``stem.bf16.safetensors``, ``stem.safetensors.index.fp16.json``, as
    published for some official SANA folders) are used when asked for, or when they are the
    only weights in the folder.
    """
    variant = variant or detect_variant(folder, stem)
    suffix = f".{variant}" if variant else ""
    for candidate in (
        folder / f"{stem}{suffix}.safetensors",
        folder / f"{stem}.safetensors.index{suffix}.json",
        folder / f"{stem}{suffix}.bin",
    ):
        if candidate.is_file():
            return candidate
    raise CheckpointError(
        f"no weights in {folder}: expected {stem}{suffix}.safetensors or "
        f"{stem}.safetensors.index{suffix}.json"
    )


def detect_variant(folder: Path, stem: str) -> str | None:
    """None when plain weights exist; else the one precision variant present (or an error)."""
    if (folder / f"{stem}.safetensors").is_file() or (
        folder / f"{stem}{SAFETENSORS_INDEX_SUFFIX}"
    ).is_file():
        return None
    found = set()
    for path in folder.glob(f"{stem}.*"):
        parts = path.name[len(stem) + 1 :].split(".")
        if parts[-1] == "safetensors" and len(parts) == 2 and "-of-" not in parts[0]:
            found.add(parts[0])  # stem.VARIANT.safetensors
        elif parts[:2] == ["safetensors", "index"] and len(parts) == 4 and parts[-1] == "json":
            found.add(parts[2])  # stem.safetensors.index.VARIANT.json
    if len(found) > 1:
        raise CheckpointError(
            f"{folder} holds several precision variants {sorted(found)}; choose one with variant="
        )
    return found.pop() if found else None


def describe_mismatch(
    model_shapes: Mapping[str, torch.Size], state: Mapping[str, torch.Tensor], what: str
) -> str | None:
    """One message listing missing, unexpected and wrong-shape keys, or None when all match."""
    missing = sorted(set(model_shapes) - set(state))
    unexpected = sorted(set(state) - set(model_shapes))
    wrong = sorted(
        f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(model_shapes[k])}"
        for k in set(model_shapes) & set(state)
        if tuple(state[k].shape) != tuple(model_shapes[k])
    )
    if not (missing or unexpected or wrong):
        return None

    def block(title: str, items: list[str]) -> str:
        shown = "\n    ".join(items[:20]) + (
            f"\n    … {len(items) - 20} more" if len(items) > 20 else ""
        )
        return f"  {title} ({len(items)}):\n    {shown}" if items else ""

    parts = [
        block("missing keys", missing),
        block("unexpected keys", unexpected),
        block("wrong shapes", wrong),
    ]
    return f"{what} does not match the model:\n" + "\n".join(p for p in parts if p)


def load_state_dict_into(
    model: nn.Module,
    state: Mapping[str, torch.Tensor],
    what: str,
    dtype: torch.dtype | None = None,
    device: str | torch.device | None = None,
) -> nn.Module:
    """Strictly load ``state`` into ``model`` (usually built on the meta device).

    Tensors are converted to ``dtype`` (floating tensors only) and moved to ``device`` one at a
    time, then assigned, so peak memory stays near one copy of the weights.
    """
    shapes = {k: v.shape for k, v in model.state_dict().items()}
    problem = describe_mismatch(shapes, state, what)
    if problem:
        raise CheckpointError(problem)
    converted = {}
    for key, tensor in state.items():
        if dtype is not None and tensor.is_floating_point():
            tensor = tensor.to(dtype)
        if device is not None:
            tensor = tensor.to(device)
        converted[key] = tensor.contiguous()
    model.load_state_dict(converted, strict=True, assign=True)
    return model


@contextlib.contextmanager
def _atomic_path(path: Path) -> Iterator[Path]:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        with open(tmp_path, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp_path, path)
        with contextlib.suppress(OSError):  # directory fsync is not supported everywhere
            dir_fd = os.open(path.parent, os.O_RDONLY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)
    finally:
        tmp_path.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_folder(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary sibling folder to fill; on success it replaces ``path`` (a previous
    folder there is moved aside first and removed after), on failure it is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        yield tmp
        for file in tmp.rglob("*"):
            if file.is_file():
                with open(file, "rb+") as f:
                    os.fsync(f.fileno())
        old = None
        if path.exists():
            old = path.with_name(f".{path.name}.old-{os.getpid()}")
            os.replace(path, old)
        os.replace(tmp, path)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def atomic_write(path: str | os.PathLike[str], write: Callable[[Path], Any]) -> None:
    """Call ``write(tmp_path)`` and move the result to ``path`` atomically."""
    with _atomic_path(Path(path)) as tmp:
        write(tmp)


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> None:
    atomic_write(path, lambda tmp: tmp.write_bytes(data))


def atomic_write_json(path: str | os.PathLike[str], obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def save_safetensors(
    state: Mapping[str, torch.Tensor],
    folder: str | os.PathLike[str],
    stem: str,
    max_shard_size: int | str = "10GB",
    metadata: dict[str, str] | None = None,
) -> list[Path]:
    """Write ``state`` as ``stem.safetensors``, or as shards plus an index when large.

    Uses ``huggingface_hub``'s shard planner so the layout is the one diffusers reads.
    """
    from huggingface_hub import split_torch_state_dict_into_shards

    folder = Path(folder)
    tensors = {k: v.detach().contiguous().cpu() for k, v in state.items()}
    split = split_torch_state_dict_into_shards(
        tensors, filename_pattern=stem + "{suffix}.safetensors", max_shard_size=max_shard_size
    )
    written = []
    for filename, keys in split.filename_to_tensors.items():
        shard = {k: tensors[k] for k in keys}
        target = folder / filename
        atomic_write(
            target,
            lambda tmp, shard=shard: save_file(shard, str(tmp), metadata or {"format": "pt"}),
        )
        written.append(target)
    index_path = folder / f"{stem}{SAFETENSORS_INDEX_SUFFIX}"
    if split.is_sharded:
        atomic_write_json(
            index_path, {"metadata": split.metadata, "weight_map": split.tensor_to_filename}
        )
        written.append(index_path)
    else:
        index_path.unlink(missing_ok=True)
    return written


def read_json(path: str | os.PathLike[str], what: str) -> dict:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{what}: {path} not found")
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{what}: {path} is not valid JSON: {e}") from e
    if not isinstance(data, dict):
        raise CheckpointError(f"{what}: {path} must hold a JSON object")
    return data


def storage_dtype(state: Mapping[str, torch.Tensor]) -> torch.dtype:
    """The dtype most floating tensors of a checkpoint are stored in."""
    counts: dict[torch.dtype, int] = {}
    for t in state.values():
        if t.is_floating_point():
            counts[t.dtype] = counts.get(t.dtype, 0) + t.numel()
    return max(counts, key=counts.__getitem__) if counts else torch.float32
