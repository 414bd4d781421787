"""W8A8 quantisation: the int8 maths against a numpy reference, closeness to the float model,
which layers are quantised, the int8 matmul path and its fallback, pipeline and CLI options."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from tiny_text import make_text_components
from torch import nn

from fastsana import quantize as quantize_module
from fastsana.checkpoints.common import CheckpointError
from fastsana.checkpoints.transformer import save_transformer
from fastsana.cli import build_parser, main
from fastsana.configs import DIT_PRESETS, ae_preset
from fastsana.images import read_png_metadata
from fastsana.models.dcae import DCAE
from fastsana.models.dit import SanaTransformer
from fastsana.models.text_encoder import TextEncoder
from fastsana.pipeline import SanaPipeline
from fastsana.quantize import (
    QUANTIZATION_MODES,
    QUANTIZED_BLOCK_LAYERS,
    W8A8Linear,
    int_mm_fits,
    quantize_w8a8,
)

PROMPT = "a red circle"


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def numpy_w8a8(x: np.ndarray, w: np.ndarray, b: np.ndarray | None) -> tuple[np.ndarray, ...]:
    """Independent reference: per-row symmetric int8 of x (tokens) and w (output channels),
    an exact integer matmul, then the rescale. Scales and divisions in float32 like the spec,
    so the integers must agree exactly."""

    def quantise(a: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        scale = np.abs(a).max(axis=1) / np.float32(127)  # float32
        q = np.clip(np.round(a / scale[:, None]), -127, 127).astype(np.int64)
        return q, scale

    qx, sx = quantise(x.astype(np.float32))
    qw, sw = quantise(w.astype(np.float32))
    acc = qx @ qw.T  # exact in int64
    y = acc.astype(np.float64) * sx[:, None].astype(np.float64) * sw[None, :].astype(np.float64)
    if b is not None:
        y = y + b
    return y, qw, sw


# ------------------------------------------------------------------------- W8A8Linear


def test_linear_matches_numpy_reference_and_float_layer() -> None:
    torch.manual_seed(0)
    layer = nn.Linear(256, 96)
    nn.init.normal_(layer.bias, std=0.1)
    x = torch.randn(3, 40, 256)
    q = W8A8Linear.from_float(layer)

    y = q(x)
    ref, qw, sw = numpy_w8a8(
        x.reshape(-1, 256).numpy(), layer.weight.detach().numpy(), layer.bias.detach().numpy()
    )
    assert y.shape == (3, 40, 96) and y.dtype == torch.float32
    np.testing.assert_array_equal(q.qweight.numpy(), qw)  # same integers
    np.testing.assert_allclose(q.weight_scale.numpy(), sw, rtol=0)
    # Only the order of the fp32 rescale differs from the float64 reference.
    np.testing.assert_allclose(y.reshape(-1, 96).numpy(), ref, rtol=1e-5, atol=1e-6)

    # Against the float layer: each operand carries a uniform rounding error of step/√12 with
    # step = max|row|/127 ≈ 2.9σ/127 for 256 gaussians, i.e. ≈0.66% of its RMS; the product
    # has ≈√2·0.66% ≈ 0.9%. 2% bounds it; above 0.1% shows quantisation really happened.
    err = relative_error(y, layer(x))
    assert 1e-3 < err < 0.02, err


def test_zero_rows_and_half_precision_activations() -> None:
    torch.manual_seed(1)
    layer = nn.Linear(64, 32, bias=False)
    with torch.no_grad():
        layer.weight[5] = 0  # an all-zero output channel (e.g. a zero-initialised layer)
    q = W8A8Linear.from_float(layer)
    x = torch.randn(20, 64)
    x[3] = 0  # an all-zero token
    y = q(x)
    assert torch.isfinite(y).all()
    assert (y[3] == 0).all() and (y[:, 5] == 0).all()
    # bf16 activations: quantised in fp32, result returned in bf16.
    y16 = q(x.bfloat16())
    assert y16.dtype == torch.bfloat16
    assert relative_error(y16.float(), layer(x)) < 0.02


def test_conv1x1_conversion_and_bad_layers() -> None:
    torch.manual_seed(2)
    conv = nn.Conv2d(48, 40, 1)
    nn.init.normal_(conv.bias, std=0.1)
    q = W8A8Linear.from_float(conv)
    assert (q.in_features, q.out_features) == (48, 40)

    image = torch.randn(2, 48, 5, 6)
    want = conv(image).permute(0, 2, 3, 1).reshape(2, 30, 40)  # (B, N, C_out)
    tokens = image.permute(0, 2, 3, 1).reshape(2, 30, 48)  # (B, N, C_in)
    assert relative_error(q(tokens), want) < 0.02

    # The same weights as an nn.Linear quantise to the same layer.
    lin = nn.Linear(48, 40)
    with torch.no_grad():
        lin.weight.copy_(conv.weight.flatten(1))
        lin.bias.copy_(conv.bias)
    assert torch.equal(W8A8Linear.from_float(lin)(tokens), q(tokens))

    with pytest.raises(ValueError, match="1×1 Conv2d"):
        W8A8Linear.from_float(nn.Conv2d(8, 8, 3, padding=1))
    with pytest.raises(ValueError, match="groups"):
        W8A8Linear.from_float(nn.Conv2d(8, 8, 1, groups=2))
    with pytest.raises(TypeError, match=r"nn\.Linear or a 1×1 nn\.Conv2d, got Embedding"):
        W8A8Linear.from_float(nn.Embedding(4, 8))
    with pytest.raises(ValueError, match="last dim 48"):
        q(torch.randn(2, 47))


def test_weight_stand_in_keeps_dtype_and_shape() -> None:
    """``weight`` tells code that inspects it (the fp16 clip) the float layer's dtype."""
    q = W8A8Linear.from_float(nn.Linear(16, 8).half())
    assert q.weight.is_meta and q.weight.dtype == torch.float16
    assert tuple(q.weight.shape) == (8, 16)
    assert q.qweight.dtype == torch.int8 and q.weight_scale.dtype == torch.float32
    assert q.bias.dtype == torch.float16
    assert set(dict(q.named_buffers())) == {"qweight", "weight_scale", "bias"}


