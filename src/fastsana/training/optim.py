"""Optimizers (AdamW from torch, CAME from pytorch-optimizer) and the learning-rate schedule.

The schedule is a pure function of the step, applied to every parameter group before each
optimizer step, so resuming needs nothing but the step number:

    lr(t) = lr · (t + 1)/W                                  t < W   (linear warm-up)
    lr(t) = lr                                              constant
    lr(t) = lr · (r + (1 − r)·½(1 + cos(π·p))),  p = (t − W)/(T − W)   cosine to r·lr at T

with W = warmup_steps, T = max_steps, r = min_lr_ratio and t the 0-based step.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import nn

from fastsana.training.config import OptimizerConfig, ScheduleConfig

ADAMW_BETAS = (0.9, 0.999)
ADAMW_EPS = (1e-8,)
# The paper's CAME settings (section 5 of the facts): betas (0.9, 0.999, 0.9999), eps
# (1e-30, 1e-16).
CAME_BETAS = (0.9, 0.999, 0.9999)
CAME_EPS = (1e-30, 1e-16)


def build_optimizer(
    params: Iterable[nn.Parameter], config: OptimizerConfig, lr: float | None = None
) -> torch.optim.Optimizer:
    """The optimizer named by ``config`` over ``params`` (``lr`` overrides ``config.lr``)."""
    params = [p for p in params if p.requires_grad]
    if not params:
        raise ValueError("no trainable parameter to optimize")
    lr = config.lr if lr is None else lr
    if config.name == "adamw":
        betas = tuple(config.betas) if config.betas else ADAMW_BETAS
        eps = config.eps[0] if config.eps else ADAMW_EPS[0]
        return torch.optim.AdamW(
            params, lr=lr, betas=betas, eps=eps, weight_decay=config.weight_decay
        )
    from pytorch_optimizer import CAME

    betas = tuple(config.betas) if config.betas else CAME_BETAS
    eps1, eps2 = config.eps if config.eps else CAME_EPS
    return CAME(params, lr=lr, betas=betas, eps1=eps1, eps2=eps2, weight_decay=config.weight_decay)


def lr_factor(step: int, schedule: ScheduleConfig) -> float:
    """lr(step) / peak lr (see the module docstring)."""
    if step < schedule.warmup_steps:
        return (step + 1) / schedule.warmup_steps
    if schedule.decay == "constant":
        return 1.0
    span = max(1, schedule.max_steps - schedule.warmup_steps)
    progress = min(1.0, (step - schedule.warmup_steps) / span)
    cosine = 0.5 * (1.0 + math.cos(math.pi * progress))
    return schedule.min_lr_ratio + (1.0 - schedule.min_lr_ratio) * cosine


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
