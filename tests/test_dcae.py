"""DC-AE: parity with diffusers' AutoencoderDC (random weights), checkpoints, errors.

Parity cases build the diffusers model from explicit diffusers kwargs, save it with
``save_pretrained`` and load the folder with our ``load_autoencoder``, so the config mapping is
checked against diffusers' own config.json, not against itself.
"""

from __future__ import annotations

import json
import re

import pytest
import torch
from diffusers import AutoencoderDC
from safetensors.torch import save_file

from fastsana.checkpoints.autoencoder import (
    config_from_diffusers,
    config_to_diffusers,
    load_autoencoder,
    save_autoencoder,
)
from fastsana.checkpoints.common import CheckpointError
from fastsana.configs import AE_PRESETS, AutoencoderConfig, ae_preset, replace
from fastsana.models.dcae import DCAE

RES, EVIT = "ResBlock", "EfficientViTBlock"

# Small diffusers configs (4 stages, f = 8) covering every architectural option.
CASES = {
    # SANA's layout: strided-conv down, interpolate up, multi-scale (5,) attention.
    "sana-like": dict(
        latent_channels=8,
        attention_head_dim=8,
        encoder_block_types=[RES, RES, EVIT, EVIT],
        decoder_block_types=[RES, RES, EVIT, EVIT],
        encoder_block_out_channels=[8, 16, 32, 32],
        decoder_block_out_channels=[8, 16, 32, 32],
        encoder_layers_per_block=[1, 1, 1, 2],
        decoder_layers_per_block=[1, 2, 1, 1],
        encoder_qkv_multiscales=[[], [], [5], [5]],
        decoder_qkv_multiscales=[[], [], [5], [5]],
        downsample_block_type="Conv",
        upsample_block_type="interpolate",
        scaling_factor=0.5,
    ),
    # The ImageNet DC-AE layout: no full-resolution stage, pixel (un)shuffle, BatchNorm + ReLU
    # decoder stages; plus two attention scales, different encoder/decoder widths, SiLU head.
    "imagenet-like": dict(
        latent_channels=16,
        attention_head_dim=8,
        encoder_block_types=RES,
        decoder_block_types=[RES, RES, EVIT, EVIT],
        encoder_block_out_channels=[8, 16, 32, 64],
        decoder_block_out_channels=[8, 16, 32, 32],
        encoder_layers_per_block=[0, 2, 1, 1],
        decoder_layers_per_block=[0, 1, 2, 1],
        encoder_qkv_multiscales=[[], [], [], []],
        decoder_qkv_multiscales=[[], [], [3, 5], []],
        downsample_block_type="pixel_unshuffle",
        upsample_block_type="pixel_shuffle",
        decoder_norm_types=["batch_norm", "batch_norm", "rms_norm", "batch_norm"],
        decoder_act_fns=["relu", "relu", "silu", "silu"],
        decoder_conv_act_fn="silu",
    ),
    # No latent shortcuts, attention in the encoder, no multi-scale branch.
    "no-shortcuts": dict(
        latent_channels=4,
        attention_head_dim=16,
        encoder_block_types=[RES, EVIT, EVIT],
        decoder_block_types=[RES, RES, EVIT],
        encoder_block_out_channels=[8, 16, 32],
        decoder_block_out_channels=[16, 16, 32],
        encoder_layers_per_block=[1, 1, 1],
        decoder_layers_per_block=[1, 1, 1],
        encoder_qkv_multiscales=[[], [], []],
        decoder_qkv_multiscales=[[], [], [3]],
        downsample_block_type="conv",
        upsample_block_type="interpolate",
        encoder_out_shortcut=False,
        decoder_in_shortcut=False,
    ),
}
# (batch, H, W): non-square, batch > 1; 16×24 makes the last stage 2×3 = 6 pixels, which is
# ≤ head_dim, so diffusers switches to its quadratic attention form there.
SIZES = {
    "sana-like": [(2, 32, 64), (1, 16, 24)],
    "imagenet-like": [(2, 48, 80), (1, 16, 24)],
    "no-shortcuts": [(3, 36, 20)],
}


