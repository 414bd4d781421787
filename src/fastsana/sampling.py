"""Flow-matching samplers: schedule, solvers and classifier-free guidance as free functions.

Contract (k-diffusion style): the network is a pure function

    model_fn(x, sigma) -> v

with x (B, ...), sigma (B,) the noise level in [0, 1] and v the flow velocity (noise − x0) of
x's shape, on the path x_σ = (1−σ)·x0 + σ·ε. Schedules build the σ grid, solvers integrate the
probability-flow ODE dx/dσ = v over it, and guidance is a wrapper that turns a text-conditioned
denoiser into a ``ModelFn``. Nothing here knows about the DiT.

The timestep quirk. diffusers' SanaPipeline feeds the transformer ``int64(σ_i·1000)`` (e.g.
982 for σ = 0.98246…) while its solver steps with the exact σ_i. Solvers here always call
``model_fn`` with the exact σ_i; converting σ into the network's timestep is the caller's job,
through one of two ``TimestepFn``s:

- ``sigma_to_timestep``: t = 1000·σ, the clean choice for any schedule;
- ``truncated_timestep_fn(sigmas)``: diffusers' truncated integers, looked up for the schedule's
  own sigmas, for image-for-image parity with diffusers.

A wrapper such as ``lambda x, s: dit(x, timestep_fn(s), text, mask)`` then picks the behaviour
without the solvers knowing. The lookup, rather than truncating ``1000·σ`` on the fly, is
needed because σ reaches the model as float32 while diffusers truncates the float64 value;
the two disagree by one for a few percent of (steps, shift) pairs (e.g. 3 steps, shift 1).

Precision: solvers integrate in float32 (float64 when x is float64) whatever x's dtype, and
return x's dtype. Step coefficients are computed in float64 from the float64 schedule.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor
from tqdm.auto import tqdm

ModelFn = Callable[[Tensor, Tensor], Tensor]
"""``model_fn(x, sigma) -> v``: x (B, ...), sigma (B,) in [0, 1], v of x's shape."""

DenoiseFn = Callable[[Tensor, Tensor, Tensor, Tensor], Tensor]
"""``denoise(x, sigma, text, mask) -> v``: text (B, L, D), mask (B, L)."""

TimestepFn = Callable[[Tensor], Tensor]
"""Maps sigma (B,) to the network's timestep input (B,) in [0, 1000]."""

StepCallback = Callable[[int, float, Tensor], None]
"""``callback(step_index, sigma_next, x_next)``, called after each solver step."""

NUM_TRAIN_TIMESTEPS = 1000


# --------------------------------------------------------------------------- schedule


def shift_sigmas(sigmas: Tensor, shift: float) -> Tensor:
    """Resolution shift σ' = s·σ / (1 + (s−1)·σ); s > 1 spends more steps at high noise."""
    _check_shift(shift)
    return shift * sigmas / (1 + (shift - 1) * sigmas)


def flow_sigmas(steps: int, shift: float) -> Tensor:
    """The ``steps + 1`` decreasing noise levels of SANA's Flow-DPM-Solver schedule, last one 0.

    u_i = 0.999·(N−i)/N for i < N, shifted, then a final 0. Returned in float64; ``.float()``
    equals diffusers' ``DPMSolverMultistepScheduler(use_flow_sigmas=True, flow_shift=shift)``
    sigmas bit for bit. The arithmetic follows numpy's ``linspace`` (1 + k·step, with the end
    point set exactly) because the truncated timesteps depend on the last bits of σ·1000.
    """
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be an integer >= 1, got {steps!r}")
    _check_shift(shift)
    # alpha_k = 1 − 0.999·k/N, k = 0..N, as 1 + k·(−0.999/N) with alpha_N set to 1/1000 exactly.
    k = torch.arange(steps + 1, dtype=torch.float64)
    alphas = k * ((1.0 / NUM_TRAIN_TIMESTEPS - 1.0) / steps) + 1.0
    alphas[-1] = 1.0 / NUM_TRAIN_TIMESTEPS
    unshifted = (1.0 - alphas).flip(0)[:-1]  # (N,), from 0.999 down to 0.999/N
    return torch.cat([shift_sigmas(unshifted, shift), unshifted.new_zeros(1)])  # (N + 1,)


