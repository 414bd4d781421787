"""Exponential moving average of the trained parameters (used for validation and export).

After optimizer step ``t`` (counted from 0):

    ema ← d_t·ema + (1 − d_t)·θ,    d_t = decay                        (warmup=False)
                                    d_t = min(decay, (1 + t)/(10 + t))  (warmup=True)

The warm-up averages early steps over a short window (d_0 = 0.1, so the EMA starts at the
first trained weights), which lets a short run's EMA be useful; after ~10/(1 − decay) steps
it is the plain decay. The averages are kept in float32 beside the parameters (on the same
device, with the same sharding under FSDP).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor


def ema_decay(step: int, decay: float, warmup: bool) -> float:
    """d_t of the module docstring."""
    if not warmup:
        return decay
    return min(decay, (1.0 + step) / (10.0 + step))


class EMA:
    """Float32 moving averages of named parameters.

    ``params`` maps names to the live parameters (plain tensors or DTensors); the averages
    start as copies of them.
    """

    def __init__(self, params: Mapping[str, Tensor], decay: float, warmup: bool = True) -> None:
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA decay must be in [0, 1), got {decay}")
        self.decay = decay
        self.warmup = warmup
        with torch.no_grad():
            self.shadow: dict[str, Tensor] = {
                name: p.detach().to(torch.float32, copy=True) for name, p in params.items()
            }

    @torch.no_grad()
    def update(self, params: Mapping[str, Tensor], step: int) -> float:
        """Fold the current ``params`` in after optimizer step ``step``; returns d_t."""
        if params.keys() != self.shadow.keys():
            raise ValueError("EMA.update got other parameter names than the EMA was built with")
        d = ema_decay(step, self.decay, self.warmup)
        names = list(self.shadow)
        averages = [self.shadow[n] for n in names]
        current = [params[n].detach().to(torch.float32) for n in names]
        torch._foreach_lerp_(averages, current, 1.0 - d)
        return d

    def state_dict(self) -> dict[str, Tensor]:
        return self.shadow

    @torch.no_grad()
    def load_state_dict(self, state: Mapping[str, Tensor]) -> None:
        if state.keys() != self.shadow.keys():
            missing = sorted(self.shadow.keys() - state.keys())[:5]
            extra = sorted(state.keys() - self.shadow.keys())[:5]
            raise ValueError(f"EMA state does not match: missing {missing}, unexpected {extra}")
        for name, tensor in state.items():
            self.shadow[name].copy_(tensor)
