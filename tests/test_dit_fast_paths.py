"""The DiT's fast paths match its reference paths: fused linear attention, in-place inference,
fp32 compute for half-precision weights, and the runtime choices behind them."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from dit_helpers import dit_inputs, random_dit

import fastsana.models.dit as dit
import fastsana.runtime as runtime
from fastsana.configs import DIT_PRESETS, DiTConfig
from fastsana.models.attention import (
    fused_relu_linear_attention,
    linear_attention,
    relu_linear_attention,
)
from fastsana.models.dit import SanaTransformer
from fastsana.pipeline import SanaPipeline
from fastsana.sampling import (
    TextCondition,
    flow_sigmas,
    guided_model_fn,
    sample,
    truncated_timestep_fn,
)

TINY = DIT_PRESETS["sana-tiny"].config


def _inputs(config: DiTConfig, batch: int = 2, size: tuple[int, int] = (6, 5), seed: int = 0):
    return dit_inputs(config, batch, size, seed)


def _random_model(config: DiTConfig, seed: int = 0) -> SanaTransformer:
    return random_dit(config, seed).eval()


# --------------------------------------------------------------------------- attention


def _quadratic_attention(q, k, v, heads: int):
    """The explicit N×N form of ReLU linear attention (independent of both code paths)."""
    b, n, inner = q.shape
    qh, kh, vh = (a.view(b, n, heads, -1).transpose(1, 2) for a in (q, k, v))
    weights = qh.relu() @ kh.relu().transpose(-1, -2)  # (B, h, N, N)
    out = (weights / (weights.sum(-1, keepdim=True) + 1e-15)) @ vh  # 0/0 → 0
    return out.transpose(1, 2).reshape(b, n, inner)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("batch, n, heads, d", [(1, 7, 2, 4), (3, 16, 3, 8)])
def test_fused_linear_attention_matches_reference(dtype, batch, n, heads, d) -> None:
    g = torch.Generator().manual_seed(n)
    q, k, v = (torch.randn(batch, n, heads * d, generator=g).to(dtype) for _ in range(3))
    q[0, 0] = -1.0  # a query with no positive feature: 0/0 → 0 in every path
    if dtype == torch.float64:  # the reference path accumulates in fp32; compare exactly
        expected, tol = _quadratic_attention(q, k, v, heads), 1e-12
    else:
        expected, tol = relu_linear_attention(q.clone(), k.clone(), v.clone(), heads), 1e-5
    with torch.no_grad():
        got_inplace = linear_attention(q.clone(), k.clone(), v.clone(), heads, inplace=True)
    got = fused_relu_linear_attention(q, k, v, heads)
    assert got.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert got.shape == (batch, n, heads * d) and got.is_contiguous()
    torch.testing.assert_close(got, expected, rtol=tol, atol=tol)
    torch.testing.assert_close(got_inplace, expected, rtol=tol, atol=tol)
    assert torch.equal(got[0, 0], torch.zeros_like(got[0, 0]))


def test_fused_linear_attention_gradients_match_quadratic_form() -> None:
    g = torch.Generator().manual_seed(1)
    leaves = [torch.randn(2, 9, 12, generator=g, dtype=torch.float64) for _ in range(3)]
    grads = []
    for fn in (_quadratic_attention, fused_relu_linear_attention):
        inputs = [t.clone().requires_grad_(True) for t in leaves]
        fn(*inputs, 3).pow(2).sum().backward()
        grads.append([t.grad for t in inputs])
    for ref, got in zip(*grads, strict=True):
        torch.testing.assert_close(got, ref, rtol=1e-10, atol=1e-10)


def test_inplace_attention_is_refused_when_autograd_is_on() -> None:
    q = torch.randn(1, 4, 8)
    with pytest.raises(ValueError, match="inference only"):
        linear_attention(q, q, q, 2, inplace=True)


def test_inplace_attention_overwrites_only_q_and_k() -> None:
    q, k, v = (torch.randn(1, 5, 8) for _ in range(3))
    v_before = v.clone()
    with torch.no_grad():
        linear_attention(q, k, v, 2, inplace=True)
    assert (q >= 0).all() and (k >= 0).all()  # ReLU applied in place
    assert torch.equal(v, v_before)


# ------------------------------------------------------------------------ whole model


@pytest.mark.parametrize(
    "config",
    [
        TINY,
        dataclasses.replace(TINY, qk_norm=True, patch_size=2, interpolation_scale=1.0),
        dataclasses.replace(TINY, self_attention="softmax"),
    ],
    ids=["tiny", "qknorm-patch2-pe", "softmax"],
)
def test_inference_path_equals_autograd_path(config: DiTConfig) -> None:
    """The in-place (no_grad) path and the out-of-place (autograd) path give the same output,
    and neither modifies the caller's inputs."""
    model = _random_model(config)
    x, t, text, mask = _inputs(config, size=(6, 4))
    originals = [a.clone() for a in (x, t, text, mask)]
    with torch.no_grad():
        fast = model(x, t, text, mask)
    x_grad = x.clone().requires_grad_(True)
    slow = model(x_grad, t, text, mask)
    torch.testing.assert_close(fast, slow.detach(), rtol=1e-6, atol=1e-6)
    slow.square().mean().backward()  # the autograd path really is differentiable
    assert x_grad.grad is not None and x_grad.grad.abs().sum() > 0
    for before, after in zip(originals, (x, t, text, mask), strict=True):
        assert torch.equal(before, after)