def _diffusers_model(kwargs: dict, seed: int = 0) -> AutoencoderDC:
    """A diffusers model with every parameter and norm statistic made non-trivial."""
    torch.manual_seed(seed)
    model = AutoencoderDC(**kwargs)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.1)
        for name, b in model.named_buffers():
            if name.endswith("running_mean"):
                b.copy_(torch.randn(b.shape, generator=g) * 0.1)
            elif name.endswith("running_var"):
                b.copy_(torch.rand(b.shape, generator=g) + 0.5)
    return model.eval()


def _assert_close(ours: torch.Tensor, ref: torch.Tensor, what: str) -> None:
    assert ours.shape == ref.shape, f"{what}: shape {tuple(ours.shape)} vs {tuple(ref.shape)}"
    err = (ours - ref).abs().max().item()
    scale = ref.abs().max().item()
    assert err <= 1e-4 * scale, f"{what}: max abs error {err:.3g} > 1e-4 * {scale:.3g}"


@pytest.fixture(scope="module")
def saved_cases(tmp_path_factory) -> dict:
    """Each case's diffusers model, saved once with save_pretrained."""
    out = {}
    for name, kwargs in CASES.items():
        folder = tmp_path_factory.mktemp(name)
        ref = _diffusers_model(kwargs)
        ref.save_pretrained(folder)
        out[name] = (ref, folder)
    return out


@pytest.mark.parametrize("name", list(CASES))
def test_parity_with_diffusers(name: str, saved_cases) -> None:
    ref, folder = saved_cases[name]
    ours = load_autoencoder(folder)
    assert ours.scaling_factor == ref.config.scaling_factor
    assert ours.spatial_compression == ref.spatial_compression_ratio
    for batch, h, w in SIZES[name]:
        x = torch.rand(batch, 3, h, w, generator=torch.Generator().manual_seed(h)) * 2 - 1
        with torch.no_grad():
            z_ref = ref.encode(x).latent
            z = ours.encode(x, tiled=False)
            _assert_close(z, z_ref, f"{name} encode {h}x{w}")
            _assert_close(
                ours.decode(z_ref, tiled=False), ref.decode(z_ref).sample, f"{name} decode {h}x{w}"
            )


def test_parameter_count_of_sana_preset_matches_diffusers() -> None:
    """Full dc-ae-f32c32-sana config, both built on the meta device (no memory, no time)."""
    with torch.device("meta"):
        ref = AutoencoderDC(
            encoder_block_types=(RES, RES, RES, EVIT, EVIT, EVIT),
            decoder_block_types=(RES, RES, RES, EVIT, EVIT, EVIT),
            encoder_layers_per_block=(2, 2, 2, 3, 3, 3),
            decoder_layers_per_block=(3, 3, 3, 3, 3, 3),
            downsample_block_type="Conv",
            upsample_block_type="interpolate",
            scaling_factor=0.41407,
        )
        ours = DCAE(ae_preset("dc-ae-f32c32-sana-1.0"))
    count = sum(p.numel() for p in ours.parameters())
    assert count == sum(p.numel() for p in ref.parameters())
    assert count == 312_250_275  # the published size (sana-facts.md section 2)
    assert {k: v.shape for k, v in ours.state_dict().items()} == {
        k: v.shape for k, v in ref.state_dict().items()
    }
    assert config_from_diffusers(dict(ref.config)) == ae_preset("dc-ae-f32c32-sana-1.1")


