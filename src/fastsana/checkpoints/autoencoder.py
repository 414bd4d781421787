"""Load and save DC-AE weights.

Two on-disk formats are read:

- diffusers ``AutoencoderDC`` folders: ``config.json`` + ``diffusion_pytorch_model.safetensors``
  (or shards with an index). Our module names equal diffusers', so the state dict loads as is;
  ``config_from_diffusers`` / ``config_to_diffusers`` translate the config both ways.
- the original mit-han-lab (efficientvit) format: ``model.safetensors`` (or a ``.pt/.pth`` with a
  ``state_dict``) whose keys follow efficientvit's ``DCAE`` modules (``encoder.stages.i.op_list.j
  .main.conv1.conv.weight``, ``…context_module.main.qkv.conv.weight`` …), with a ``config.json``
  holding only ``{"model_name": "dc-ae-f32c32-sana-1.0"}`` (a name in ``AE_PRESETS``).
  ``original_to_diffusers`` renames the keys; the fused q/k/v conv is split in three and the
  1×1 attention convs become matrices. Anything it does not recognise is left under its
  original name, so the strict loader reports it.

``save_autoencoder`` always writes the diffusers format, which diffusers itself can load.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from fastsana.checkpoints.common import (
    CheckpointError,
    atomic_write_json,
    find_weights_file,
    load_state_dict_into,
    read_json,
    read_state_dict,
    save_safetensors,
    storage_dtype,
)
from fastsana.configs import AutoencoderConfig, ae_preset
from fastsana.models.dcae import DCAE

DIFFUSERS_CLASS = "AutoencoderDC"
DIFFUSERS_WEIGHTS_STEM = "diffusion_pytorch_model"
ORIGINAL_WEIGHTS_STEM = "model"

# diffusers' ``AutoencoderDC.__init__`` defaults: what a config.json that omits a key means.
_DIFFUSERS_DEFAULTS: dict[str, Any] = {
    "in_channels": 3,
    "latent_channels": 32,
    "attention_head_dim": 32,
    "encoder_block_types": "ResBlock",
    "decoder_block_types": "ResBlock",
    "encoder_block_out_channels": (128, 256, 512, 512, 1024, 1024),
    "decoder_block_out_channels": (128, 256, 512, 512, 1024, 1024),
    "encoder_layers_per_block": (2, 2, 2, 3, 3, 3),
    "decoder_layers_per_block": (3, 3, 3, 3, 3, 3),
    "encoder_qkv_multiscales": ((), (), (), (5,), (5,), (5,)),
    "decoder_qkv_multiscales": ((), (), (), (5,), (5,), (5,)),
    "upsample_block_type": "pixel_shuffle",
    "downsample_block_type": "pixel_unshuffle",
    "decoder_norm_types": "rms_norm",
    "decoder_act_fns": "silu",
    "encoder_out_shortcut": True,
    "decoder_in_shortcut": True,
    "decoder_conv_act_fn": "relu",
    "scaling_factor": 1.0,
}
# diffusers treats every downsample type but "pixel_unshuffle" as a strided conv; the released
# configs spell it "conv" or "Conv". Upsampling: "interpolate" or "pixel_shuffle".
_DOWNSAMPLE_NAMES = {"pixel_unshuffle": "pixel_unshuffle", "conv": "conv"}
_UPSAMPLE_NAMES = {"interpolate": "interpolate", "pixel_shuffle": "pixel_shuffle"}


def config_from_diffusers(raw: Mapping[str, Any]) -> AutoencoderConfig:
    """An ``AutoencoderConfig`` from a diffusers ``AutoencoderDC`` config.json dict."""
    unknown = sorted(k for k in raw if not k.startswith("_") and k not in _DIFFUSERS_DEFAULTS)
    if unknown:
        raise CheckpointError(
            f"AutoencoderDC config has keys this implementation does not know: {unknown}"
        )
    c = {**_DIFFUSERS_DEFAULTS, **{k: v for k, v in raw.items() if not k.startswith("_")}}
    n = len(c["encoder_block_out_channels"])

    def per_stage(key: str) -> tuple:
        value = c[key]
        return (value,) * n if isinstance(value, str) else tuple(value)

    def lookup(key: str, names: dict[str, str]) -> str:
        value = str(c[key])
        if value.lower() not in names:
            raise CheckpointError(
                f"AutoencoderDC config: {key}={value!r} is not one of {list(names)}"
            )
        return names[value.lower()]

    try:
        return AutoencoderConfig(
            in_channels=c["in_channels"],
            latent_channels=c["latent_channels"],
            head_dim=c["attention_head_dim"],
            encoder_block_types=per_stage("encoder_block_types"),
            decoder_block_types=per_stage("decoder_block_types"),
            encoder_widths=tuple(c["encoder_block_out_channels"]),
            decoder_widths=tuple(c["decoder_block_out_channels"]),
            encoder_depths=tuple(c["encoder_layers_per_block"]),
            decoder_depths=tuple(c["decoder_layers_per_block"]),
            encoder_qkv_multiscales=tuple(tuple(s) for s in c["encoder_qkv_multiscales"]),
            decoder_qkv_multiscales=tuple(tuple(s) for s in c["decoder_qkv_multiscales"]),
            downsample=lookup("downsample_block_type", _DOWNSAMPLE_NAMES),  # type: ignore[arg-type]
            upsample=lookup("upsample_block_type", _UPSAMPLE_NAMES),  # type: ignore[arg-type]
            decoder_norm_types=per_stage("decoder_norm_types"),
            decoder_act_fns=per_stage("decoder_act_fns"),
            encoder_out_shortcut=bool(c["encoder_out_shortcut"]),
            decoder_in_shortcut=bool(c["decoder_in_shortcut"]),
            decoder_out_act=c["decoder_conv_act_fn"],
            scaling_factor=float(c["scaling_factor"]),
        )
    except (ValueError, TypeError) as e:
        raise CheckpointError(f"invalid AutoencoderDC config: {e}") from e


def config_to_diffusers(config: AutoencoderConfig) -> dict[str, Any]:
    """The diffusers ``AutoencoderDC`` config.json for ``config`` (every key explicit)."""
    return {
        "_class_name": DIFFUSERS_CLASS,
        "in_channels": config.in_channels,
        "latent_channels": config.latent_channels,
        "attention_head_dim": config.head_dim,
        "encoder_block_types": list(config.encoder_block_types),
        "decoder_block_types": list(config.decoder_block_types),
        "encoder_block_out_channels": list(config.encoder_widths),
        "decoder_block_out_channels": list(config.decoder_widths),
        "encoder_layers_per_block": list(config.encoder_depths),
        "decoder_layers_per_block": list(config.decoder_depths),
        "encoder_qkv_multiscales": [list(s) for s in config.encoder_qkv_multiscales],
        "decoder_qkv_multiscales": [list(s) for s in config.decoder_qkv_multiscales],
        "downsample_block_type": config.downsample,
        "upsample_block_type": config.upsample,
        "decoder_norm_types": list(config.decoder_norm_types),
        "decoder_act_fns": list(config.decoder_act_fns),
        "encoder_out_shortcut": config.encoder_out_shortcut,
        "decoder_in_shortcut": config.decoder_in_shortcut,
        "decoder_conv_act_fn": config.decoder_out_act,
        "scaling_factor": config.scaling_factor,
    }


# --- the original (efficientvit) key layout -------------------------------------------------
# efficientvit wraps layers in ConvLayer (``.conv`` holds the nn.Conv2d, ``.norm`` the norm),
# residual pairs in ResidualBlock (``.main`` + a parameter-free shortcut) and stage lists in
# OpSequential (``.op_list``). A resampling layer without its own shortcut is not wrapped.
_QKV = "qkv"  # fused q/k/v 1×1 conv → to_q / to_k / to_v matrices
_MATRIX = "matrix"  # 1×1 conv → linear matrix
_PLAIN = "plain"

_RESBLOCK = {"main.conv1.conv": "conv1", "main.conv2.conv": "conv2", "main.conv2.norm": "norm"}
_EVIT = {
    "context_module.main.proj.norm": "attn.norm_out",
    "local_module.main.inverted_conv.conv": "conv_out.conv_inverted",
    "local_module.main.depth_conv.conv": "conv_out.conv_depth",
    "local_module.main.point_conv.conv": "conv_out.conv_point",
    "local_module.main.point_conv.norm": "conv_out.norm",
}


def _original_module_map(cfg: AutoencoderConfig) -> dict[str, tuple[str, str]]:
    """original module path → (diffusers module path, kind) for every module with weights."""
    # Down: "conv" is a bare ConvLayer, "pixel_unshuffle" a layer holding a ConvLayer.
    down_conv = ".conv" if cfg.downsample == "conv" else ".conv.conv"
    up_conv = ".conv.conv"  # both upsample layers hold a ConvLayer
    m: dict[str, tuple[str, str]] = {}

    def block(orig: str, ours: str, kind: str, scales: tuple[int, ...]) -> None:
        if kind == "ResBlock":
            m.update({f"{orig}.{a}": (f"{ours}.{b}", _PLAIN) for a, b in _RESBLOCK.items()})
            return
        m.update({f"{orig}.{a}": (f"{ours}.{b}", _PLAIN) for a, b in _EVIT.items()})
        m[f"{orig}.context_module.main.qkv.conv"] = (f"{ours}.attn", _QKV)
        m[f"{orig}.context_module.main.proj.conv"] = (f"{ours}.attn.to_out", _MATRIX)
        for s in range(len(scales)):
            branch = f"{ours}.attn.to_qkv_multiscale.{s}"
            m[f"{orig}.context_module.main.aggreg.{s}.0"] = (f"{branch}.proj_in", _PLAIN)
            m[f"{orig}.context_module.main.aggreg.{s}.1"] = (f"{branch}.proj_out", _PLAIN)

    n = cfg.num_stages
    if cfg.encoder_depths[0] > 0:
        m["encoder.project_in.conv"] = ("encoder.conv_in", _PLAIN)
    else:
        m[f"encoder.project_in{down_conv}"] = ("encoder.conv_in.conv", _PLAIN)
    for i, depth in enumerate(cfg.encoder_depths):
        for j in range(depth):
            block(
                f"encoder.stages.{i}.op_list.{j}",
                f"encoder.down_blocks.{i}.{j}",
                cfg.encoder_block_types[i],
                cfg.encoder_qkv_multiscales[i],
            )
        if i < n - 1 and depth > 0:
            m[f"encoder.stages.{i}.op_list.{depth}.main{down_conv}"] = (
                f"encoder.down_blocks.{i}.{depth}.conv",
                _PLAIN,
            )
    out = "encoder.project_out.main" if cfg.encoder_out_shortcut else "encoder.project_out"
    m[f"{out}.op_list.0.conv"] = ("encoder.conv_out", _PLAIN)

    inp = "decoder.project_in.main" if cfg.decoder_in_shortcut else "decoder.project_in"
    m[f"{inp}.conv"] = ("decoder.conv_in", _PLAIN)
    for i, depth in enumerate(cfg.decoder_depths):
        first = 0
        if i < n - 1 and depth > 0:
            m[f"decoder.stages.{i}.op_list.0.main{up_conv}"] = (
                f"decoder.up_blocks.{i}.0.conv",
                _PLAIN,
            )
            first = 1
        for j in range(first, first + depth):
            block(
                f"decoder.stages.{i}.op_list.{j}",
                f"decoder.up_blocks.{i}.{j}",
                cfg.decoder_block_types[i],
                cfg.decoder_qkv_multiscales[i],
            )
    m["decoder.project_out.op_list.0"] = ("decoder.norm_out", _PLAIN)
    if cfg.decoder_depths[0] > 0:
        m["decoder.project_out.op_list.2.conv"] = ("decoder.conv_out", _PLAIN)
    else:
        m[f"decoder.project_out.op_list.2{up_conv}"] = ("decoder.conv_out.conv", _PLAIN)
    return m


def original_to_diffusers(
    state: Mapping[str, torch.Tensor], config: AutoencoderConfig
) -> dict[str, torch.Tensor]:
    """Rename an original-format DC-AE state dict to our (= diffusers') names."""
    modules = _original_module_map(config)
    out: dict[str, torch.Tensor] = {}
    for key, tensor in state.items():
        prefix, _, leaf = key.rpartition(".")
        target = modules.get(prefix)
        if target is None or (target[1] != _PLAIN and leaf != "weight"):
            out[key] = tensor  # unknown: keep the name so the strict loader reports it
            continue
        ours, kind = target
        if kind == _PLAIN:
            out[f"{ours}.{leaf}"] = tensor
        elif kind == _MATRIX:
            out[f"{ours}.weight"] = tensor.flatten(1)
        else:
            for name, part in zip(
                ("to_q", "to_k", "to_v"), tensor.flatten(1).chunk(3, dim=0), strict=True
            ):
                out[f"{ours}.{name}.weight"] = part
    return out


def _is_original_layout(state: Mapping[str, torch.Tensor]) -> bool:
    return any(
        k.startswith(
            ("encoder.stages.", "decoder.stages.", "encoder.project_in.", "decoder.project_in.")
        )
        for k in state
    )


# --- loading --------------------------------------------------------------------------------


def _locate(path: Path) -> tuple[Path, dict | None]:
    """The weights file and the config.json dict (None when there is none) for ``path``."""
    if path.is_file():
        config_file = path.parent / "config.json"
        return path, None if not config_file.is_file() else read_json(config_file, "autoencoder")
    if not path.is_dir():
        raise CheckpointError(f"autoencoder checkpoint not found: {path}")
    if not (path / "config.json").is_file() and (path / "vae" / "config.json").is_file():
        path = path / "vae"  # a diffusers pipeline folder
    raw = (
        read_json(path / "config.json", "autoencoder") if (path / "config.json").is_file() else None
    )
    for stem in (DIFFUSERS_WEIGHTS_STEM, ORIGINAL_WEIGHTS_STEM):
        try:
            return find_weights_file(path, stem), raw
        except CheckpointError:
            pass
    raise CheckpointError(
        f"no autoencoder weights in {path}: expected {DIFFUSERS_WEIGHTS_STEM}.safetensors "
        f"(diffusers) or {ORIGINAL_WEIGHTS_STEM}.safetensors (mit-han-lab), or their shard index"
    )


def _resolve_config(
    config: AutoencoderConfig | str | None, raw: dict | None, where: Path
) -> AutoencoderConfig:
    if isinstance(config, AutoencoderConfig):
        return config
    if isinstance(config, str):
        return ae_preset(config)
    if config is not None:
        raise TypeError(f"config must be an AutoencoderConfig or a preset name, got {config!r}")
    if raw is None:
        raise CheckpointError(
            f"no config.json for {where}; pass config= (an AutoencoderConfig or a preset name "
            f"such as 'dc-ae-f32c32-sana-1.0')"
        )
    if "model_name" in raw and "encoder_block_out_channels" not in raw:  # mit-han-lab layout
        try:
            return ae_preset(str(raw["model_name"]))
        except ValueError as e:
            raise CheckpointError(f"{where}: {e}; pass config= to load it") from None
    class_name = raw.get("_class_name", DIFFUSERS_CLASS)
    if class_name != DIFFUSERS_CLASS:
        raise CheckpointError(
            f"{where}: config.json describes {class_name!r}, not {DIFFUSERS_CLASS}"
        )
    return config_from_diffusers(raw)


def load_autoencoder(
    path: str | os.PathLike[str],
    dtype: torch.dtype | None = None,
    device: str | torch.device | None = None,
    config: AutoencoderConfig | str | None = None,
) -> DCAE:
    """Load a DC-AE from a diffusers ``AutoencoderDC`` folder (or a pipeline folder with
    ``vae/``), an original mit-han-lab folder, or a bare weights file (then ``config`` is
    required). ``dtype=None`` keeps the stored dtype. Returns the model in eval mode."""
    weights, raw = _locate(Path(path))
    cfg = _resolve_config(config, raw, weights)
    state = read_state_dict(weights)
    if _is_original_layout(state):
        state = original_to_diffusers(state, cfg)
    target_dtype = dtype or storage_dtype(state)
    with torch.device("meta"):
        model = DCAE(cfg)
    load_state_dict_into(model, state, f"autoencoder checkpoint {weights}", target_dtype, device)
    return model.eval()


def save_autoencoder(
    ae: DCAE, folder: str | os.PathLike[str], dtype: torch.dtype | None = None
) -> None:
    """Write ``ae`` as a diffusers ``AutoencoderDC`` folder (weights first, then config.json,
    each atomically). ``dtype=None`` keeps the model's dtype."""
    folder = Path(folder)
    state = ae.state_dict()
    if dtype is not None:
        state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
    save_safetensors(state, folder, DIFFUSERS_WEIGHTS_STEM)
    atomic_write_json(folder / "config.json", config_to_diffusers(ae.config))
