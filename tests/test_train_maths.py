"""The maths of training: σ sampling, noising, loss, caption dropout, LR schedule, EMA,
gradient clipping, SSIM, optimizers."""

import math

import numpy as np
import pytest
import torch
from torch import nn
from train_helpers import one_thread  # noqa: F401 (autouse fixture)

from fastsana.training.ae_losses import (
    PatchDiscriminator,
    gaussian_window,
    reconstruction_loss,
    ssim,
)
from fastsana.training.config import EMAConfig, ObjectiveConfig, OptimizerConfig, ScheduleConfig
from fastsana.training.ema import EMA
from fastsana.training.objectives import (
    draw_flow_inputs,
    drop_captions,
    flow_matching_loss,
    noisy_latents,
)
from fastsana.training.optim import build_optimizer, lr_factor
from fastsana.training.parts import Part, autocast_enabled

KEYS = [f"img{i:05d}.png" for i in range(3000)]


def draws(keys=KEYS, **kwargs):
    args = {"seed": 0, "step": 3, "flow_shift": 1.0, "caption_dropout": 0.1} | kwargs
    return draw_flow_inputs(keys, (2, 1, 1), **args)


@pytest.fixture(scope="module")
def plain():
    return draws()


def test_sigmas_are_logit_normal(plain):
    logits = torch.logit(plain.sigmas.double())
    assert abs(logits.mean().item()) < 0.07
    assert abs(logits.std().item() - 1.0) < 0.05
    shifted = torch.logit(draws(logit_mean=0.5, logit_std=2.0).sigmas.double())
    assert abs(shifted.mean().item() - 0.5) < 0.1 and abs(shifted.std().item() - 2.0) < 0.1


def test_flow_shift_moves_sigma_toward_noise(plain):
    # The median of sigmoid(N(0, 1)) is 1/2; the shift maps it to s·½ / (1 + (s−1)·½).
    shifted = draws(flow_shift=3.0).sigmas
    assert plain.sigmas.median().item() == pytest.approx(0.5, abs=0.02)
    assert shifted.median().item() == pytest.approx(0.75, abs=0.02)
    assert torch.allclose(shifted, 3 * plain.sigmas / (1 + 2 * plain.sigmas), atol=1e-6)


def test_high_sigma_band_takes_its_fraction_and_leaves_the_rest(plain):
    mixed = draws(high_sigma_fraction=0.25, high_sigma_min=0.9)
    moved = mixed.sigmas != plain.sigmas  # a logit-normal draw is never exactly a band draw
    assert abs(moved.float().mean().item() - 0.25) < 0.024  # 3 standard errors
    band = mixed.sigmas[moved]
    assert band.min().item() >= 0.9 and band.max().item() < 1.0
    assert band.mean().item() == pytest.approx(0.95, abs=0.005)  # uniform on [0.9, 1)
    # The other draws are untouched: same noise, caption drops and σ outside the band.
    assert torch.equal(mixed.noise, plain.noise)
    assert torch.equal(mixed.drop_caption, plain.drop_caption)
    assert torch.equal(mixed.sigmas[~moved], plain.sigmas[~moved])
    assert bool((draws(KEYS[:200], high_sigma_fraction=1.0).sigmas >= 0.95).all())


def test_objective_config_checks_the_band():
    with pytest.raises(ValueError, match=r"objective\.high_sigma_fraction must be in"):
        ObjectiveConfig(high_sigma_fraction=1.5)
    with pytest.raises(ValueError, match=r"objective\.high_sigma_min must be in \[0, 1\)"):
        ObjectiveConfig(high_sigma_min=1.0)


def test_draws_are_per_sample_and_reproducible(plain):
    a = draw_flow_inputs(["x", "y"], (4, 2, 2), seed=1, step=5, flow_shift=3.0)
    b = draw_flow_inputs(["y"], (4, 2, 2), seed=1, step=5, flow_shift=3.0)
    assert torch.equal(a.noise[1], b.noise[0]) and a.sigmas[1] == b.sigmas[0]
    c = draw_flow_inputs(["y"], (4, 2, 2), seed=1, step=6, flow_shift=3.0)
    d = draw_flow_inputs(["y"], (4, 2, 2), seed=1, step=5, batch_index=1, flow_shift=3.0)
    assert not torch.equal(b.noise, c.noise) and not torch.equal(b.noise, d.noise)
    noise = plain.noise  # 6000 values: standard errors ≈ 0.013 (mean), 0.009 (std)
    assert abs(noise.mean().item()) < 0.05 and abs(noise.std().item() - 1) < 0.04