# ------------------------------------------------------------------------- whole DiT


def random_tiny_dit(seed: int = 0) -> SanaTransformer:
    """sana-tiny with every parameter random (the real init zeroes proj_out and more)."""
    torch.manual_seed(seed)
    model = SanaTransformer(DIT_PRESETS["sana-tiny"].config).eval()
    with torch.no_grad():
        for p in model.parameters():
            # 1/√fan_in keeps activations O(1) through the layers.
            std = p.shape[1] ** -0.5 if p.dim() >= 2 else 0.1
            p.normal_(0.0, std)
    return model


def dit_inputs(model: SanaTransformer, seed: int = 1) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    cfg = model.config
    x = torch.randn(2, cfg.in_channels, 8, 8, generator=g)
    t = torch.tensor([100.0, 700.0])
    text = torch.randn(2, 12, cfg.caption_channels, generator=g)
    mask = torch.ones(2, 12, dtype=torch.bool)
    mask[1, 7:] = False
    return x, t, text, mask


def test_quantized_dit_close_to_float_and_right_layers() -> None:
    model = random_tiny_dit()
    inputs = dit_inputs(model)
    with torch.no_grad():
        want = model(*inputs)
        assert quantize_w8a8(model) is model
        got = model(*inputs)

    # ≈1% per quantised layer (see the layer test); 10 per block, 2 blocks, partly in series
    # and partly averaging out: measured ≈1.5% here; 5% leaves room while still failing
    # when a layer computes something else (a dropped bias or a wrong scale gives >> 5%).
    err = relative_error(got, want)
    assert 1e-3 < err < 0.05, err

    quantized = {name for name, m in model.named_modules() if isinstance(m, W8A8Linear)}
    assert quantized == {
        f"transformer_blocks.{i}.{layer}"
        for i in range(model.config.depth)
        for layer in QUANTIZED_BLOCK_LAYERS
    }
    kept = {name: m for name, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))}
    assert set(kept) == {
        "patch_embed.proj",
        "time_embed.emb.timestep_embedder.linear_1",
        "time_embed.emb.timestep_embedder.linear_2",
        "time_embed.linear",
        "caption_projection.linear_1",
        "caption_projection.linear_2",
        "proj_out",
        *(f"transformer_blocks.{i}.ff.conv_depth" for i in range(model.config.depth)),
    }
    assert all(m.weight.dtype == torch.float32 for m in kept.values())
    assert all(p.dtype == torch.float32 for name, p in model.named_parameters() if "norm" in name)