def test_block_does_not_modify_its_input_under_no_grad() -> None:
    model = _random_model(TINY)
    block = model.transformer_blocks[0]
    x = torch.randn(2, 12, TINY.hidden_size)
    t6 = torch.randn(2, 6 * TINY.hidden_size)
    text = torch.randn(2, 5, TINY.hidden_size)
    before = x.clone()
    with torch.no_grad():
        block(x, t6, text, None, 3, 4)
    assert torch.equal(x, before)


def _force_matmul_dtype(monkeypatch, native: bool) -> None:
    """Decide the runtime's answer, so both CPU paths are tested on any machine."""
    monkeypatch.setattr(
        dit, "matmul_dtype", lambda device, dtype: dtype if native else torch.float32
    )


def test_half_weights_computed_in_fp32_equal_fp32_model_on_rounded_weights(monkeypatch) -> None:
    """Without native bf16 matmuls a bf16 model computes in fp32 from its bf16 weights: the
    result equals an fp32 model holding the same (bf16-rounded) weights."""
    _force_matmul_dtype(monkeypatch, native=False)
    model = _random_model(TINY).to(torch.bfloat16)
    reference = _random_model(TINY)
    reference.load_state_dict({k: v.float() for k, v in model.state_dict().items()})
    x, t, text, mask = _inputs(TINY)
    with torch.no_grad():
        out = model(x, t, text, mask)
        expected = reference(x, t, text, mask)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out, expected.to(torch.bfloat16), rtol=0, atol=0)


def test_native_half_path_stays_close_to_fp32(monkeypatch) -> None:
    _force_matmul_dtype(monkeypatch, native=True)
    model = _random_model(TINY)
    x, t, text, mask = _inputs(TINY)
    with torch.no_grad():
        ref = model(x, t, text, mask)
        out = model.to(torch.bfloat16)(x, t, text, mask)
    assert out.dtype == torch.bfloat16
    assert ((out.float() - ref).abs().max() / ref.abs().max()) < 0.05


def test_fp16_clip_applies_when_fp16_weights_compute_in_fp32() -> None:
    attn = _random_model(TINY).half().transformer_blocks[0].attn1
    with torch.no_grad():
        attn.to_v.weight.fill_(10.0)
        attn.to_out[0].weight.fill_(1000.0)  # far beyond the fp16 range
        out = attn(torch.full((1, 4, TINY.hidden_size), 3.0))  # fp32 activations
    assert out.dtype == torch.float32
    assert out.abs().max() == 65504


