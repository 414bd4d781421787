"""Accuracy of Flow-DPM-Solver and Flow-Euler against exact flow-ODE endpoints.

Data with a closed-form velocity field: a diagonal Gaussian N(μ, diag(s²)) and a 2-D mixture
of Gaussians, noised as x_σ = (1−σ)·x0 + σ·ε. Every solver starts from the same noise at the
schedule's first σ and is compared with the exact endpoint at σ = 0 of the same ODE: affine
in closed form for the Gaussian, RK4 with 1000 float64 steps for the mixture.

    .venv/bin/python bench/solver_accuracy.py            # table to stdout, plot to docs/img

The plot needs matplotlib (not a project dependency): ``.venv/bin/pip install matplotlib``.
The tests import the problem definitions from this file.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor
from tqdm.auto import tqdm

from fastsana.checkpoints.common import atomic_write
from fastsana.sampling import SAMPLERS, flow_sigmas

STEPS = (5, 8, 10, 14, 20, 28, 50, 100)
SHIFTS = (3.0, 1.0)
REFERENCE_STEPS = 1000
PLOT_PATH = Path(__file__).resolve().parents[1] / "docs" / "img" / "solver_error.png"


# --------------------------------------------------------------------------- analytic problems


@dataclass(frozen=True)
class GaussianMixtureFlow:
    """Data x0 ~ Σ_k w_k N(μ_k, diag(s_k²)) in D dims; its exact flow velocity is closed form.

    Given component k, (x0, x_σ) is jointly Gaussian per dimension with x_σ ~ N((1−σ)μ, V),
    V = (1−σ)²s² + σ², Cov(ε, x_σ) = σ and Cov(x0, x_σ) = (1−σ)s², so
    E[ε − x0 | x_σ = x, k] = (σ − (1−σ)s²)/V·(x − (1−σ)μ) − μ. The mixture velocity averages
    these with the posterior component probabilities p(k | x_σ = x).
    """

    weights: Tensor  # (K,)
    means: Tensor  # (K, D)
    stds: Tensor  # (K, D)

    def __post_init__(self) -> None:
        k, d = self.means.shape
        if self.weights.shape != (k,) or self.stds.shape != (k, d):
            raise ValueError(
                f"weights must be (K,) and stds (K, D) for means (K, D) = {(k, d)}, got "
                f"{tuple(self.weights.shape)} and {tuple(self.stds.shape)}"
            )
        if bool((self.stds <= 0).any()) or bool((self.weights <= 0).any()):
            raise ValueError("stds and weights must be positive")

    @property
    def dim(self) -> int:
        return self.means.shape[1]

    def velocity(self, x: Tensor, sigma: Tensor) -> Tensor:
        """v(x, σ) = E[ε − x0 | x_σ = x] for x (B, D) and σ (B,)."""
        s = sigma.to(x.dtype)[:, None, None]  # (B, 1, 1)
        means, stds = self.means.to(x.dtype), self.stds.to(x.dtype)  # (K, D)
        centre = (1 - s) * means  # (B, K, D)
        var = (1 - s) ** 2 * stds**2 + s**2  # (B, K, D)
        offset = x[:, None, :] - centre  # (B, K, D)
        log_density = -0.5 * (offset**2 / var + var.log()).sum(-1)  # (B, K)
        posterior = torch.softmax(log_density + self.weights.to(x.dtype).log(), dim=-1)  # (B, K)
        per_component = (s - (1 - s) * stds**2) / var * offset - means  # (B, K, D)
        return (posterior[..., None] * per_component).sum(1)  # (B, D)

    def exact_solution(self, x: Tensor, sigma_from: float, sigma_to: float) -> Tensor:
        """Closed-form ODE solution at ``sigma_to`` from x at ``sigma_from`` (one Gaussian only).

        The flow of a Gaussian is affine per dimension and keeps standardised values fixed:
        z = (x − (1−σ)μ)/√V(σ) is constant along the ODE (quantiles map to quantiles).
        """
        if self.means.shape[0] != 1:
            raise ValueError("exact_solution is closed form for a single Gaussian only; use rk4")
        mean, std = self.means[0].to(x.dtype), self.stds[0].to(x.dtype)  # (D,)
        z = (x - (1 - sigma_from) * mean) / ((1 - sigma_from) ** 2 * std**2 + sigma_from**2).sqrt()
        return (1 - sigma_to) * mean + ((1 - sigma_to) ** 2 * std**2 + sigma_to**2).sqrt() * z

    def solution(self, x: Tensor, sigma_from: float, sigma_to: float, rk4_steps: int) -> Tensor:
        """The exact solution where closed form exists, else the RK4 reference."""
        if self.means.shape[0] == 1:
            return self.exact_solution(x, sigma_from, sigma_to)
        return rk4_solve(self, x, sigma_from, sigma_to, rk4_steps)


def rk4_solve(
    flow: GaussianMixtureFlow, x: Tensor, sigma_from: float, sigma_to: float, steps: int
) -> Tensor:
    """High-accuracy reference: classical RK4 on uniform σ steps."""
    h = (sigma_to - sigma_from) / steps
    batch = x.shape[0]
    for i in range(steps):
        s = sigma_from + i * h
        level = [torch.full((batch,), value, dtype=x.dtype) for value in (s, s + h / 2, s + h)]
        k1 = flow.velocity(x, level[0])
        k2 = flow.velocity(x + h / 2 * k1, level[1])
        k3 = flow.velocity(x + h / 2 * k2, level[1])
        k4 = flow.velocity(x + h * k3, level[2])
        x = x + h / 6 * (k1 + 2 * k2 + 2 * k3 + k4)
    return x


def gaussian_problem() -> GaussianMixtureFlow:
    """4-D Gaussian whose spreads go from latent-like (1.0) to sharply concentrated (0.05)."""
    return GaussianMixtureFlow(
        weights=torch.ones(1, dtype=torch.float64),
        means=torch.tensor([[0.5, -1.0, 0.0, 2.0]], dtype=torch.float64),
        stds=torch.tensor([[1.0, 0.5, 0.2, 0.05]], dtype=torch.float64),
    )


def mixture_problem() -> GaussianMixtureFlow:
    """2-D mixture of three narrow, unequally weighted Gaussians on a circle of radius 1.5."""
    angles = torch.tensor([0.0, 2.0, 4.0], dtype=torch.float64)
    return GaussianMixtureFlow(
        weights=torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64),
        means=1.5 * torch.stack([angles.cos(), angles.sin()], dim=1),
        stds=torch.full((3, 2), 0.2, dtype=torch.float64),
    )


def sampler_errors(
    flow: GaussianMixtureFlow,
    sampler: str,
    noise: Tensor,
    sigmas: Tensor,
    reference: Tensor,
) -> Tensor:
    """Per-sample Euclidean distance (S,) of one solve's endpoint to the reference."""
    return (SAMPLERS[sampler](flow.velocity, noise, sigmas) - reference).norm(dim=1)