def test_int8_matmul_runs_and_fallback_agrees(monkeypatch) -> None:
    model = quantize_w8a8(random_tiny_dit(seed=3))
    inputs = dit_inputs(model, seed=4)
    calls = []
    real_int_mm = torch._int_mm

    def counting_int_mm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        calls.append((a.dtype, b.dtype))
        return real_int_mm(a, b)

    monkeypatch.setattr(torch, "_int_mm", counting_int_mm)
    with torch.no_grad():
        int_path = model(*inputs)
    # Every quantised layer of every block ran one int8 × int8 matmul, and nothing else did.
    assert len(calls) == model.config.depth * len(QUANTIZED_BLOCK_LAYERS)
    assert all(c == (torch.int8, torch.int8) for c in calls)

    # Shapes _int_mm does not take: a float matmul of the same integers, same result.
    calls.clear()
    monkeypatch.setattr(quantize_module, "int_mm_fits", lambda *args: False)
    with torch.no_grad():
        fallback = model(*inputs)
    assert not calls
    torch.testing.assert_close(fallback, int_path, rtol=1e-5, atol=1e-5)


def test_int_mm_shape_rules() -> None:
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert int_mm_fits(1, 3, 5, cpu)
    assert int_mm_fits(17, 64, 64, cuda) and not int_mm_fits(16, 64, 64, cuda)
    assert not int_mm_fits(32, 60, 64, cuda) and not int_mm_fits(32, 64, 36, cuda)
    assert not int_mm_fits(32, 64, 64, torch.device("meta"))


def test_quantize_w8a8_bad_input() -> None:
    with pytest.raises(TypeError, match="SanaTransformer, got Linear"):
        quantize_w8a8(nn.Linear(4, 4))  # type: ignore[arg-type]
    model = quantize_w8a8(SanaTransformer(DIT_PRESETS["sana-tiny"].config))
    with pytest.raises(ValueError, match="already quantised"):
        quantize_w8a8(model)


def test_quantised_models_are_not_saved(tmp_path) -> None:
    """Quantisation is a load-time option: a quantised model written as a checkpoint would
    hold int8 buffers no loader reads, so saving refuses it."""
    model = quantize_w8a8(SanaTransformer(DIT_PRESETS["sana-tiny"].config))
    with pytest.raises(CheckpointError, match="quantise after loading"):
        save_transformer(model, tmp_path / "t")
    assert not (tmp_path / "t").exists()


# --------------------------------------------------------------------- pipeline, CLI


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A tiny random pipeline folder (native 256 px), as in test_cli.py."""
    torch.manual_seed(0)
    config = dataclasses.replace(DIT_PRESETS["sana-tiny"].config, caption_channels=32)
    text_model, tokenizer = make_text_components([PROMPT], hidden_size=32)
    pipe = SanaPipeline(
        SanaTransformer(config), DCAE(ae_preset("dc-ae-tiny")), TextEncoder(text_model, tokenizer)
    )
    folder = tmp_path_factory.mktemp("model")
    pipe.save_pretrained(folder)
    return folder


def test_pipeline_quantize_option(model_dir, tmp_path) -> None:
    with pytest.raises(ValueError, match="quantize must be None or one of w8a8, got 'int4'"):
        SanaPipeline.from_pretrained(tmp_path, quantize="int4")
    pipe = SanaPipeline.from_pretrained(model_dir, device="cpu", quantize="w8a8")
    assert isinstance(pipe.transformer.transformer_blocks[0].ff.conv_inverted, W8A8Linear)
    plain = SanaPipeline.from_pretrained(model_dir, device="cpu")
    assert isinstance(plain.transformer.transformer_blocks[0].ff.conv_inverted, nn.Conv2d)


def test_cli_quantize(model_dir, tmp_path, capsys) -> None:
    assert QUANTIZATION_MODES == ("w8a8",)
    args = build_parser().parse_args(["generate", "x", "--quantize", "w8a8"])
    assert args.quantize == "w8a8"
    assert build_parser().parse_args(["generate", "x"]).quantize is None
    with pytest.raises(SystemExit) as exit_:
        main(["generate", "x", "--quantize", "int4"])
    assert exit_.value.code == 2 and "invalid choice: 'int4'" in capsys.readouterr().err

    out = tmp_path / "q.png"
    argv = ["generate", PROMPT, "-o", out, "--model", model_dir, "--steps", "1"]
    status = main([str(a) for a in [*argv, "--seed", "3", "--size", "64x64", "--quantize", "w8a8"]])
    assert status == 0
    assert read_png_metadata(out)["quantize"] == "w8a8"


def test_float_linear_helper_unchanged() -> None:
    """dit.linear still computes float layers itself (the quantised branch is only taken for
    other modules)."""
    from fastsana.models.dit import linear

    torch.manual_seed(5)
    conv = nn.Conv2d(8, 6, 1)
    x = torch.randn(4, 8)
    torch.testing.assert_close(linear(x, conv), F.linear(x, conv.weight[:, :, 0, 0], conv.bias))
    q = W8A8Linear.from_float(conv)
    assert torch.equal(linear(x, q), q(x))
