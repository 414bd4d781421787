"""Training checkpoints that never lose work: written atomically, resumed exactly.

Layout of ``run_dir/checkpoints``::

    step-00001000/                  one finished checkpoint (after 1000 optimizer steps)
      model.safetensors             trained parameters (for LoRA: the adapters only)
      model-ema.safetensors         their EMA
      model-optimizer.safetensors   optimizer state tensors, keyed "{parameter}/{state}"
      model-optimizer.json          optimizer hyper-parameters and non-tensor state
      discriminator*.…              the same for other trained parts (autoencoder GAN)
      rng.json                      python / numpy / torch RNG states of every rank
      trainer_state.json            step, data position, config, file manifest (written last)
    .tmp-step-00001500/             a checkpoint being written (ignored, removed later)

Tensors go to safetensors and everything else to JSON: loading never unpickles anything.
Under FSDP each rank writes its own shard of every sharded tensor
(``model-00001-of-00004.safetensors`` …, a DTensor's local rows); reading concatenates the
shards along dimension 0 and re-cuts them for the reading run, so a checkpoint resumes on any
number of processes, sharded or not.

Atomicity: files are written (fsync) into ``.tmp-step-N``; after every rank is done, rank 0
writes ``trainer_state.json`` with each file's size, then renames the folder to ``step-N``
and syncs the parent folder. A crash leaves either the previous checkpoints or a ``.tmp-``
folder that is never read. A ``step-N`` folder is *valid* when its ``trainer_state.json``
parses and every listed file has the recorded size; ``--resume auto`` takes the newest valid
one.
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
import shutil
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor
from torch.distributed.tensor import DTensor, Shard

from fastsana.checkpoints.common import (
    CheckpointError,
    atomic_write,
    atomic_write_json,
    read_json,
)
from fastsana.training.distributed import DistEnv

logger = logging.getLogger(__name__)

CHECKPOINT_DIR = "checkpoints"
STATE_FILE = "trainer_state.json"
RNG_FILE = "rng.json"
FORMAT = "fastsana-train-checkpoint"
VERSION = 1
_NAME = re.compile(r"^step-(\d{8})$")


def checkpoint_name(step: int) -> str:
    return f"step-{step:08d}"


# --------------------------------------------------------------------- tensor files


def save_tensors(folder: Path, stem: str, tensors: Mapping[str, Tensor], env: DistEnv) -> None:
    """Write ``tensors`` as ``stem.safetensors``, or one shard per rank if any is a DTensor.

    Plain tensors are the same on every rank and written by rank 0 only. Metadata records
    which keys are sharded and their full shapes.
    """
    sharded = {k: list(t.shape) for k, t in tensors.items() if isinstance(t, DTensor)}
    if sharded:
        for key, t in tensors.items():
            if isinstance(t, DTensor) and tuple(t.placements) != (Shard(0),):
                raise CheckpointError(
                    f"{key}: only DTensors sharded on dimension 0 over one mesh dimension can "
                    f"be saved, got placements {t.placements}"
                )
    if not sharded and not env.is_main:
        return
    local = {}
    for key, t in tensors.items():
        if isinstance(t, DTensor):
            local[key] = t.to_local().detach().to("cpu", copy=True).contiguous()
        elif env.is_main:
            # A copy: safetensors refuses tensors that share storage (views, tied weights).
            local[key] = t.detach().to("cpu", copy=True).contiguous()
    name = f"{stem}.safetensors"
    if sharded:
        name = f"{stem}-{env.rank:05d}-of-{env.world_size:05d}.safetensors"
    metadata = {"sharded": json.dumps(sharded), "format": "pt"}
    atomic_write(folder / name, lambda tmp: save_file(local, str(tmp), metadata))


class TensorReader:
    """Reads the tensors written by :func:`save_tensors` (one file or rank shards) by key."""

    def __init__(self, folder: Path, stem: str) -> None:
        single = folder / f"{stem}.safetensors"
        shards = sorted(folder.glob(f"{stem}-[0-9][0-9][0-9][0-9][0-9]-of-*.safetensors"))
        if single.is_file():
            self.files = [single]
        elif shards:
            expected = int(shards[0].name.rsplit("-of-", 1)[1].split(".")[0])
            if len(shards) != expected:
                raise CheckpointError(f"{folder}: {len(shards)} of {expected} {stem} shards")
            self.files = shards
        else:
            raise CheckpointError(f"{folder}: no {stem}.safetensors")
        self._handles = [safe_open(str(f), framework="pt") for f in self.files]
        self.sharded: dict[str, list[int]] = json.loads(
            self._handles[0].metadata().get("sharded", "{}")
        )
        self._keys = set(self._handles[0].keys())

    def keys(self) -> set[str]:
        return set(self._keys)

    def __iter__(self) -> Iterator[str]:
        return iter(sorted(self._keys))

    def read_all(self) -> dict[str, Tensor]:
        """Every tensor, whole."""
        return {key: self.full(key) for key in self}

    def full(self, key: str) -> Tensor:
        """The whole tensor ``key`` (shards concatenated along dimension 0)."""
        if key not in self._keys:
            raise CheckpointError(f"{self.files[0]} has no tensor {key!r}")
        if key not in self.sharded:
            return self._handles[0].get_tensor(key)
        full = torch.cat([h.get_tensor(key) for h in self._handles])
        if list(full.shape) != self.sharded[key]:
            raise CheckpointError(
                f"{key}: shards add up to {list(full.shape)}, expected {self.sharded[key]}"
            )
        return full


def _local_rows(full: Tensor, rank: int, world: int) -> Tensor:
    """This rank's rows of ``full`` as ``torch.chunk`` (and FSDP2's Shard(0)) cuts them."""
    size = -(-full.shape[0] // world)
    start = min(rank * size, full.shape[0])
    return full[start : start + size]


def like(full: Tensor, reference: Tensor) -> Tensor:
    """``full`` placed like ``reference``: its shard if a DTensor, else on its device."""
    if isinstance(reference, DTensor):
        mesh = reference.device_mesh
        local = _local_rows(full, mesh.get_local_rank(), mesh.size())
        local = local.to(reference.to_local().device, reference.dtype).contiguous()
        return DTensor.from_local(
            local, mesh, reference.placements, shape=full.shape, stride=full.stride()
        )
    return full.to(reference.device, reference.dtype)


def load_tensors(folder: Path, stem: str, reference: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """The tensors of ``stem``, placed like ``reference`` (same keys, strictly)."""
    reader = TensorReader(folder, stem)
    missing = sorted(reference.keys() - reader.keys())
    unexpected = sorted(reader.keys() - reference.keys())
    if missing or unexpected:
        raise CheckpointError(
            f"{folder / stem}: does not match the model: missing {missing[:8]}"
            f"{' …' if len(missing) > 8 else ''}, unexpected {unexpected[:8]}"
            f"{' …' if len(unexpected) > 8 else ''}"
        )
    out = {}
    for key, ref in reference.items():
        full = reader.full(key)
        if tuple(full.shape) != tuple(ref.shape):
            raise CheckpointError(
                f"{folder / stem}: {key} has shape {tuple(full.shape)}, the model "
                f"{tuple(ref.shape)}"
            )
        out[key] = like(full, ref)
    return out


# ------------------------------------------------------------------------ optimizer


def save_optimizer(
    folder: Path, stem: str, optimizer: torch.optim.Optimizer, names: Sequence[str], env: DistEnv
) -> None:
    """Optimizer state: tensors as ``{parameter name}/{state key}``, the rest as JSON.

    ``names`` are the parameter names in the optimizer's order (its param groups, flattened).
    """
    sd = optimizer.state_dict()
    tensors: dict[str, Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for index, state in sd["state"].items():
        for key, value in state.items():
            if isinstance(value, Tensor):
                tensors[f"{names[index]}/{key}"] = value
            else:
                scalars.setdefault(names[index], {})[key] = _jsonable(value, f"{key}")
    groups = [
        {k: _jsonable(v, k) for k, v in group.items() if k != "params"}
        for group in sd["param_groups"]
    ]
    save_tensors(folder, stem, tensors, env)
    if env.is_main:
        atomic_write_json(
            folder / f"{stem}.json",
            {"param_groups": groups, "scalars": scalars, "names": list(names)},
        )


def load_optimizer(
    folder: Path,
    stem: str,
    optimizer: torch.optim.Optimizer,
    names: Sequence[str],
    params: Mapping[str, Tensor],
) -> None:
    """Restore what :func:`save_optimizer` wrote; state tensors are placed like the parameter."""
    meta = read_json(folder / f"{stem}.json", "optimizer state")
    if list(meta["names"]) != list(names):
        raise CheckpointError(
            f"{folder / stem}: the optimizer was saved for other parameters "
            f"({len(meta['names'])} saved, {len(names)} now)"
        )
    current = optimizer.state_dict()
    if len(meta["param_groups"]) != len(current["param_groups"]):
        raise CheckpointError(f"{folder / stem}: parameter groups differ from the optimizer's")
    index = {name: i for i, name in enumerate(names)}
    reader = TensorReader(folder, stem)
    state: dict[int, dict[str, Any]] = {}
    for key in reader:
        name, _, entry = key.rpartition("/")
        if name not in index:
            raise CheckpointError(f"{folder / stem}: state for unknown parameter {name!r}")
        full = reader.full(key)
        param = params[name]
        # State shaped like its parameter is sharded like it; the rest (step counters,
        # factored second moments) is replicated.
        if isinstance(param, DTensor) and tuple(full.shape) == tuple(param.shape):
            value = like(full, param)
        else:
            device = param.to_local().device if isinstance(param, DTensor) else param.device
            value = full.to(device)
        state.setdefault(index[name], {})[entry] = value
    for name, values in meta["scalars"].items():
        state.setdefault(index[name], {}).update(values)
    groups = []
    for saved, now in zip(meta["param_groups"], current["param_groups"], strict=True):
        restored = {k: _like_value(v, now.get(k)) for k, v in saved.items()}
        groups.append({**now, **restored, "params": now["params"]})
    optimizer.load_state_dict({"state": state, "param_groups": groups})


def _jsonable(value: Any, key: str) -> Any:
    if isinstance(value, Tensor) and value.numel() == 1:
        return value.item()
    if isinstance(value, (tuple, list)):
        return [_jsonable(v, key) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise CheckpointError(f"optimizer entry {key!r} = {value!r} cannot be saved as JSON")


def _like_value(saved: Any, current: Any) -> Any:
    """JSON turned tuples into lists; give them back the optimizer's own type."""
    if isinstance(current, tuple) and isinstance(saved, list):
        return tuple(saved)
    return saved