def final_jump_endpoint(
    flow: GaussianMixtureFlow, noise: Tensor, sigmas: Tensor, rk4_steps: int
) -> Tensor:
    """An exact solve down to σ_{N−1} followed by the solvers' common last step.

    Both solvers end with x − σ_{N−1}·v (Euler's step to 0 and DPM's first-order step to 0 are
    this same x0 prediction), so its error is what a perfect solver would still miss on this
    schedule. Not a lower bound: a solver's earlier errors can partly cancel it.
    """
    start, last = sigmas[0].item(), sigmas[-2].item()
    x_last = flow.solution(noise, start, last, rk4_steps)
    level = torch.full((noise.shape[0],), last, dtype=noise.dtype)
    return x_last - last * flow.velocity(x_last, level)


def mode_flips(flow: GaussianMixtureFlow, endpoint: Tensor, reference: Tensor) -> int:
    """How many samples end nearest to a different mixture component than the reference."""
    nearest = torch.cdist(endpoint, flow.means).argmin(dim=1)  # (S,)
    return int((nearest != torch.cdist(reference, flow.means).argmin(dim=1)).sum())


# --------------------------------------------------------------------------- benchmark

FINAL_JUMP = "final_jump_only"
METHODS = (*SAMPLERS, FINAL_JUMP)
Key = tuple[str, float, str, int]  # (problem, shift, method, steps)


def measure(samples: int, seed: int, rk4_steps: int) -> tuple[dict[Key, Tensor], dict[Key, int]]:
    """Per-sample endpoint errors (S,) and mode-flip counts for every configuration."""
    problems = {"gaussian": gaussian_problem(), "mixture": mixture_problem()}
    errors: dict[Key, Tensor] = {}
    flips: dict[Key, int] = {}
    generator = torch.Generator().manual_seed(seed)
    for problem, flow in problems.items():
        noise = torch.randn(samples, flow.dim, generator=generator, dtype=torch.float64)
        for shift in SHIFTS:
            # Every schedule of one shift starts at shift(0.999), so one reference serves all.
            start = flow_sigmas(1, shift)[0].item()
            reference = flow.solution(noise, start, 0.0, rk4_steps)
            for steps in tqdm(STEPS, desc=f"{problem}, shift {shift:g}", leave=False):
                sigmas = flow_sigmas(steps, shift)
                endpoints = {
                    name: SAMPLERS[name](flow.velocity, noise, sigmas) for name in SAMPLERS
                }
                endpoints[FINAL_JUMP] = final_jump_endpoint(flow, noise, sigmas, rk4_steps)
                for method, endpoint in endpoints.items():
                    key = (problem, shift, method, steps)
                    errors[key] = (endpoint - reference).norm(dim=1)
                    flips[key] = mode_flips(flow, endpoint, reference)
    return errors, flips