def test_noising_target_and_loss():
    torch.manual_seed(0)
    x0 = torch.randn(3, 4, 2, 2)
    d = draw_flow_inputs(["a", "b", "c"], (4, 2, 2), seed=0, step=0, flow_shift=3.0)
    seen = {}

    class Recorder(nn.Module):
        def forward(self, x, t, text, mask):
            seen.update(x=x, t=t)
            return torch.ones_like(x)

    loss = flow_matching_loss(Recorder(), x0, torch.zeros(3, 1, 8), torch.ones(3, 1), d)
    s = d.sigmas.view(-1, 1, 1, 1)
    assert torch.allclose(seen["x"], (1 - s) * x0 + s * d.noise)
    assert torch.allclose(seen["t"], d.sigmas * 1000)
    expected = ((1 - (d.noise - x0)) ** 2).mean()  # v̂ = 1, target ε − x0
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
    # At σ = 1 the input is pure noise, at σ = 0 the clean latent.
    ends = noisy_latents(x0[:2], d.noise[:2], torch.tensor([0.0, 1.0]))
    assert torch.equal(ends[0], x0[0]) and torch.equal(ends[1], d.noise[1])


def test_caption_dropout_rate_and_replacement(plain):
    assert abs(plain.drop_caption.float().mean().item() - 0.1) < 0.017  # 3 standard errors
    assert not draws(KEYS[:200], caption_dropout=0.0).drop_caption.any()
    assert draws(KEYS[:200], caption_dropout=1.0).drop_caption.all()

    text, mask = torch.randn(3, 5, 8), torch.tensor([[1, 1, 1, 0, 0]] * 3)
    null_text, null_mask = torch.randn(1, 2, 8), torch.tensor([[1, 0]])
    drop = torch.tensor([False, True, False])
    out_text, out_mask = drop_captions(text, mask, null_text, null_mask, drop)
    assert torch.equal(out_text[0], text[0]) and torch.equal(out_mask[2], mask[2])
    assert torch.equal(out_text[1, :2], null_text[0]) and not out_text[1, 2:].any()
    assert out_mask[1].tolist() == [1, 0, 0, 0, 0]
    # A null caption longer than the batch's captions cannot be cut without losing tokens.
    with pytest.raises(ValueError, match="null caption has 3 tokens"):
        drop_captions(
            text[:, :2], mask[:, :2], torch.randn(1, 4, 8), torch.tensor([[1, 1, 1, 0]]), drop
        )


def test_learning_rate_schedule():
    warm = ScheduleConfig(max_steps=100, warmup_steps=10)
    assert [lr_factor(t, warm) for t in (0, 4, 9, 10, 99)] == [0.1, 0.5, 1.0, 1.0, 1.0]
    cos = ScheduleConfig(max_steps=110, warmup_steps=10, decay="cosine", min_lr_ratio=0.1)
    assert lr_factor(10, cos) == pytest.approx(1.0)
    assert lr_factor(60, cos) == pytest.approx(0.1 + 0.9 * 0.5)  # half-way: cos(π/2) = 0
    assert lr_factor(110, cos) == pytest.approx(0.1)
    assert lr_factor(35, cos) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi / 4)))


def test_ema_follows_its_formula():
    p = {"w": torch.tensor([0.0, 10.0])}
    ema = EMA(p, decay=0.99, warmup=True)
    expected = p["w"].double().clone()
    for step in range(30):
        p["w"] = p["w"] + 1.0
        ema.update(p, step)
        d = min(0.99, (1 + step) / (10 + step))
        expected = d * expected + (1 - d) * p["w"].double()
    assert torch.allclose(ema.shadow["w"].double(), expected, atol=1e-5)
    plain = EMA({"w": torch.zeros(1)}, decay=0.9, warmup=False)
    plain.update({"w": torch.ones(1)}, 0)
    assert plain.shadow["w"].item() == pytest.approx(0.1)


def make_part(grad_clip, lr=1e-3):
    model = nn.Linear(3, 2, bias=False)
    part = Part(
        "model", model, model, OptimizerConfig(lr=lr, grad_clip=grad_clip), EMAConfig(decay=0.5)
    )
    return model, part


def test_gradient_clipping_and_norm():
    model, part = make_part(grad_clip=0.1)
    model.weight.grad = torch.full((2, 3), 2.0)  # norm = 2·√6
    seen = {}
    part.optimizer.step = lambda: seen.setdefault("grad", model.weight.grad.clone())
    norm = part.step(0, ScheduleConfig(max_steps=10))
    assert norm == pytest.approx(2 * math.sqrt(6), rel=1e-6)
    assert seen["grad"].norm().item() == pytest.approx(0.1, rel=1e-4)
    assert model.weight.grad is None  # zeroed for the next step


