"""Process-group setup and model wrapping for ``torchrun`` (DDP or FSDP2).

``torchrun --nproc_per_node=N`` (or ``--nnodes``) sets RANK, WORLD_SIZE and LOCAL_RANK; with
WORLD_SIZE > 1 the trainer joins the process group, each rank drives one device
(``cuda:LOCAL_RANK``, or the CPU with the gloo backend) and:

- ``ddp``: the model is replicated; gradients are averaged by ``DistributedDataParallel``.
- ``fsdp``: FSDP2, ``fully_shard`` on each transformer block and then on the root, so a
  rank holds 1/N of every parameter, gradient and optimizer state, and gathers one block at a
  time for compute.

Either way every rank sees different batches (the samplers split them) and the optimizer steps
on the average gradient of the global batch.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import warnings
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed.tensor import DTensor

from fastsana.training.config import DistributedConfig


@dataclass(frozen=True)
class DistEnv:
    """This process's place in the run (rank 0 of 1 when not distributed)."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    owns_group: bool = False  # setup() created the process group, teardown() destroys it

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def mean(self, value: float) -> float:
        """The mean of ``value`` over ranks (for logging)."""
        if not self.distributed:
            return value
        t = torch.tensor([value], dtype=torch.float64, device=self._collective_device())
        dist.all_reduce(t)
        return float(t.item()) / self.world_size

    def gather_objects(self, obj: object) -> list[object] | None:
        """Every rank's ``obj`` on rank 0 (None elsewhere)."""
        if not self.distributed:
            return [obj]
        out: list[object] | None = [None] * self.world_size if self.is_main else None
        dist.gather_object(obj, out, dst=0)
        return out

    def broadcast_object(self, obj: object) -> object:
        """Rank 0's ``obj`` on every rank."""
        if not self.distributed:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def _collective_device(self) -> torch.device:
        return self.device if dist.get_backend() == "nccl" else torch.device("cpu")


def setup(config: DistributedConfig, device: str | None = None) -> DistEnv:
    """Join the process group when started by torchrun with WORLD_SIZE > 1.

    A process group that already exists (the caller made it) is used as it is and left alone
    by :func:`teardown`.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", str(rank)))
    if device is not None:
        target = torch.device(device)
    elif torch.cuda.is_available():
        target = torch.device("cuda", local_rank)
    else:
        target = torch.device("cpu")
    if target.type == "cuda":
        torch.cuda.set_device(target)
    owns_group = world_size > 1 and not dist.is_initialized()
    if owns_group:
        backend = config.backend
        if backend == "auto":
            backend = "nccl" if target.type == "cuda" else "gloo"
        if backend == "nccl" and target.type != "cuda":
            raise ValueError("distributed.backend nccl needs CUDA devices; use gloo on CPU")
        dist.init_process_group(
            backend,
            rank=rank,
            world_size=world_size,
            timeout=datetime.timedelta(minutes=config.timeout_minutes),
            device_id=target if target.type == "cuda" else None,
        )
    return DistEnv(rank, world_size, local_rank, target, owns_group)


def teardown(env: DistEnv, clean: bool = True) -> None:
    """Leave the process group setup() created; ``clean=False`` (after a failure) skips the
    final barrier, which ranks that failed elsewhere would never reach."""
    if env.owns_group and dist.is_initialized():
        if clean:
            dist.barrier()
        dist.destroy_process_group()


def wrap(model: nn.Module, env: DistEnv, strategy: str, blocks: nn.ModuleList | None) -> nn.Module:
    """The module to call in training: ``model`` itself, DDP around it, or FSDP2-sharded.

    ``blocks`` are sharded one by one under FSDP (the transformer blocks); required for fsdp.
    """
    if not env.distributed:
        return model
    if strategy == "ddp":
        if not any(p.requires_grad for p in model.parameters()):
            raise ValueError("nothing to train: every parameter is frozen")
        device_ids = [env.device.index] if env.device.type == "cuda" else None
        return nn.parallel.DistributedDataParallel(model, device_ids=device_ids)
    if strategy == "fsdp":
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        if blocks is None:
            raise ValueError("fsdp needs the model's blocks to shard them one by one")
        # FSDP2 warns about every view returned by a wrapped module, in case it is modified
        # in place; the trainer never does that with the DiT's output.
        warnings.filterwarnings("ignore", message="FSDP2-wrapped module .* returned a view")
        mesh = init_device_mesh(env.device.type, (env.world_size,))
        for block in blocks:
            fully_shard(block, mesh=mesh)
        fully_shard(model, mesh=mesh)
        return model
    raise ValueError(f"distributed.strategy must be 'ddp' or 'fsdp', got {strategy!r}")


def unwrap(module: nn.Module) -> nn.Module:
    """The model inside a DDP wrapper (FSDP2 shards in place, so it is the model already)."""
    return module.module if isinstance(module, nn.parallel.DistributedDataParallel) else module


@contextlib.contextmanager
def no_gradient_sync(module: nn.Module, active: bool) -> Iterator[None]:
    """Skip the gradient all-reduce (DDP) / reduce-scatter (FSDP) while ``active``: the
    micro-batches of gradient accumulation before the last one."""
    if not active:
        yield
        return
    if isinstance(module, nn.parallel.DistributedDataParallel):
        with module.no_sync():
            yield
        return
    set_sync = getattr(module, "set_requires_gradient_sync", None)  # FSDP2 modules
    if set_sync is None:
        yield
        return
    set_sync(False)
    try:
        yield
    finally:
        set_sync(True)


def full_tensor(t: Tensor) -> Tensor:
    """The whole tensor of a DTensor shard (a collective: every rank must call it)."""
    return t.full_tensor() if isinstance(t, DTensor) else t
