"""Flow-matching samplers: diffusers parity, analytic accuracy, guidance and input checks.

Parity references are diffusers' schedulers driven by their own step loops; accuracy references
are exact flow-ODE endpoints of Gaussian data (closed form) and of a Gaussian mixture (RK4 in
float64), defined in ``bench/solver_accuracy.py``.
"""

from __future__ import annotations

import importlib.util
import math
import sys
from itertools import pairwise
from pathlib import Path

import pytest
import torch
from diffusers import DPMSolverMultistepScheduler, FlowMatchEulerDiscreteScheduler
from torch import Tensor

from fastsana.sampling import (
    SAMPLERS,
    TextCondition,
    flow_sigmas,
    flow_timesteps,
    guided_model_fn,
    sample,
    sample_flow_dpm,
    sample_flow_euler,
    shift_sigmas,
    sigma_to_timestep,
    truncated_timestep_fn,
)


def _load_bench():
    # bench/ is a folder of scripts, not a package; load the problem definitions by path.
    path = Path(__file__).resolve().parents[1] / "bench" / "solver_accuracy.py"
    spec = importlib.util.spec_from_file_location("solver_accuracy", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve annotations through sys.modules
    spec.loader.exec_module(module)
    return module


bench = _load_bench()

PARITY_RTOL = 1e-5


@pytest.fixture(autouse=True)
def _one_thread():
    # Every tensor here has a few thousand elements at most; intra-op threads only add
    # synchronisation (the mixture test: 13 s with 2 threads, 0.9 s with 1, on a busy machine).
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def _diffusers_dpm(steps: int, shift: float) -> DPMSolverMultistepScheduler:
    # SanaPipeline's scheduler: everything else at its default (solver_order 2, midpoint,
    # dpmsolver++, lower_order_final, final_sigmas_type "zero"); checked below, not assumed.
    scheduler = DPMSolverMultistepScheduler(
        use_flow_sigmas=True, prediction_type="flow_prediction", flow_shift=shift
    )
    config = scheduler.config
    assert (config.solver_order, config.solver_type, config.algorithm_type) == (
        2,
        "midpoint",
        "dpmsolver++",
    )
    assert config.lower_order_final and config.final_sigmas_type == "zero"
    assert not config.euler_at_final
    scheduler.set_timesteps(steps)
    return scheduler


class TimeMLP:
    """A fixed random nonlinear velocity field v(x, t), t in [0, 1000] timestep units."""

    def __init__(self, channels: int, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        hidden = 32
        self.w_in = torch.randn(channels, hidden, generator=g) / math.sqrt(channels)
        self.w_t = torch.randn(8, hidden, generator=g)
        self.w_out = torch.randn(hidden, channels, generator=g) / math.sqrt(hidden)
        self.freqs = torch.linspace(1.0, 12.0, 4)

    def __call__(self, x: Tensor, t: Tensor) -> Tensor:
        tokens = x.flatten(2).transpose(1, 2)  # (B, HW, C)
        phase = t.float()[:, None] / 1000 * self.freqs  # (B, 4)
        t_feat = torch.cat([phase.sin(), phase.cos()], dim=1) @ self.w_t  # (B, hidden)
        hidden = torch.tanh(tokens @ self.w_in + t_feat[:, None, :])  # (B, HW, hidden)
        v = hidden @ self.w_out - 0.5 * tokens  # (B, HW, C)
        return v.transpose(1, 2).reshape(x.shape)


def _rel_error(a: Tensor, b: Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


# --------------------------------------------------------------------------- schedule


@pytest.mark.parametrize(
    ("steps", "shift"), [(20, 3.0), (14, 4.0), (10, 6.0), (1, 3.0), (3, 1.0), (27, 1.0)]
)
def test_schedule_matches_diffusers(steps, shift):
    # (3, 1.0) and (27, 1.0) are schedules where truncating float32 sigmas would be off by one.
    scheduler = _diffusers_dpm(steps, shift)
    sigmas = flow_sigmas(steps, shift)
    assert sigmas.shape == (steps + 1,)
    assert torch.equal(sigmas.float(), scheduler.sigmas)
    assert sigmas[-1].item() == 0.0
    assert torch.equal(flow_timesteps(sigmas), scheduler.timesteps)
    # What a solver hands to model_fn is σ in float32; the lookup must still give the integers.
    lookup = truncated_timestep_fn(sigmas)
    assert torch.equal(lookup(sigmas[:-1].float()), scheduler.timesteps.float())


def test_timesteps_20_steps_shift_3_as_documented():
    timesteps = flow_timesteps(flow_sigmas(20, 3.0)).tolist()
    assert timesteps[:3] == [999, 982, 963]
    assert timesteps[-2:] == [249, 136]


def test_shift_is_the_resolution_shift():
    u = torch.tensor([0.0, 0.25, 0.5, 1.0], dtype=torch.float64)
    expected = torch.tensor([0.0, 0.5, 0.75, 1.0], dtype=torch.float64)  # 3u / (1 + 2u)
    assert torch.allclose(shift_sigmas(u, 3.0), expected)


def test_truncated_timesteps_reject_sigmas_off_the_schedule():
    lookup = truncated_timestep_fn(flow_sigmas(10, 3.0))
    with pytest.raises(ValueError, match="not on the schedule"):
        lookup(torch.tensor([0.5]))


# --------------------------------------------------------------------------- diffusers parity


@pytest.mark.parametrize(
    ("steps", "shift"), [(20, 3.0), (14, 4.0), (6, 6.0), (2, 3.0), (1, 3.0), (9, 1.0)]
)
def test_flow_dpm_matches_diffusers_sana_scheduler(steps, shift):
    net = TimeMLP(channels=4)
    noise = torch.randn(2, 4, 3, 3, generator=torch.Generator().manual_seed(1))

    # diffusers, as SanaPipeline drives it: truncated integer timesteps into the model.
    scheduler = _diffusers_dpm(steps, shift)
    x = noise.clone()
    for t in scheduler.timesteps:
        v = net(x, t.float().expand(x.shape[0]))
        x = scheduler.step(v, t, x, return_dict=False)[0]
    reference = x

    sigmas = flow_sigmas(steps, shift)
    timestep = truncated_timestep_fn(sigmas)
    ours = sample_flow_dpm(lambda x, s: net(x, timestep(s)), noise, sigmas)
    assert _rel_error(ours, reference) < PARITY_RTOL

    # The check can see the quirk: feeding the exact 1000·σ instead gives another image.
    clean = sample_flow_dpm(lambda x, s: net(x, sigma_to_timestep(s)), noise, sigmas)
    assert _rel_error(clean, reference) > 100 * PARITY_RTOL


def test_flow_dpm_matches_diffusers_with_exact_timesteps():
    net = TimeMLP(channels=4, seed=3)
    noise = torch.randn(2, 4, 3, 3, generator=torch.Generator().manual_seed(2))
    scheduler = _diffusers_dpm(20, 3.0)
    x = noise.clone()
    for i, t in enumerate(scheduler.timesteps):
        v = net(x, (scheduler.sigmas[i] * 1000).expand(x.shape[0]))
        x = scheduler.step(v, t, x, return_dict=False)[0]
    ours = sample_flow_dpm(lambda x, s: net(x, sigma_to_timestep(s)), noise, flow_sigmas(20, 3.0))
    assert _rel_error(ours, x) < PARITY_RTOL


@pytest.mark.parametrize(("steps", "shift"), [(20, 3.0), (7, 1.0)])
def test_flow_euler_matches_diffusers(steps, shift):
    net = TimeMLP(channels=4, seed=5)
    noise = torch.randn(2, 4, 3, 3, generator=torch.Generator().manual_seed(3))
    sigmas = flow_sigmas(steps, shift)
    # FlowMatchEulerDiscreteScheduler shifts whatever sigmas it is given; shift=1 keeps ours.
    scheduler = FlowMatchEulerDiscreteScheduler(shift=1.0)
    scheduler.set_timesteps(sigmas=sigmas[:-1].tolist())
    assert torch.allclose(scheduler.sigmas, sigmas.float())
    x = noise.clone()
    for t in scheduler.timesteps:
        v = net(x, t.expand(x.shape[0]))
        x = scheduler.step(v, t, x, return_dict=False)[0]
    ours = sample_flow_euler(lambda x, s: net(x, sigma_to_timestep(s)), noise, sigmas)
    assert _rel_error(ours, x) < PARITY_RTOL


@pytest.mark.parametrize("sampler", sorted(SAMPLERS))
def test_constant_velocity_is_integrated_exactly(sampler):
    # v = c everywhere: dx/dσ = c, so x(0) = x(σ0) − σ0·c for any grid and any consistent solver.
    noise = torch.randn(3, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    c = torch.linspace(-1, 1, 5, dtype=torch.float64)
    sigmas = flow_sigmas(9, 3.0)
    result = sample(sampler, lambda x, s: c.expand_as(x), noise, sigmas)
    assert torch.allclose(result, noise - sigmas[0] * c, atol=1e-12)


# --------------------------------------------------------------------------- analytic accuracy


def _gaussian_errors(sampler: str, shift: float, steps: list[int]) -> list[float]:
    flow = bench.gaussian_problem()
    noise = torch.randn(
        256, flow.dim, dtype=torch.float64, generator=torch.Generator().manual_seed(0)
    )
    start = flow_sigmas(1, shift)[0].item()
    exact = flow.exact_solution(noise, start, 0.0)
    return [
        _rms(bench.sampler_errors(flow, sampler, noise, flow_sigmas(n, shift), exact))
        for n in steps
    ]


def _rms(per_sample_errors: Tensor) -> float:
    return per_sample_errors.pow(2).mean().sqrt().item()


def test_gaussian_velocity_and_closed_form_flow_agree():
    # Two independent derivations: v from conditional expectations, the endpoint from
    # quantile-to-quantile transport. RK4 on the first must land on the second.
    flow = bench.gaussian_problem()
    noise = torch.randn(
        64, flow.dim, dtype=torch.float64, generator=torch.Generator().manual_seed(4)
    )
    exact = flow.exact_solution(noise, 0.999, 0.0)
    # RK4's own error at 200 steps is ~1e-8 (the 0.05-wide dimension); a wrong formula is O(0.1).
    assert (bench.rk4_solve(flow, noise, 0.999, 0.0, 200) - exact).abs().max() < 1e-6


@pytest.mark.parametrize("shift", [3.0, 1.0])
def test_euler_converges_at_first_order(shift):
    errors = _gaussian_errors("flow_euler", shift, [100, 200, 400])
    for coarse, fine in pairwise(errors):
        assert 1.8 < coarse / fine < 2.2  # first order: halving the steps halves the error


@pytest.mark.parametrize("shift", [3.0, 1.0])
def test_dpm_beats_euler_on_gaussian(shift):
    steps = [5, 10, 20, 50, 100]
    dpm = _gaussian_errors("flow_dpm", shift, steps)
    euler = _gaussian_errors("flow_euler", shift, steps)
    for errors in (dpm, euler):
        assert all(fine < coarse for coarse, fine in pairwise(errors))
    assert all(d < e for d, e in zip(dpm, euler, strict=True))
    assert dpm[steps.index(20)] < 0.6 * euler[steps.index(20)]


def test_dpm_error_at_sana_shift_is_the_final_jump():
    # With shift 3 the last nonzero σ is large (0.136 at 20 steps); both solvers end with the
    # same jump x − σ·v to σ = 0, and DPM is accurate enough before it that the jump's own
    # error (from an exact state) is all that is left.
    flow = bench.gaussian_problem()
    noise = torch.randn(
        256, flow.dim, dtype=torch.float64, generator=torch.Generator().manual_seed(0)
    )
    for steps in (14, 20, 28):
        sigmas = flow_sigmas(steps, 3.0)
        exact = flow.exact_solution(noise, sigmas[0].item(), 0.0)
        dpm = _rms(bench.sampler_errors(flow, "flow_dpm", noise, sigmas, exact))
        jump = bench.final_jump_endpoint(flow, noise, sigmas, bench.REFERENCE_STEPS)
        jump = _rms((jump - exact).norm(dim=1))
        assert abs(dpm / jump - 1) < 0.15


def test_schedule_from_pure_noise():
    # σ0 = 1 makes λ0 = −∞: DPM's first step must reduce to DDIM and its second step's slope
    # term vanish (as in diffusers), leaving finite, accurate results.
    flow = bench.gaussian_problem()
    noise = torch.randn(
        256, flow.dim, dtype=torch.float64, generator=torch.Generator().manual_seed(0)
    )
    sigmas = torch.linspace(1, 0, 21, dtype=torch.float64)
    exact = flow.exact_solution(noise, 1.0, 0.0)
    dpm = bench.sampler_errors(flow, "flow_dpm", noise, sigmas, exact)
    euler = bench.sampler_errors(flow, "flow_euler", noise, sigmas, exact)
    assert torch.isfinite(dpm).all()
    assert _rms(dpm) < _rms(euler)


def test_mixture_errors_decrease_and_dpm_beats_euler():
    # RMS, not median: at shift 3 and 20 steps Euler's median error is no worse than DPM's,
    # but Euler sends more samples near the boundary between modes to the wrong mode.
    flow = bench.mixture_problem()
    noise = torch.randn(
        512, flow.dim, dtype=torch.float64, generator=torch.Generator().manual_seed(0)
    )
    steps = [10, 20, 50]
    for shift in (3.0, 1.0):
        start = flow_sigmas(1, shift)[0].item()
        reference = bench.rk4_solve(flow, noise, start, 0.0, 400)
        coarser = bench.rk4_solve(flow, noise, start, 0.0, 200)
        # Converged far below the smallest solver error measured here (~3e-3).
        assert (reference - coarser).abs().max() < 1e-4
        rms = {
            name: [
                _rms(bench.sampler_errors(flow, name, noise, flow_sigmas(n, shift), reference))
                for n in steps
            ]
            for name in SAMPLERS
        }
        for errors in rms.values():
            assert all(fine < coarse for coarse, fine in pairwise(errors))
        assert all(d < e for d, e in zip(rms["flow_dpm"], rms["flow_euler"], strict=True))


# --------------------------------------------------------------------------- solver plumbing


def test_callback_progress_and_dtype(capsys):
    seen_dtypes, calls = [], []

    def model_fn(x, sigma):
        seen_dtypes.append((x.dtype, sigma.dtype, tuple(sigma.shape)))
        return -x

    noise = torch.randn(2, 3, 4, 4).to(torch.bfloat16)
    sigmas = flow_sigmas(5, 3.0)
    result = sample_flow_dpm(
        model_fn,
        noise,
        sigmas,
        progress=True,
        callback=lambda i, s, x: calls.append((i, s, x.clone())),
    )
    assert result.dtype == torch.bfloat16
    assert set(seen_dtypes) == {(torch.float32, torch.float32, (2,))}
    assert [i for i, _, _ in calls] == list(range(5))
    assert [s for _, s, _ in calls] == sigmas[1:].tolist()
    assert torch.equal(calls[-1][2].to(torch.bfloat16), result)
    assert "sampling" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("sigmas", "message"),
    [
        (torch.tensor([[1.0, 0.0]]), "1-D"),
        (torch.tensor([0.5]), "at least 2"),
        (torch.tensor([0.2, 0.5, 0.0]), "strictly decreasing"),
        (torch.tensor([0.5, 0.5, 0.0]), "strictly decreasing"),
        (torch.tensor([1.5, 0.0]), r"\[0, 1\]"),
        (torch.tensor([0.5, -0.1]), r"\[0, 1\]"),
        (torch.tensor([float("nan"), 0.0]), r"\[0, 1\]"),
        (torch.tensor([1, 0]), "floating-point"),
    ],
)
def test_bad_sigmas_are_rejected(sigmas, message):
    with pytest.raises(ValueError, match=message):
        sample_flow_euler(lambda x, s: x, torch.zeros(1, 2), sigmas)


def test_bad_schedule_arguments_are_rejected():
    with pytest.raises(ValueError, match="steps"):
        flow_sigmas(0, 3.0)
    with pytest.raises(ValueError, match="shift"):
        flow_sigmas(10, 0.0)


def test_model_output_shape_is_checked():
    with pytest.raises(ValueError, match="x's shape"):
        sample_flow_dpm(lambda x, s: x[:, :1], torch.zeros(2, 3), flow_sigmas(4, 3.0))


def test_unknown_sampler_lists_the_choices():
    assert set(SAMPLERS) == {"flow_dpm", "flow_euler"}
    with pytest.raises(ValueError, match=r"flow_dpm.*flow_euler"):
        sample("heun", lambda x, s: x, torch.zeros(1, 2), flow_sigmas(4, 3.0))


# --------------------------------------------------------------------------- guidance


class RecordingDenoiser:
    """v = x·(masked mean of the text) + σ, recording each call's batch and inputs."""

    def __init__(self) -> None:
        self.calls: list[tuple[Tensor, Tensor, Tensor, Tensor]] = []

    def __call__(self, x, sigma, text, mask):
        self.calls.append((x, sigma, text, mask))
        weights = mask.to(text.dtype)[..., None]  # (B, L, 1)
        pooled = (text * weights).sum(1) / weights.sum(1)  # (B, D)
        return x * pooled.mean(-1)[:, None, None] + sigma[:, None, None]


def _condition(batch: int, length: int, valid: int, seed: int) -> TextCondition:
    g = torch.Generator().manual_seed(seed)
    mask = torch.zeros(batch, length, dtype=torch.long)
    mask[:, :valid] = 1
    return TextCondition(torch.randn(batch, length, 6, generator=g), mask)


def test_guidance_equals_two_manual_passes_in_one_call():
    cond, uncond = _condition(2, 5, 4, seed=0), _condition(2, 5, 2, seed=1)
    x, sigma = torch.randn(2, 3, 4), torch.tensor([0.7, 0.7])
    denoiser = RecordingDenoiser()
    guided = guided_model_fn(denoiser, cond, uncond, scale=4.5)(x, sigma)
    assert len(denoiser.calls) == 1 and denoiser.calls[0][0].shape[0] == 4

    manual = RecordingDenoiser()
    v_cond = manual(x, sigma, cond.text, cond.mask)
    v_uncond = manual(x, sigma, uncond.text, uncond.mask)
    assert torch.allclose(guided, v_uncond + 4.5 * (v_cond - v_uncond), atol=1e-6)


def test_guidance_scale_one_is_a_single_conditional_pass():
    cond = _condition(2, 5, 3, seed=0)
    x, sigma = torch.randn(2, 3, 4), torch.tensor([0.3, 0.3])
    denoiser = RecordingDenoiser()
    v = guided_model_fn(denoiser, cond, None, scale=1.0)(x, sigma)
    assert len(denoiser.calls) == 1 and denoiser.calls[0][0].shape[0] == 2
    assert torch.equal(v, RecordingDenoiser()(x, sigma, cond.text, cond.mask))


def test_guidance_pads_texts_of_different_lengths():
    cond, uncond = _condition(2, 7, 5, seed=0), _condition(1, 3, 3, seed=1)  # and batch 1
    x, sigma = torch.randn(2, 3, 4), torch.tensor([0.5, 0.5])
    denoiser = RecordingDenoiser()
    guided = guided_model_fn(denoiser, cond, uncond, scale=3.0)(x, sigma)
    _, _, text, mask = denoiser.calls[0]
    assert text.shape == (4, 7, 6) and mask.shape == (4, 7)
    assert mask[:2, 3:].sum() == 0 and text[:2, 3:].abs().sum() == 0  # padded uncond tokens

    manual = RecordingDenoiser()
    v_cond = manual(x, sigma, cond.text, cond.mask)
    v_uncond = manual(x, sigma, uncond.text.expand(2, -1, -1), uncond.mask.expand(2, -1))
    assert torch.allclose(guided, v_uncond + 3.0 * (v_cond - v_uncond), atol=1e-6)


def test_guidance_argument_errors():
    cond = _condition(2, 5, 3, seed=0)
    with pytest.raises(ValueError, match="unconditional"):
        guided_model_fn(RecordingDenoiser(), cond, None, scale=4.5)
    with pytest.raises(ValueError, match="mask"):
        TextCondition(torch.zeros(2, 5, 6), torch.ones(2, 4))
    with pytest.raises(ValueError, match="batch"):
        guided_model_fn(RecordingDenoiser(), cond, None, scale=1.0)(
            torch.zeros(3, 2), torch.zeros(3)
        )