@pytest.mark.parametrize("name", list(AE_PRESETS))
def test_every_preset_has_diffusers_layout(name: str) -> None:
    cfg = ae_preset(name)
    kwargs = {k: v for k, v in config_to_diffusers(cfg).items() if not k.startswith("_")}
    with torch.device("meta"):
        ref = AutoencoderDC(**kwargs)
        ours = DCAE(cfg)
    assert {k: v.shape for k, v in ours.state_dict().items()} == {
        k: v.shape for k, v in ref.state_dict().items()
    }
    assert config_from_diffusers(dict(ref.config)) == cfg


def test_diffusers_defaults_when_config_keys_are_missing() -> None:
    with torch.device("meta"):
        ref = AutoencoderDC()  # diffusers' own defaults
        ours = DCAE(config_from_diffusers({"_class_name": "AutoencoderDC"}))
    assert {k: v.shape for k, v in ours.state_dict().items()} == {
        k: v.shape for k, v in ref.state_dict().items()
    }


# --- original (mit-han-lab) format ----------------------------------------------------------
# An independent diffusers → efficientvit renaming, written from efficientvit's module tree:
# ConvLayer = (.conv, .norm), ResidualBlock = (.main, shortcut), OpSequential = .op_list.


def _to_original(state: dict, kwargs: dict) -> dict:
    unshuffle = kwargs.get("downsample_block_type") == "pixel_unshuffle"
    enc_depth0 = kwargs["encoder_layers_per_block"][0]
    dec_depth0 = kwargs["decoder_layers_per_block"][0]
    out_main = ".main" if kwargs.get("encoder_out_shortcut", True) else ""
    in_main = ".main" if kwargs.get("decoder_in_shortcut", True) else ""
    rules = [
        (
            r"encoder\.conv_in\.conv\.",
            "encoder.project_in.conv.conv." if unshuffle else "encoder.project_in.conv.",
        ),
        (r"encoder\.conv_in\.", "encoder.project_in.conv."),
        (r"encoder\.conv_out\.", f"encoder.project_out{out_main}.op_list.0.conv."),
        (r"decoder\.conv_in\.", f"decoder.project_in{in_main}.conv."),
        (r"decoder\.norm_out\.", "decoder.project_out.op_list.0."),
        (r"decoder\.conv_out\.conv\.", "decoder.project_out.op_list.2.conv.conv."),
        (r"decoder\.conv_out\.", "decoder.project_out.op_list.2.conv."),
        (
            r"(encoder)\.down_blocks\.(\d+)\.(\d+)\.conv\.",
            r"\1.stages.\2.op_list.\3.main.conv.conv."
            if unshuffle
            else r"\1.stages.\2.op_list.\3.main.conv.",
        ),
        (r"(decoder)\.up_blocks\.(\d+)\.(\d+)\.conv\.", r"\1.stages.\2.op_list.\3.main.conv.conv."),
        (r"\.conv1\.", ".main.conv1.conv."),
        (r"\.conv2\.", ".main.conv2.conv."),
        (r"\.(\d+)\.norm\.", r".\1.main.conv2.norm."),
        (r"\.attn\.to_qkv_multiscale\.(\d+)\.proj_in\.", r".context_module.main.aggreg.\1.0."),
        (r"\.attn\.to_qkv_multiscale\.(\d+)\.proj_out\.", r".context_module.main.aggreg.\1.1."),
        (r"\.attn\.to_out\.", ".context_module.main.proj.conv."),
        (r"\.attn\.norm_out\.", ".context_module.main.proj.norm."),
        (r"\.conv_out\.conv_inverted\.", ".local_module.main.inverted_conv.conv."),
        (r"\.conv_out\.conv_depth\.", ".local_module.main.depth_conv.conv."),
        (r"\.conv_out\.conv_point\.", ".local_module.main.point_conv.conv."),
        (r"\.conv_out\.norm\.", ".local_module.main.point_conv.norm."),
    ]
    assert enc_depth0 > 0 or "encoder.conv_in.conv.weight" in state
    assert dec_depth0 > 0 or "decoder.conv_out.conv.weight" in state
    out = {}
    for key, tensor in state.items():
        if re.search(r"\.attn\.to_[qkv]\.weight$", key):
            if key.endswith("to_q.weight"):  # q, k, v were one 1×1 conv
                parts = [state[key.replace("to_q", n)] for n in ("to_q", "to_k", "to_v")]
                new = key.replace(".attn.to_q.weight", ".context_module.main.qkv.conv.weight")
                out[_stages(new)] = torch.cat(parts)[:, :, None, None]
            continue
        new = key
        for pattern, repl in rules:
            new, n = re.subn(pattern, repl, new)
            if n:
                break
        if new.endswith("proj.conv.weight"):
            tensor = tensor[:, :, None, None]
        out[_stages(new)] = tensor
    return out


