"""One trained network with its optimizer and EMA: the unit the trainer steps and saves.

A task (DiT, autoencoder) owns one part ("model") or two (plus a "discriminator"). A step
is: backward passes (by the task) → :meth:`Part.step`: set the scheduled learning rate,
clip the global gradient norm, optimizer step, EMA update.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Iterator

import torch
from torch import Tensor, nn
from torch.distributed.tensor import DTensor

from fastsana.runtime import matmul_dtype
from fastsana.training.checkpointing import TrainedPart
from fastsana.training.config import EMAConfig, OptimizerConfig, ScheduleConfig
from fastsana.training.distributed import full_tensor
from fastsana.training.ema import EMA
from fastsana.training.optim import build_optimizer, lr_factor, set_lr

logger = logging.getLogger(__name__)


class Part:
    """``module`` is what the task calls (DDP wrapper, FSDP module or the model itself);
    ``model`` is the unwrapped network whose parameter names the checkpoints use."""

    def __init__(
        self,
        name: str,
        module: nn.Module,
        model: nn.Module,
        optimizer_config: OptimizerConfig,
        ema_config: EMAConfig,
        *,
        lr: float | None = None,
    ) -> None:
        self.name = name
        self.module = module
        self.model = model
        # After wrapping: under FSDP these are the sharded DTensor parameters.
        self.params: dict[str, nn.Parameter] = {
            n: p for n, p in model.named_parameters() if p.requires_grad
        }
        self.peak_lr = optimizer_config.lr if lr is None else lr
        self.grad_clip = optimizer_config.grad_clip
        self.optimizer = build_optimizer(self.params.values(), optimizer_config, self.peak_lr)
        by_id = {id(p): n for n, p in self.params.items()}
        self.optimizer_names = [
            by_id[id(p)] for g in self.optimizer.param_groups for p in g["params"]
        ]
        self.ema = (
            EMA(self.params, ema_config.decay, ema_config.warmup) if ema_config.enabled else None
        )
        self.skipped_steps = 0

    def step(self, step: int, schedule: ScheduleConfig) -> float:
        """Learning rate for ``step``, clipping, optimizer step, EMA; returns the gradient
        norm before clipping. A non-finite norm skips the update (logged, counted)."""
        lr = self.peak_lr * lr_factor(step, schedule)
        set_lr(self.optimizer, lr)
        params = list(self.params.values())
        max_norm = self.grad_clip if self.grad_clip > 0 else math.inf
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
        norm = float(full_tensor(norm) if isinstance(norm, DTensor) else norm)
        if math.isfinite(norm):
            self.optimizer.step()
            if self.ema is not None:
                self.ema.update(self.params, step)
        else:
            self.skipped_steps += 1
            logger.warning("step %d: %s gradient norm is %s; update skipped", step, self.name, norm)
        self.optimizer.zero_grad(set_to_none=True)
        return norm

    def lr_at(self, step: int, schedule: ScheduleConfig) -> float:
        return self.peak_lr * lr_factor(step, schedule)

    def weights(self, which: str) -> dict[str, Tensor]:
        """The EMA (``"ema"``, when enabled) or the live trained parameters, by name."""
        if which == "ema" and self.ema is not None:
            return self.ema.shadow
        return {n: p.detach() for n, p in self.params.items()}

    def full_weights(self, which: str) -> dict[str, Tensor]:
        """:meth:`weights` gathered whole (a collective under FSDP: every rank calls it)."""
        return {n: full_tensor(t) for n, t in self.weights(which).items()}

    def trained_part(self) -> TrainedPart:
        return TrainedPart(
            name=self.name,
            params=self.params,
            optimizer=self.optimizer,
            optimizer_names=self.optimizer_names,
            ema=self.ema.shadow if self.ema is not None else None,
        )


@contextlib.contextmanager
def autocast(device: torch.device, precision: str) -> Iterator[None]:
    """bf16 autocast on CPU or CUDA (master weights and the loss stay fp32). ``"auto"``: bf16
    where the device multiplies it natively (GPUs, AMX / AVX-512 CPUs), else fp32."""
    enabled = autocast_enabled(device, precision)
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=enabled):
        yield


def autocast_enabled(device: torch.device, precision: str) -> bool:
    if precision == "auto":
        return matmul_dtype(device, torch.bfloat16) == torch.bfloat16
    return precision == "bf16"
