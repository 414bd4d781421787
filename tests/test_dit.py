"""Behaviour of our Linear DiT beyond parity: gradients, precision, errors, save/load."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from dit_helpers import dit_inputs, random_dit

from fastsana import CheckpointError, load_transformer, save_transformer
from fastsana.configs import DIT_PRESETS, DiTConfig, dit_preset
from fastsana.models.attention import relu_linear_attention
from fastsana.models.dit import SanaTransformer

TINY = DIT_PRESETS["sana-tiny"].config


def test_linear_attention_matches_quadratic_form() -> None:
    """(φ(K)ᵀV) computed first equals the explicit N×N form with ReLU kernels."""
    g = torch.Generator().manual_seed(0)
    b, n, heads, d = 2, 10, 3, 4
    q, k, v = (torch.randn(b, n, heads * d, generator=g, dtype=torch.float64) for _ in range(3))
    out = relu_linear_attention(q, k, v, heads)
    qh = q.view(b, n, heads, d).transpose(1, 2).relu()
    kh = k.view(b, n, heads, d).transpose(1, 2).relu()
    vh = v.view(b, n, heads, d).transpose(1, 2)
    weights = qh @ kh.transpose(-1, -2)  # (b, h, n, n)
    expected = (weights / (weights.sum(-1, keepdim=True) + 1e-15)) @ vh  # 0/0 → 0
    expected = expected.transpose(1, 2).reshape(b, n, heads * d)
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-6)


def test_output_shape_and_any_size() -> None:
    model = random_dit(TINY)
    for size in [(8, 8), (3, 11), (1, 1)]:
        x, t, text, mask = dit_inputs(TINY, size=size)
        assert model(x, t, text, mask).shape == x.shape


def test_scalar_timestep_broadcasts() -> None:
    model = random_dit(TINY).eval()
    x, _, text, mask = dit_inputs(TINY)
    with torch.no_grad():
        a = model(x, 500.0, text, mask)
        b = model(x, torch.tensor([500.0, 500.0]), text, mask)
    torch.testing.assert_close(a, b)


def test_padding_tokens_are_ignored() -> None:
    """Changing text at masked positions must not change the output."""
    model = random_dit(TINY).eval()
    x, t, text, mask = dit_inputs(TINY)
    text2 = text.clone()
    text2[0, 3:] = torch.randn_like(text2[0, 3:]) * 10
    with torch.no_grad():
        torch.testing.assert_close(model(x, t, text, mask), model(x, t, text2, mask))
        assert not torch.allclose(model(x, t, text, mask), model(x, t, text2, None))


def test_gradients_reach_every_parameter() -> None:
    for config in (
        TINY,
        dataclasses.replace(
            TINY, qk_norm=True, guidance_embeds=True, interpolation_scale=1.0, patch_size=2
        ),
    ):
        model = random_dit(config)
        x, t, text, mask = dit_inputs(config, size=(8, 6))
        guidance = torch.full((2,), 3.0) if config.guidance_embeds else None
        model(x, t, text, mask, guidance=guidance).square().mean().backward()
        dead = [n for n, p in model.named_parameters() if p.grad is None or p.grad.abs().sum() == 0]
        assert not dead, f"no gradient reaches {dead}"


def test_training_init_starts_at_zero_velocity_and_learns() -> None:
    """The documented init: zero output projection (v = 0) and caption scale 0.01."""
    torch.manual_seed(0)
    model = SanaTransformer(TINY)
    x, t, text, mask = dit_inputs(TINY)
    assert model(x, t, text, mask).abs().max() == 0
    assert torch.all(model.caption_norm.weight == 0.01)
    out = model(x, t, text, mask)
    (out - torch.randn_like(out)).square().mean().backward()
    assert model.proj_out.weight.grad.abs().sum() > 0


def test_gradient_checkpointing_gives_same_gradients() -> None:
    grads = []
    for flag in (False, True):
        model = random_dit(TINY, seed=3)
        model.enable_gradient_checkpointing(flag)
        x, t, text, mask = dit_inputs(TINY)
        model(x, t, text, mask).square().mean().backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    torch.testing.assert_close(grads[0], grads[1])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_forward_is_finite_and_close(dtype: torch.dtype) -> None:
    model = random_dit(TINY).eval()
    x, t, text, mask = dit_inputs(TINY)
    with torch.no_grad():
        ref = model(x, t, text, mask)
        out = model.to(dtype)(x, t, text, mask)
    assert out.dtype == dtype
    assert torch.isfinite(out).all()
    assert ((out.float() - ref).abs().max() / ref.abs().max()) < 0.05


def test_fp16_self_attention_output_is_clipped() -> None:
    model = random_dit(TINY).eval().half()
    attn = model.transformer_blocks[0].attn1
    with torch.no_grad():
        attn.to_v.weight.fill_(10.0)  # v ≈ 1920 per channel
        attn.to_out[0].weight.fill_(1000.0)  # 64 · 1000 · 1920 overflows fp16
        out = attn(torch.full((1, 4, TINY.hidden_size), 3.0, dtype=torch.float16))
    assert torch.isfinite(out).all() and out.abs().max() == 65504


def test_softmax_ablation_runs() -> None:
    config = dataclasses.replace(TINY, self_attention="softmax")
    model = random_dit(config)
    x, t, text, mask = dit_inputs(config)
    assert model(x, t, text, mask).shape == x.shape


def test_save_load_round_trip_is_exact(tmp_path) -> None:
    config = dataclasses.replace(TINY, qk_norm=True, interpolation_scale=2.0)
    model = random_dit(config).eval()
    save_transformer(model, tmp_path / "t")
    loaded = load_transformer(tmp_path / "t")
    assert loaded.config == config
    for (k1, v1), (k2, v2) in zip(
        model.state_dict().items(), loaded.state_dict().items(), strict=True
    ):
        assert k1 == k2 and torch.equal(v1, v2)
    x, t, text, mask = dit_inputs(config)
    with torch.no_grad():
        assert torch.equal(model(x, t, text, mask), loaded(x, t, text, mask))


def test_sharded_save_and_dtype_conversion(tmp_path) -> None:
    model = random_dit(TINY)
    save_transformer(model, tmp_path / "t", max_shard_size="200KB")
    assert (tmp_path / "t" / "diffusion_pytorch_model.safetensors.index.json").is_file()
    loaded = load_transformer(tmp_path / "t", dtype=torch.bfloat16)
    assert loaded.dtype == torch.bfloat16
    assert not any(p.is_meta for p in loaded.parameters())
    save_transformer(model, tmp_path / "single")  # switching back to one file drops the index
    assert not (tmp_path / "single" / "diffusion_pytorch_model.safetensors.index.json").exists()


def test_mismatched_checkpoint_lists_bad_keys(tmp_path) -> None:
    save_transformer(random_dit(TINY), tmp_path / "t")
    wider = dataclasses.replace(TINY, hidden_size=96, num_heads=3)
    with pytest.raises(CheckpointError) as err:
        load_transformer(tmp_path / "t", config=wider)
    message = str(err.value)
    assert "wrong shapes" in message and "patch_embed.proj.weight" in message
    deeper = dataclasses.replace(TINY, depth=3)
    with pytest.raises(CheckpointError, match=r"missing keys \(\d+\):\n    transformer_blocks\.2"):
        load_transformer(tmp_path / "t", config=deeper)
    with pytest.raises(CheckpointError, match="unexpected keys"):
        load_transformer(tmp_path / "t", config=dataclasses.replace(TINY, depth=1))


def test_missing_files_give_clear_errors(tmp_path) -> None:
    with pytest.raises(CheckpointError, match="not found"):
        load_transformer(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="no weights"):
        load_transformer(tmp_path / "empty")
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="weights-only"):
        load_transformer(bad)


def test_pickled_code_is_refused(tmp_path) -> None:
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    path = tmp_path / "evil.pth"
    torch.save({"state_dict": {"x": Evil()}}, path)
    with pytest.raises(CheckpointError):
        load_transformer(path)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(x=torch.randn(1, 31, 4, 4)), "x must have shape"),
        (dict(text=torch.randn(1, 5, 7)), "text must have shape"),
        (dict(text_mask=torch.ones(1, 4)), "text_mask must have shape"),
    ],
)
def test_bad_inputs_raise_clear_errors(kwargs: dict, message: str) -> None:
    model = random_dit(TINY)
    args = dict(
        x=torch.randn(1, 32, 4, 4),
        t=torch.tensor([1.0]),
        text=torch.randn(1, 5, 64),
        text_mask=torch.ones(1, 5),
    )
    args.update(kwargs)
    with pytest.raises(ValueError, match=message):
        model(**args)


def test_odd_size_with_patch_2_is_rejected() -> None:
    config = dataclasses.replace(TINY, patch_size=2)
    x, t, text, mask = dit_inputs(config, size=(7, 8))
    with pytest.raises(ValueError, match="divisible by the patch size 2"):
        SanaTransformer(config)(x, t, text, mask)


def test_guidance_model_requires_guidance() -> None:
    config = dataclasses.replace(TINY, guidance_embeds=True)
    x, t, text, mask = dit_inputs(config)
    with pytest.raises(ValueError, match="guidance"):
        SanaTransformer(config)(x, t, text, mask)


def test_config_validation_and_presets() -> None:
    with pytest.raises(ValueError, match="num_heads \\* head_dim"):
        DiTConfig(hidden_size=100)
    with pytest.raises(ValueError, match="depth must be a positive int"):
        DiTConfig(depth=0)
    with pytest.raises(ValueError, match="unknown DiT preset 'nope'; choose one of"):
        dit_preset("nope")


def test_precision_variant_files_are_found(tmp_path) -> None:
    """Official folders may hold only `diffusion_pytorch_model.bf16.safetensors`."""
    model = random_dit(TINY)
    save_transformer(model, tmp_path / "t", dtype=torch.bfloat16)
    folder = tmp_path / "t"
    (folder / "diffusion_pytorch_model.safetensors").rename(
        folder / "diffusion_pytorch_model.bf16.safetensors"
    )
    loaded = load_transformer(folder)
    assert loaded.dtype == torch.bfloat16
    assert torch.equal(loaded.proj_out.weight, model.proj_out.weight.to(torch.bfloat16))
    save_transformer(model, tmp_path / "t2")
    (tmp_path / "t2" / "diffusion_pytorch_model.safetensors").rename(
        folder / "diffusion_pytorch_model.fp16.safetensors"
    )
    with pytest.raises(CheckpointError, match=r"several precision variants \['bf16', 'fp16'\]"):
        load_transformer(folder)