def _stages(key: str) -> str:
    return re.sub(
        r"^(encoder\.down_blocks|decoder\.up_blocks)\.(\d+)\.(\d+)\.",
        lambda m: f"{m[1].split('.')[0]}.stages.{m[2]}.op_list.{m[3]}.",
        key,
    )


@pytest.mark.parametrize("name", ["sana-like", "imagenet-like", "no-shortcuts"])
def test_original_format_loads(name: str, saved_cases, tmp_path) -> None:
    ref, _ = saved_cases[name]
    original = _to_original(ref.state_dict(), CASES[name])
    assert not any("down_blocks" in k or "up_blocks" in k for k in original)
    save_file(original, str(tmp_path / "model.safetensors"))
    cfg = config_from_diffusers(dict(ref.config))
    ours = load_autoencoder(tmp_path / "model.safetensors", config=cfg)
    state = ours.state_dict()
    assert state.keys() == ref.state_dict().keys()
    for key, tensor in ref.state_dict().items():
        assert torch.equal(state[key], tensor), key


def test_original_folder_with_model_name(tmp_path) -> None:
    """mit-han-lab folders: config.json is {"model_name": ...} (a preset name)."""
    cfg = ae_preset("dc-ae-tiny")
    src = DCAE(cfg)
    kwargs = {k: v for k, v in config_to_diffusers(cfg).items() if not k.startswith("_")}
    save_file(_to_original(src.state_dict(), kwargs), str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps({"model_name": "dc-ae-tiny"}))
    loaded = load_autoencoder(tmp_path)
    assert loaded.config == cfg
    for key, tensor in src.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], tensor), key
    (tmp_path / "config.json").write_text(json.dumps({"model_name": "dc-ae-lite-f32c32-sana-1.1"}))
    with pytest.raises(CheckpointError, match=r"dc-ae-lite-f32c32-sana-1\.1.*config="):
        load_autoencoder(tmp_path)


def test_mismatch_errors_name_the_keys(saved_cases, tmp_path) -> None:
    ref, folder = saved_cases["sana-like"]
    state = dict(ref.state_dict())
    del state["decoder.conv_out.weight"]
    state["encoder.extra.weight"] = torch.zeros(1)
    state["encoder.conv_in.bias"] = torch.zeros(5)
    save_file(state, str(tmp_path / "diffusion_pytorch_model.safetensors"))
    (tmp_path / "config.json").write_text((folder / "config.json").read_text())
    with pytest.raises(CheckpointError) as err:
        load_autoencoder(tmp_path)
    message = str(err.value)
    for key in ("decoder.conv_out.weight", "encoder.extra.weight", "encoder.conv_in.bias"):
        assert key in message
    # An original-format key that no module maps to stays under its own name.
    original = _to_original(ref.state_dict(), CASES["sana-like"])
    original["encoder.stages.0.op_list.0.main.conv9.conv.weight"] = torch.zeros(1)
    save_file(original, str(tmp_path / "orig.safetensors"))
    with pytest.raises(CheckpointError, match=r"main\.conv9\.conv\.weight"):
        load_autoencoder(tmp_path / "orig.safetensors", config=config_from_diffusers(ref.config))