def flow_timesteps(sigmas: Tensor) -> Tensor:
    """diffusers' model-input timesteps int64(σ_i·1000) for the first ``len(sigmas) − 1`` sigmas.

    N = 20, shift 3 gives 999, 982, 963, …, 136. Pass the float64 sigmas of ``flow_sigmas``:
    truncating float32 sigmas is off by one for some schedules.
    """
    _check_sigmas(sigmas)
    return (sigmas[:-1].double() * NUM_TRAIN_TIMESTEPS).long()


def sigma_to_timestep(sigma: Tensor) -> Tensor:
    """Clean σ → t map: t = 1000·σ, in sigma's dtype."""
    return sigma * NUM_TRAIN_TIMESTEPS


def truncated_timestep_fn(sigmas: Tensor) -> TimestepFn:
    """diffusers-parity σ → t map: the truncated integer timestep of each schedule sigma.

    The returned function accepts only the schedule's own sigmas (in any float dtype, as the
    solvers pass them) and raises for any other value, since diffusers defines no timestep there.
    """
    timesteps = flow_timesteps(sigmas)  # (N,) int64
    table = sigmas[:-1].double()  # (N,)

    def timestep(sigma: Tensor) -> Tensor:
        # Compare in sigma's own dtype: the solver rounded the same float64 value the same way.
        candidates = table.to(device=sigma.device, dtype=sigma.dtype)  # (N,)
        hits = sigma.reshape(-1, 1) == candidates.reshape(1, -1)  # (B, N)
        found = hits.any(dim=1)
        if not bool(found.all()):
            missing = sigma.reshape(-1)[~found].tolist()
            raise ValueError(
                f"sigma values {missing} are not on the schedule this timestep map was built "
                f"for ({len(table)} sigmas from {table[0].item():.6f} to {table[-1].item():.6f})"
            )
        index = hits.to(torch.int8).argmax(dim=1)  # (B,)
        return timesteps.to(sigma.device)[index].to(sigma.dtype).reshape(sigma.shape)

    return timestep


# --------------------------------------------------------------------------- solvers


def sample_flow_euler(
    model_fn: ModelFn,
    x: Tensor,
    sigmas: Tensor,
    *,
    progress: bool = False,
    callback: StepCallback | None = None,
) -> Tensor:
    """Flow-Euler: x ← x + (σ_{i+1} − σ_i)·v(x, σ_i). First order in the step size."""
    return _integrate(model_fn, x, sigmas, _euler_step, progress=progress, callback=callback)


def sample_flow_dpm(
    model_fn: ModelFn,
    x: Tensor,
    sigmas: Tensor,
    *,
    progress: bool = False,
    callback: StepCallback | None = None,
) -> Tensor:
    """Flow-DPM-Solver: multistep DPM-Solver++ 2M (midpoint) on the flow schedule α = 1 − σ.

    Integrates the x0 prediction x0_i = x_i − σ_i·v_i exactly in λ = log(α/σ) for a linear-in-λ
    x0, using the previous step's x0 for the slope. The first step (no history) and the last
    (σ → 0, where λ → ∞) are first order; with a final σ of 0 the result is the last x0.
    Same configuration as diffusers' SanaPipeline scheduler (solver_order 2, midpoint,
    lower_order_final, final_sigmas_type "zero").
    """
    return _integrate(model_fn, x, sigmas, _dpm_2m_step, progress=progress, callback=callback)


# A step maps (x_i, v_i, sigmas as floats, i, x0 of step i−1) to (x_{i+1}, x0 of step i).
_Step = Callable[[Tensor, Tensor, list[float], int, Tensor | None], tuple[Tensor, Tensor | None]]


def _euler_step(
    x: Tensor, v: Tensor, sigmas: list[float], i: int, prev_x0: Tensor | None
) -> tuple[Tensor, Tensor | None]:
    return x + (sigmas[i + 1] - sigmas[i]) * v, None