def reference_check(samples: int, seed: int, rk4_steps: int) -> tuple[float, float]:
    """How good the RK4 reference is: its error on the Gaussian (exact answer known) and its
    change on the mixture when the step count is halved."""
    generator = torch.Generator().manual_seed(seed)
    start = flow_sigmas(1, SHIFTS[0])[0].item()
    gaussian, mixture = gaussian_problem(), mixture_problem()
    noise = torch.randn(samples, gaussian.dim, generator=generator, dtype=torch.float64)
    exact = gaussian.exact_solution(noise, start, 0.0)
    gaussian_error = (rk4_solve(gaussian, noise, start, 0.0, rk4_steps) - exact).abs().max()
    noise = torch.randn(samples, mixture.dim, generator=generator, dtype=torch.float64)
    fine = rk4_solve(mixture, noise, start, 0.0, rk4_steps)
    coarse = rk4_solve(mixture, noise, start, 0.0, rk4_steps // 2)
    return gaussian_error.item(), (fine - coarse).abs().max().item()


def _table(cell: Callable[[str, float, str, int], str], problems: list[str], title: str) -> str:
    header = f"| {title} | shift | method | " + " | ".join(f"{n} steps" for n in STEPS) + " |"
    lines = [header, "|---" * (3 + len(STEPS)) + "|"]
    for problem in problems:
        for shift in SHIFTS:
            for method in METHODS:
                cells = " | ".join(cell(problem, shift, method, n) for n in STEPS)
                lines.append(f"| {problem} | {shift:g} | {method} | {cells} |")
    return "\n".join(lines)


def error_table(errors: dict[Key, Tensor]) -> str:
    """Cells are "RMS / median" of the per-sample endpoint error."""

    def cell(*key: object) -> str:
        values = errors[key]
        return f"{values.pow(2).mean().sqrt():.1e} / {values.median():.1e}"

    return _table(cell, sorted({key[0] for key in errors}), "problem")


def flip_table(flips: dict[Key, int]) -> str:
    """Mixture samples that end in another component than the exact solution."""
    return _table(lambda *key: str(flips[key]), ["mixture"], "mode flips")


def plot(errors: dict[Key, Tensor], path: Path) -> None:
    """RMS error vs steps, one panel per problem; the final-jump floor dotted."""
    try:
        import matplotlib

        matplotlib.use("Agg")  # headless: files only
        import matplotlib.pyplot as plt
    except ImportError as error:
        raise SystemExit(
            "the plot needs matplotlib, which is not a fastsana dependency: "
            "run `.venv/bin/pip install matplotlib`, or pass --no-plot"
        ) from error
    problems = sorted({key[0] for key in errors})
    figure, axes = plt.subplots(1, len(problems), figsize=(5.5 * len(problems), 4.2), squeeze=False)
    styles = {"flow_dpm": "-o", "flow_euler": "--s", FINAL_JUMP: ":"}
    colours = {3.0: "tab:blue", 1.0: "tab:orange"}
    for axis, problem in zip(axes[0], problems, strict=True):
        for shift in SHIFTS:
            for method, style in styles.items():
                rms = [errors[problem, shift, method, n].pow(2).mean().sqrt().item() for n in STEPS]
                label = f"{method}, shift {shift:g}"
                axis.loglog(STEPS, rms, style, color=colours[shift], label=label)
        axis.set_title(f"{problem}: RMS error of the σ=0 endpoint")
        axis.set_xlabel("steps (model evaluations)")
        axis.set_xticks(STEPS, [str(n) for n in STEPS])
        axis.grid(True, which="both", alpha=0.3)
        axis.legend(fontsize=8)
    axes[0][0].set_ylabel("RMS error vs exact ODE endpoint")
    figure.tight_layout()
    atomic_write(path, lambda tmp: figure.savefig(tmp, format="png", dpi=110))
    plt.close(figure)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--samples", type=int, default=4096, help="noise draws per problem")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--rk4-steps", type=int, default=REFERENCE_STEPS)
    parser.add_argument("--plot", type=Path, default=PLOT_PATH, help="where to write the PNG")
    parser.add_argument("--no-plot", action="store_true", help="print the table only")
    args = parser.parse_args()
    # Tensors of a few thousand elements: intra-op threads only add synchronisation cost.
    torch.set_num_threads(1)
    if args.samples < 1 or args.rk4_steps < 2:
        parser.error("--samples must be >= 1 and --rk4-steps >= 2")

    gaussian_ref_error, mixture_ref_change = reference_check(
        args.samples, args.seed, args.rk4_steps
    )
    errors, flips = measure(args.samples, args.seed, args.rk4_steps)
    print("RMS / median of the per-sample endpoint error:\n")
    print(error_table(errors))
    print(f"\nMixture samples (of {args.samples}) ending in another mode than the exact flow:\n")
    print(flip_table(flips))
    print()
    print(
        f"RK4 reference ({args.rk4_steps} steps): max error {gaussian_ref_error:.1e} on the "
        f"Gaussian; max change {mixture_ref_change:.1e} on the mixture "
        f"vs {args.rk4_steps // 2} steps"
    )
    if not args.no_plot:
        plot(errors, args.plot)
        print(f"plot written to {args.plot}")


if __name__ == "__main__":
    main()