def test_save_load_round_trip_and_diffusers_reads_ours(tmp_path) -> None:
    cfg = config_from_diffusers(CASES["imagenet-like"])
    torch.manual_seed(3)
    ae = DCAE(cfg).eval()
    with torch.no_grad():
        for name, b in ae.named_buffers():
            if name.endswith("running_var"):
                b.uniform_(0.5, 1.5)
    save_autoencoder(ae, tmp_path / "ae")
    loaded = load_autoencoder(tmp_path / "ae")
    assert loaded.config == cfg
    for key, tensor in ae.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], tensor), key
    assert (
        json.loads((tmp_path / "ae" / "config.json").read_text())["_class_name"] == "AutoencoderDC"
    )
    ref = AutoencoderDC.from_pretrained(tmp_path / "ae").eval()
    z = torch.randn(2, 16, 5, 7)
    with torch.no_grad():
        _assert_close(loaded.decode(z), ref.decode(z).sample, "diffusers on our folder")
    # dtype: None keeps what is stored; an explicit dtype converts.
    save_autoencoder(ae, tmp_path / "bf16", dtype=torch.bfloat16)
    assert load_autoencoder(tmp_path / "bf16").dtype == torch.bfloat16
    assert load_autoencoder(tmp_path / "bf16", dtype=torch.float32).dtype == torch.float32


def test_sharded_and_pipeline_folders(saved_cases, tmp_path) -> None:
    ref, _ = saved_cases["sana-like"]
    ref.save_pretrained(tmp_path / "pipe" / "vae", max_shard_size="40KB")
    assert (tmp_path / "pipe" / "vae" / "diffusion_pytorch_model.safetensors.index.json").is_file()
    ours = load_autoencoder(tmp_path / "pipe")  # a pipeline folder: finds vae/
    for key, tensor in ref.state_dict().items():
        assert torch.equal(ours.state_dict()[key], tensor), key