def _dpm_2m_step(
    x: Tensor, v: Tensor, sigmas: list[float], i: int, prev_x0: Tensor | None
) -> tuple[Tensor, Tensor | None]:
    s, s_next = sigmas[i], sigmas[i + 1]
    a, a_next = 1.0 - s, 1.0 - s_next
    x0 = x - s * v
    # First-order (DDIM) update, written without logs so σ_i = 1 and σ_{i+1} = 0 stay finite:
    # x_{i+1} = (σ_{i+1}/σ_i)·x_i + α_{i+1}(1 − e^{−h})·x0_i, e^{−h} = σ_{i+1}α_i / (σ_iα_{i+1}).
    ratio = s_next / s
    x0_coef = a_next - a * ratio
    x_next = ratio * x + x0_coef * x0
    is_last = i == len(sigmas) - 2
    if prev_x0 is not None and not is_last:
        # Midpoint correction ½·α_{i+1}(1 − e^{−h})·D1 with D1 = (x0_i − x0_{i−1})/r0 and
        # r0 = h_{i−1}/h_i; an infinite h_{i−1} (previous σ = 1) makes it vanish, as in diffusers.
        h = _log_snr(s_next) - _log_snr(s)
        h_prev = _log_snr(s) - _log_snr(sigmas[i - 1])
        x_next = x_next + (0.5 * x0_coef * h / h_prev) * (x0 - prev_x0)
    return x_next, x0


def _log_snr(sigma: float) -> float:
    """λ = log(α/σ) with α = 1 − σ; −∞ at σ = 1, +∞ at σ = 0."""
    if sigma >= 1.0:
        return -math.inf
    if sigma <= 0.0:
        return math.inf
    return math.log1p(-sigma) - math.log(sigma)


def _integrate(
    model_fn: ModelFn,
    x: Tensor,
    sigmas: Tensor,
    step: _Step,
    *,
    progress: bool,
    callback: StepCallback | None,
) -> Tensor:
    """The one solver loop: evaluate v at each σ_i and hand it to ``step``."""
    _check_sigmas(sigmas)
    if not isinstance(x, Tensor) or not x.is_floating_point() or x.ndim < 1:
        raise ValueError(f"x must be a floating-point tensor (B, ...), got {_describe(x)}")
    out_dtype = x.dtype
    compute_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    levels = sigmas.double().tolist()
    x = x.to(compute_dtype)
    prev_x0: Tensor | None = None
    for i in tqdm(range(len(levels) - 1), desc="sampling", disable=not progress):
        sigma = torch.full((x.shape[0],), levels[i], dtype=compute_dtype, device=x.device)  # (B,)
        v = model_fn(x, sigma)
        if not isinstance(v, Tensor) or v.shape != x.shape:
            raise ValueError(
                f"model_fn must return a tensor of x's shape {tuple(x.shape)}, got {_describe(v)}"
            )
        x, prev_x0 = step(x, v.to(compute_dtype), levels, i, prev_x0)
        if callback is not None:
            callback(i, levels[i + 1], x)
    return x.to(out_dtype)


# --------------------------------------------------------------------------- guidance


@dataclass(frozen=True)
class TextCondition:
    """One side of classifier-free guidance: text embeddings (B, L, D) and their mask (B, L)."""

    text: Tensor
    mask: Tensor

    def __post_init__(self) -> None:
        if not isinstance(self.text, Tensor) or self.text.ndim != 3:
            raise ValueError(
                f"TextCondition.text must be a (B, L, D) tensor, got {_describe(self.text)}"
            )
        if not isinstance(self.mask, Tensor) or self.mask.shape != self.text.shape[:2]:
            raise ValueError(
                f"TextCondition.mask must have shape (B, L) = {tuple(self.text.shape[:2])} "
                f"matching text, got {_describe(self.mask)}"
            )