# ---------------------------------------------------------------------- RNG states


def rng_state() -> dict[str, Any]:
    """This process's python, numpy and torch (CPU and CUDA) RNG states, as JSON data."""
    version, internal, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {
        "python": [version, list(internal), gauss],
        "numpy": [kind, keys.tolist(), int(pos), int(has_gauss), float(cached)],
        "torch": torch.get_rng_state().tolist(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = [s.tolist() for s in torch.cuda.get_rng_state_all()]
    return state


def set_rng_state(state: Mapping[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([torch.tensor(s, dtype=torch.uint8) for s in state["cuda"]])


# ----------------------------------------------------------------- save and resume


@dataclass
class TrainedPart:
    """What a checkpoint holds for one trained network."""

    name: str  # file stem: "model", "discriminator"
    params: Mapping[str, Tensor]  # the trained parameters by name
    optimizer: torch.optim.Optimizer
    optimizer_names: Sequence[str]
    ema: Mapping[str, Tensor] | None


def save_checkpoint(
    run_dir: Path,
    step: int,
    parts: Sequence[TrainedPart],
    trainer_state: Mapping[str, Any],
    env: DistEnv,
    keep_last: int,
) -> Path:
    """Write checkpoint ``step`` atomically (a collective: every rank calls it)."""
    root = run_dir / CHECKPOINT_DIR
    final = root / checkpoint_name(step)
    tmp = root / f".tmp-{checkpoint_name(step)}"
    if env.is_main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    env.barrier()
    for part in parts:
        save_tensors(tmp, part.name, part.params, env)
        if part.ema is not None:
            save_tensors(tmp, f"{part.name}-ema", part.ema, env)
        save_optimizer(tmp, f"{part.name}-optimizer", part.optimizer, part.optimizer_names, env)
    rng = env.gather_objects(rng_state())
    env.barrier()
    if env.is_main:
        atomic_write_json(tmp / RNG_FILE, {"ranks": rng})
        files = {p.name: p.stat().st_size for p in sorted(tmp.iterdir()) if p.is_file()}
        state = {
            "format": FORMAT,
            "version": VERSION,
            "step": step,
            "world_size": env.world_size,
            **trainer_state,
            "files": files,
        }
        atomic_write_json(tmp / STATE_FILE, state)
        if final.exists():  # the same step written again (e.g. a resumed run's last save)
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync_dir(root)
        prune_checkpoints(run_dir, keep_last)
    env.barrier()
    return final


def load_checkpoint(path: Path, parts: Sequence[TrainedPart], env: DistEnv) -> dict[str, Any]:
    """Load every part's parameters, EMA and optimizer, and this rank's RNG state, in place.

    Returns the trainer state (step, data position, config, …).
    """
    state = read_trainer_state(path)
    for part in parts:
        loaded = load_tensors(path, part.name, part.params)
        with torch.no_grad():
            for key, param in part.params.items():
                param.copy_(loaded[key])
        if part.ema is not None:
            if not (path / f"{part.name}-ema.safetensors").is_file() and not any(
                path.glob(f"{part.name}-ema-*.safetensors")
            ):
                raise CheckpointError(f"{path}: no EMA weights for {part.name} (ema disabled?)")
            loaded = load_tensors(path, f"{part.name}-ema", part.ema)
            with torch.no_grad():
                for key, tensor in part.ema.items():
                    tensor.copy_(loaded[key])
        load_optimizer(
            path, f"{part.name}-optimizer", part.optimizer, part.optimizer_names, part.params
        )
    ranks = read_json(path / RNG_FILE, "RNG states")["ranks"]
    if env.world_size == state["world_size"]:
        set_rng_state(ranks[env.rank])
    else:
        logger.warning(
            "resuming on %d processes a checkpoint written by %d: RNG states not restored",
            env.world_size,
            state["world_size"],
        )
    return state


def read_trainer_state(path: Path) -> dict[str, Any]:
    state = read_json(path / STATE_FILE, "training checkpoint")
    if state.get("format") != FORMAT or state.get("version") != VERSION:
        raise CheckpointError(
            f"{path}: not a {FORMAT} version {VERSION} checkpoint "
            f"(format {state.get('format')!r}, version {state.get('version')!r})"
        )
    return state


def is_valid_checkpoint(path: Path) -> bool:
    """A finished checkpoint: its state file parses and every listed file has its size."""
    try:
        state = read_trainer_state(path)
        files = state["files"]
        return all(
            (path / name).is_file() and (path / name).stat().st_size == size
            for name, size in files.items()
        )
    except (CheckpointError, KeyError, OSError, TypeError, AttributeError):
        return False


def list_checkpoints(run_dir: Path) -> list[Path]:
    """The ``step-N`` folders of ``run_dir`` (valid or not), oldest first."""
    root = Path(run_dir) / CHECKPOINT_DIR
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _NAME.match(p.name))]
    return [p for _, p in sorted(found)]


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The newest valid checkpoint of ``run_dir``; invalid ones are skipped with a warning."""
    for path in reversed(list_checkpoints(run_dir)):
        if is_valid_checkpoint(path):
            return path
        logger.warning("skipping incomplete or damaged checkpoint %s", path)
    return None


def resolve_checkpoint(spec: str | os.PathLike[str], run_dir: Path) -> Path | None:
    """``auto`` → newest valid checkpoint of ``run_dir`` (None if there is none); a ``step-N``
    folder → itself (must be valid); a run folder → its newest valid checkpoint."""
    if str(spec) == "auto":
        return latest_checkpoint(run_dir)
    path = Path(spec)
    if (path / STATE_FILE).is_file():
        if not is_valid_checkpoint(path):
            raise CheckpointError(f"{path} is incomplete or damaged (files missing or truncated)")
        return path
    if (path / CHECKPOINT_DIR).is_dir():
        found = latest_checkpoint(path)
        if found is None:
            raise CheckpointError(f"{path} holds no valid checkpoint")
        return found
    raise CheckpointError(
        f"--resume {spec}: not a checkpoint (no {STATE_FILE}) nor a run folder (no "
        f"{CHECKPOINT_DIR}/); pass 'auto', a step-N folder or a run folder"
    )


def prune_checkpoints(run_dir: Path, keep_last: int) -> None:
    """Delete all but the ``keep_last`` newest checkpoints, and stale ``.tmp-`` folders."""
    root = Path(run_dir) / CHECKPOINT_DIR
    for stale in root.glob(".tmp-step-*"):
        shutil.rmtree(stale, ignore_errors=True)
    for path in list_checkpoints(run_dir)[:-keep_last]:
        shutil.rmtree(path, ignore_errors=True)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