def test_bf16_runs_and_stays_finite(saved_cases) -> None:
    _, folder = saved_cases["sana-like"]
    ours32 = load_autoencoder(folder)
    ours16 = load_autoencoder(folder, dtype=torch.bfloat16)
    x = torch.rand(1, 3, 32, 48, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with torch.no_grad():
        z16, z32 = ours16.encode(x), ours32.encode(x)  # fp32 input is cast to the model dtype
        y16, y32 = ours16.decode(z32), ours32.decode(z32)
    assert z16.dtype == y16.dtype == torch.bfloat16
    assert torch.isfinite(z16).all() and torch.isfinite(y16).all()
    # bf16 keeps ~3 significant digits; through ~20 random layers a few % of the range remains.
    assert (z16.float() - z32).abs().max() < 0.05 * z32.abs().max()
    assert (y16.float() - y32).abs().max() < 0.05 * y32.abs().max()


@pytest.mark.parametrize("compute", [torch.float32, torch.bfloat16])
def test_half_precision_model_computes_in_the_runtime_dtype(compute, saved_cases, monkeypatch):
    """A bf16 model runs its activations in ``runtime.matmul_dtype``'s answer: bf16 where the
    hardware multiplies it, fp32 (weights widened per layer) on CPUs without bf16 GEMMs.
    Both paths are forced here, whatever this machine is; the result is bf16 either way."""
    _, folder = saved_cases["imagenet-like"]  # BatchNorm too
    monkeypatch.setattr("fastsana.models.dcae.matmul_dtype", lambda device, dtype: compute)
    ref = load_autoencoder(folder)
    ae = load_autoencoder(folder, dtype=torch.bfloat16)
    assert ae.compute_dtype == compute
    seen = set()
    handle = ae.decoder.conv_in.register_forward_pre_hook(lambda _, a: seen.add(a[0].dtype))
    z = torch.randn(1, 16, 2, 3, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        y, y_ref = ae.decode(z), ref.decode(z)
        lat = ae.encode(torch.rand(1, 3, 16, 24) * 2 - 1)
    handle.remove()
    assert seen == {compute}
    assert y.dtype == lat.dtype == torch.bfloat16
    assert (y.float() - y_ref).abs().max() < 0.05 * y_ref.abs().max()


def test_gradient_checkpointing_gives_the_same_gradients() -> None:
    cfg = config_from_diffusers(CASES["sana-like"])
    torch.manual_seed(0)
    ae = DCAE(cfg)
    x = torch.rand(1, 3, 32, 48) * 2 - 1
    grads = []
    for enabled in (False, True):
        ae.gradient_checkpointing = enabled
        ae.zero_grad()
        ae(x).square().mean().backward()
        grads.append([p.grad.clone() for p in ae.parameters()])
    for plain, ckpt in zip(*grads, strict=True):
        torch.testing.assert_close(ckpt, plain, rtol=1e-5, atol=1e-7)


def test_input_errors() -> None:
    ae = DCAE(ae_preset("dc-ae-tiny"))
    with pytest.raises(ValueError, match="multiples of the spatial compression 32"):
        ae.encode(torch.zeros(1, 3, 64, 48))
    with pytest.raises(ValueError, match="3 channels"):
        ae.encode(torch.zeros(1, 4, 64, 64))
    with pytest.raises(ValueError, match=r"\(B, C, H, W\)"):
        ae.encode(torch.zeros(3, 64, 64))
    with pytest.raises(TypeError, match="floating-point"):
        ae.encode(torch.zeros(1, 3, 64, 64, dtype=torch.uint8))
    with pytest.raises(TypeError, match=r"torch\.Tensor"):
        ae.decode([[0.0]])
    with pytest.raises(ValueError, match="32 channels"):
        ae.decode(torch.zeros(1, 16, 2, 2))


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (dict(encoder_widths=(8, 16)), "one entry per stage"),
        (dict(encoder_block_types=("ResBlock",) * 5 + ("Attention",)), "'Attention' is not one"),
        (dict(encoder_widths=(8, 16, 16, 32, 32, 36)), "multiple of head_dim"),
        (dict(decoder_widths=(8, 16, 16, 32, 32, 16)), "latent_channels"),
        (dict(encoder_widths=(8, 16, 16, 48, 32, 32)), r"4 \* width\[2\]"),
        (dict(encoder_depths=(1, 0, 1, 1, 1, 1)), "only stage 0"),
        (dict(decoder_qkv_multiscales=((),) * 5 + ((4,),)), "odd positive"),
        (dict(downsample="avgpool"), "downsample"),
        (dict(decoder_norm_types=("layer_norm",) * 6), "layer_norm"),
        (dict(scaling_factor=0.0), "scaling_factor"),
    ],
)
def test_config_validation(change: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        replace(ae_preset("dc-ae-tiny"), **change)


def test_checkpoint_errors(tmp_path) -> None:
    with pytest.raises(ValueError, match="unknown autoencoder preset 'nope'"):
        ae_preset("nope")
    assert isinstance(ae_preset("dc-ae-f32-small"), AutoencoderConfig)
    with pytest.raises(CheckpointError, match="not found"):
        load_autoencoder(tmp_path / "missing")
    with pytest.raises(CheckpointError, match="no autoencoder weights"):
        load_autoencoder(tmp_path)
    save_file({"x": torch.zeros(1)}, str(tmp_path / "w.safetensors"))
    with pytest.raises(CheckpointError, match="pass config="):
        load_autoencoder(tmp_path / "w.safetensors")
    with pytest.raises(CheckpointError, match="mystery_option"):
        config_from_diffusers({"mystery_option": 1})
    with pytest.raises(CheckpointError, match="upsample_block_type"):
        config_from_diffusers({"upsample_block_type": "bicubic"})
    with pytest.raises(CheckpointError, match="EfficientViT stage"):
        config_from_diffusers({"decoder_block_types": EVIT, "attention_head_dim": 48})