def test_gradients_flow_to_half_weights_through_fp32_compute(monkeypatch) -> None:
    _force_matmul_dtype(monkeypatch, native=False)
    model = _random_model(TINY).to(torch.bfloat16).train()
    x, t, text, mask = _inputs(TINY)
    model(x, t, text, mask).float().square().mean().backward()
    w = model.transformer_blocks[0].ff.conv_inverted.weight
    assert w.grad is not None and w.grad.dtype == torch.bfloat16 and w.grad.abs().sum() > 0


# ----------------------------------------------------------------------------- runtime


def test_configure_threads_sets_and_validates() -> None:
    before = torch.get_num_threads()
    try:
        assert runtime.configure_threads(1) == 1 and torch.get_num_threads() == 1
        n = runtime.configure_threads()
        assert n == runtime.physical_cores() == torch.get_num_threads()
        assert 1 <= n <= (torch.multiprocessing.cpu_count() or n)
    finally:
        torch.set_num_threads(before)
    with pytest.raises(ValueError, match="num_threads must be a positive int"):
        runtime.configure_threads(0)


@pytest.mark.parametrize(
    "avx512, amx, expected",
    [(False, False, torch.float32), (True, False, torch.bfloat16), (False, True, torch.bfloat16)],
)
def test_matmul_dtype_follows_cpu_features(monkeypatch, avx512, amx, expected) -> None:
    runtime._cpu_has_fast_half.cache_clear()
    monkeypatch.setattr(torch.cpu, "_is_avx512_supported", lambda: avx512)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
    try:
        cpu = torch.device("cpu")
        assert runtime.matmul_dtype(cpu, torch.bfloat16) == expected
        assert runtime.matmul_dtype(cpu, torch.float32) == torch.float32
        assert runtime.matmul_dtype(torch.device("cuda"), torch.bfloat16) == torch.bfloat16
    finally:
        runtime._cpu_has_fast_half.cache_clear()


@pytest.mark.parametrize("qk_norm", [False, True])
def test_prepared_text_context_gives_the_same_output(qk_norm: bool) -> None:
    """model(x, t, prepare_text(text, mask)) is model(x, t, text, mask) with the caption's
    projection and K/V done once (what samplers reuse across steps)."""
    config = dataclasses.replace(TINY, qk_norm=qk_norm)
    model = _random_model(config)
    x, t, text, mask = dit_inputs(config)
    with torch.no_grad():
        context = model.prepare_text(text, mask)
        assert len(context.kv) == config.depth and context.batch == x.shape[0]
        assert torch.equal(model(x, t, context), model(x, t, text, mask))
        other = model.prepare_text(text.flip(0), mask.flip(0))  # a different caption differs
        assert not torch.allclose(model(x, t, other), model(x, t, context))
    with pytest.raises(ValueError, match="text_mask must be None"):
        model(x, t, context, mask)
    with pytest.raises(ValueError, match="TextContext has batch 2"):
        model(x[:1], t[:1], context)


def test_pipeline_projects_the_caption_once_per_image(monkeypatch) -> None:
    calls = []
    original = SanaTransformer.prepare_text
    monkeypatch.setattr(
        SanaTransformer, "prepare_text", lambda self, *a: calls.append(1) or original(self, *a)
    )
    model = _random_model(TINY)
    pipe = SanaPipeline.__new__(SanaPipeline)  # only the transformer is needed here
    pipe.transformer = model
    pipe.cuda_graphs = False  # a CPU test: the eager path either way
    sigmas = flow_sigmas(5, 3.0)
    x, _, text, mask = dit_inputs(TINY)
    cond, uncond = TextCondition(text, mask), TextCondition(text.flip(0), mask.flip(0))
    fn = guided_model_fn(pipe._denoiser(truncated_timestep_fn(sigmas)), cond, uncond, 4.5)
    with torch.no_grad():
        sample("flow_dpm", fn, x, sigmas, progress=False)
    assert len(calls) == 1  # 5 steps, 5 model calls, one projection