def test_non_finite_gradient_skips_the_update():
    model, part = make_part(grad_clip=1.0)
    before = model.weight.detach().clone()
    model.weight.grad = torch.full((2, 3), float("nan"))
    assert math.isnan(part.step(0, ScheduleConfig(max_steps=10)))
    assert torch.equal(model.weight, before) and part.skipped_steps == 1


def test_learning_rate_reaches_the_optimizer():
    model, part = make_part(grad_clip=0.0, lr=0.5)
    model.weight.grad = torch.ones(2, 3)
    part.step(1, ScheduleConfig(max_steps=10, warmup_steps=4))
    assert part.optimizer.param_groups[0]["lr"] == pytest.approx(0.5 * 2 / 4)


def test_optimizers():
    from pytorch_optimizer import CAME

    params = [nn.Parameter(torch.randn(4, 4))]
    came = build_optimizer(params, OptimizerConfig(name="came", lr=1e-4))
    assert isinstance(came, CAME)
    group = came.param_groups[0]
    assert group["betas"] == (0.9, 0.999, 0.9999) and (group["eps1"], group["eps2"]) == (
        1e-30,
        1e-16,
    )
    adamw = build_optimizer(params, OptimizerConfig(betas=[0.8, 0.9], weight_decay=0.01))
    assert isinstance(adamw, torch.optim.AdamW) and adamw.param_groups[0]["betas"] == (0.8, 0.9)
    with pytest.raises(ValueError, match="no trainable parameter"):
        build_optimizer([nn.Parameter(torch.ones(1), requires_grad=False)], OptimizerConfig())


def reference_ssim(x, y):
    """SSIM straight from its definition, window by window, in numpy float64."""
    w = gaussian_window().numpy()
    size = w.shape[0]
    c1, c2 = 0.01**2, 0.03**2
    values = []
    for channel in range(x.shape[0]):
        a, b = (x[channel] + 1) / 2, (y[channel] + 1) / 2
        for i in range(a.shape[0] - size + 1):
            for j in range(a.shape[1] - size + 1):
                pa, pb = a[i : i + size, j : j + size], b[i : i + size, j : j + size]
                mu_a, mu_b = (w * pa).sum(), (w * pb).sum()
                var_a = (w * (pa - mu_a) ** 2).sum()
                var_b = (w * (pb - mu_b) ** 2).sum()
                cov = (w * (pa - mu_a) * (pb - mu_b)).sum()
                values.append(
                    (2 * mu_a * mu_b + c1)
                    * (2 * cov + c2)
                    / ((mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2))
                )
    return float(np.mean(values))


def test_ssim_matches_its_definition():
    torch.manual_seed(0)
    x = torch.rand(1, 2, 14, 15) * 2 - 1
    y = (x + 0.3 * torch.randn_like(x)).clamp(-1, 1)
    assert ssim(x, x).item() == pytest.approx(1.0, abs=1e-6)
    expected = reference_ssim(x[0].double().numpy(), y[0].double().numpy())
    assert ssim(x, y).item() == pytest.approx(expected, abs=1e-5)
    with pytest.raises(ValueError, match="at least 11 pixels"):
        ssim(x[..., :8, :8], y[..., :8, :8])


def test_patch_discriminator_shape():
    logits = PatchDiscriminator(3, 8, 3)(torch.randn(2, 3, 64, 64))
    assert logits.shape == (2, 1, 6, 6)


def test_reconstruction_loss_weights_its_terms():
    torch.manual_seed(0)
    x, recon = torch.rand(2, 3, 16, 16) * 2 - 1, torch.rand(2, 3, 16, 16) * 2 - 1
    l1 = np.abs((recon - x).numpy()).mean()
    mse = np.square((recon - x).numpy()).mean()
    loss, parts = reconstruction_loss(x, recon, l1_weight=0.5, ssim_weight=0.0, mse_weight=2.0)
    assert math.isclose(loss.item(), 0.5 * l1 + 2.0 * mse, rel_tol=1e-5)
    assert math.isclose(parts["mse"], mse, rel_tol=1e-5) and "ssim" not in parts
    loss, parts = reconstruction_loss(x, recon, l1_weight=0.0, ssim_weight=1.0)
    assert math.isclose(loss.item(), 1 - ssim(recon, x).item(), rel_tol=1e-5)
    assert "mse" not in parts


def test_auto_precision_follows_the_hardware(monkeypatch):
    from fastsana import runtime

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert autocast_enabled(cpu, "bf16") and not autocast_enabled(cpu, "fp32")
    assert autocast_enabled(cuda, "auto")  # GPUs multiply bf16 natively
    for native in (True, False):
        monkeypatch.setattr(runtime, "_cpu_has_fast_half", lambda dtype, n=native: n)
        assert autocast_enabled(cpu, "auto") is native