def guided_model_fn(
    denoise: DenoiseFn,
    cond: TextCondition,
    uncond: TextCondition | None,
    scale: float,
) -> ModelFn:
    """Classifier-free guidance as a ``ModelFn``: v = v_u + scale·(v_c − v_u).

    Both branches run in one ``denoise`` call on the batch [uncond, cond]; a shorter text is
    padded with masked-out zeros so the two can be concatenated. A text batch of 1 is broadcast
    to x's batch. ``scale == 1`` is the conditional model alone: one pass, ``uncond`` unused.
    """
    if not math.isfinite(scale):
        raise ValueError(f"guidance scale must be a finite number, got {scale!r}")
    if scale != 1.0 and uncond is None:
        raise ValueError(f"guidance scale {scale} needs an unconditional TextCondition, got None")

    joined: dict[int, tuple[Tensor, Tensor]] = {}

    def text_for(batch: int) -> tuple[Tensor, Tensor]:
        """The text batch for ``batch`` latents, built once: the same tensors reach ``denoise``
        at every step, so a denoiser may reuse work done on them (the caption's K/V)."""
        if batch not in joined:
            c_text, c_mask = _expand_batch(cond, batch, "cond")
            if scale == 1.0:
                joined[batch] = c_text, c_mask
            else:
                u_text, u_mask = _expand_batch(uncond, batch, "uncond")
                length = max(c_text.shape[1], u_text.shape[1])
                text = torch.cat(
                    [_pad_tokens(u_text, length).to(c_text.dtype), _pad_tokens(c_text, length)]
                )  # (2B, L, D)
                mask = torch.cat(
                    [_pad_tokens(u_mask, length).to(c_mask.dtype), _pad_tokens(c_mask, length)]
                )  # (2B, L)
                joined[batch] = text, mask
        return joined[batch]

    def model_fn(x: Tensor, sigma: Tensor) -> Tensor:
        text, mask = text_for(x.shape[0])
        if scale == 1.0:
            return denoise(x, sigma, text, mask)
        v = denoise(torch.cat([x, x]), torch.cat([sigma, sigma]), text, mask)  # (2B, ...)
        # Combine in at least fp32: the difference v_c − v_u is small and scale amplifies it.
        v_uncond, v_cond = v.to(torch.promote_types(v.dtype, torch.float32)).chunk(2)
        return v_uncond + scale * (v_cond - v_uncond)

    return model_fn


def _expand_batch(condition: TextCondition, batch: int, name: str) -> tuple[Tensor, Tensor]:
    size = condition.text.shape[0]
    if size == batch:
        return condition.text, condition.mask
    if size == 1:
        return condition.text.expand(batch, -1, -1), condition.mask.expand(batch, -1)
    raise ValueError(f"{name} text batch must be 1 or x's batch {batch}, got {size}")


def _pad_tokens(tensor: Tensor, length: int) -> Tensor:
    """Right-pad dim 1 with zeros (zero embeddings, mask 0) up to ``length``."""
    missing = length - tensor.shape[1]
    if missing == 0:
        return tensor
    padding = tensor.new_zeros((tensor.shape[0], missing, *tensor.shape[2:]))
    return torch.cat([tensor, padding], dim=1)


# --------------------------------------------------------------------------- by name

SAMPLERS: dict[str, Callable[..., Tensor]] = {
    "flow_dpm": sample_flow_dpm,
    "flow_euler": sample_flow_euler,
}


def sample(
    name: str,
    model_fn: ModelFn,
    x: Tensor,
    sigmas: Tensor,
    *,
    progress: bool = False,
    callback: StepCallback | None = None,
) -> Tensor:
    """Run the sampler called ``name`` (a key of ``SAMPLERS``)."""
    if name not in SAMPLERS:
        raise ValueError(f"unknown sampler {name!r}; choose one of {sorted(SAMPLERS)}")
    return SAMPLERS[name](model_fn, x, sigmas, progress=progress, callback=callback)


# --------------------------------------------------------------------------- validation


def _check_shift(shift: float) -> None:
    if isinstance(shift, bool) or not isinstance(shift, (int, float)):
        raise ValueError(f"shift must be a positive number, got {shift!r}")
    if not (math.isfinite(shift) and shift > 0):
        raise ValueError(f"shift must be a finite number > 0, got {shift!r}")


def _check_sigmas(sigmas: Tensor) -> None:
    if not isinstance(sigmas, Tensor) or not sigmas.is_floating_point() or sigmas.ndim != 1:
        raise ValueError(f"sigmas must be a 1-D floating-point tensor, got {_describe(sigmas)}")
    if sigmas.numel() < 2:
        raise ValueError(f"sigmas needs at least 2 entries (one step), got {sigmas.numel()}")
    values = sigmas.double()
    if not bool(torch.isfinite(values).all()) or values.min() < 0 or values.max() > 1:
        raise ValueError(
            f"sigmas must lie in [0, 1], got min {values.min().item()} max {values.max().item()}"
        )
    if not bool((values[1:] < values[:-1]).all()):
        raise ValueError(f"sigmas must be strictly decreasing, got {values.tolist()}")


def _describe(value: object) -> str:
    if isinstance(value, Tensor):
        return f"tensor of shape {tuple(value.shape)} and dtype {value.dtype}"
    return type(value).__name__
