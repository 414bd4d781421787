"""Linear DiT checkpoints: diffusers folders, official NVlabs files, and our writer.

Our parameter names are the diffusers ones, so a diffusers state dict loads as is. The
official layout differs by a key map (below) and fused projections (``attn.qkv`` holds q, k, v
stacked on dim 0; ``cross_attn.kv_linear`` holds k, v). Its architecture is read off the
tensors' shapes.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import Tensor

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
from fastsana.configs import DiTConfig
from fastsana.models.dit import SanaTransformer

WEIGHTS_STEM = "diffusion_pytorch_model"
DIFFUSERS_CLASS = "SanaTransformer2DModel"

# DiTConfig field → diffusers config.json key (fields not listed have no diffusers twin).
_DIFFUSERS_NAMES = {
    "in_channels": "in_channels",
    "out_channels": "out_channels",
    "depth": "num_layers",
    "num_heads": "num_attention_heads",
    "head_dim": "attention_head_dim",
    "cross_num_heads": "num_cross_attention_heads",
    "cross_head_dim": "cross_attention_head_dim",
    "caption_channels": "caption_channels",
    "mlp_ratio": "mlp_ratio",
    "patch_size": "patch_size",
    "sample_size": "sample_size",
    "norm_eps": "norm_eps",
    "attention_bias": "attention_bias",
    "guidance_embeds": "guidance_embeds",
    "guidance_embeds_scale": "guidance_embeds_scale",
    "interpolation_scale": "interpolation_scale",
    "timestep_scale": "timestep_scale",
}


def config_from_diffusers(raw: Mapping[str, object]) -> DiTConfig:
    """Build a DiTConfig from a diffusers ``SanaTransformer2DModel`` config.json."""
    defaults = DiTConfig()
    fields = {}
    for ours, theirs in _DIFFUSERS_NAMES.items():
        if raw.get(theirs) is not None:
            fields[ours] = raw[theirs]
    fields["out_channels"] = raw.get("out_channels") or fields.get("in_channels", 32)
    heads = int(fields.get("num_heads", defaults.num_heads))
    head_dim = int(fields.get("head_dim", defaults.head_dim))
    fields["hidden_size"] = heads * head_dim
    cross_dim = raw.get("cross_attention_dim")
    if cross_dim is not None and cross_dim != fields["hidden_size"]:
        raise CheckpointError(
            f"cross_attention_dim ({cross_dim}) must equal the model width "
            f"({fields['hidden_size']}): the caption is projected to the width first"
        )
    qk_norm = raw.get("qk_norm")
    if qk_norm not in (None, "rms_norm_across_heads"):
        raise CheckpointError(f"unsupported qk_norm {qk_norm!r}: only 'rms_norm_across_heads'")
    fields["qk_norm"] = qk_norm is not None
    if raw.get("norm_elementwise_affine"):
        raise CheckpointError("norm_elementwise_affine=True is not used by any SANA checkpoint")
    if raw.get("interpolation_scale") is not None:
        fields["interpolation_scale"] = float(raw["interpolation_scale"])
    try:
        return DiTConfig(**fields)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"invalid transformer config: {e}") from e


def config_to_diffusers(config: DiTConfig) -> dict[str, object]:
    raw: dict[str, object] = {"_class_name": DIFFUSERS_CLASS, "_diffusers_version": "0.32.0"}
    for ours, theirs in _DIFFUSERS_NAMES.items():
        raw[theirs] = getattr(config, ours)
    raw["cross_attention_dim"] = config.hidden_size
    raw["qk_norm"] = "rms_norm_across_heads" if config.qk_norm else None
    raw["norm_elementwise_affine"] = False
    raw["dropout"] = 0.0
    if config.self_attention != "linear":
        raw["self_attention"] = config.self_attention  # ours only; diffusers ignores it
    return raw


# ----------------------------------------------------------------------- official format

# Official prefix → diffusers prefix, applied to the start of each key (longest match first).
_OFFICIAL_PREFIXES = [
    ("x_embedder.proj.", "patch_embed.proj."),
    ("t_embedder.mlp.0.", "time_embed.emb.timestep_embedder.linear_1."),
    ("t_embedder.mlp.2.", "time_embed.emb.timestep_embedder.linear_2."),
    ("t_block.1.", "time_embed.linear."),
    ("y_embedder.y_proj.fc1.", "caption_projection.linear_1."),
    ("y_embedder.y_proj.fc2.", "caption_projection.linear_2."),
    ("attention_y_norm.", "caption_norm."),
    ("final_layer.linear.", "proj_out."),
    ("final_layer.scale_shift_table", "scale_shift_table"),
]
# Inside ``blocks.N.`` (official) / ``transformer_blocks.N.`` (ours).
_OFFICIAL_BLOCK = [
    ("attn.proj.", "attn1.to_out.0."),
    ("attn.q_norm.", "attn1.norm_q."),
    ("attn.k_norm.", "attn1.norm_k."),
    ("cross_attn.q_linear.", "attn2.to_q."),
    ("cross_attn.proj.", "attn2.to_out.0."),
    ("cross_attn.q_norm.", "attn2.norm_q."),
    ("cross_attn.k_norm.", "attn2.norm_k."),
    ("mlp.inverted_conv.conv.", "ff.conv_inverted."),
    ("mlp.depth_conv.conv.", "ff.conv_depth."),
    ("mlp.point_conv.conv.", "ff.conv_point."),
    ("scale_shift_table", "scale_shift_table"),
]
# Official tensors with no counterpart: the learned null caption (CFG training only) and the
# sin-cos buffer (recomputed on the fly).
_OFFICIAL_DROPPED = ("y_embedder.y_embedding", "pos_embed")
_BLOCK_RE = re.compile(r"^blocks\.(\d+)\.(.+)$")


def is_official_state_dict(state: Mapping[str, Tensor]) -> bool:
    return any(k.startswith(("x_embedder.", "blocks.")) for k in state)


def official_to_diffusers(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Rename an official NVlabs state dict to our (diffusers) names, splitting fused layers.

    Keys it does not know are kept as they are, so the strict load reports them.
    """
    out: dict[str, Tensor] = {}
    for key, tensor in state.items():
        if key.startswith(_OFFICIAL_DROPPED):
            continue
        match = _BLOCK_RE.match(key)
        if match:
            index, rest = match.groups()
            prefix = f"transformer_blocks.{index}."
            if rest.startswith("attn.qkv."):
                for name, part in zip(
                    ("to_q", "to_k", "to_v"), tensor.chunk(3, dim=0), strict=True
                ):
                    out[f"{prefix}attn1.{name}.{rest[len('attn.qkv.') :]}"] = part
                continue
            if rest.startswith("cross_attn.kv_linear."):
                for name, part in zip(("to_k", "to_v"), tensor.chunk(2, dim=0), strict=True):
                    out[f"{prefix}attn2.{name}.{rest[len('cross_attn.kv_linear.') :]}"] = part
                continue
            out[prefix + _rename(rest, _OFFICIAL_BLOCK)] = tensor
        else:
            out[_rename(key, _OFFICIAL_PREFIXES)] = tensor
    return out


def _rename(key: str, table: list[tuple[str, str]]) -> str:
    for old, new in table:
        if key.startswith(old):
            return new + key[len(old) :]
    return key


# Official checkpoints do not store head counts; these are the released ones by width.
_CROSS_HEADS_BY_WIDTH = {1152: 16, 2240: 20}
# Sample size (latent side) → interpolation scale of the sin-cos embedding (2K: 1.0, 4K: 2.0).
_PE_SCALE_BY_SAMPLE_SIZE = {64: 1.0, 128: 2.0}


def config_from_official(state: Mapping[str, Tensor]) -> DiTConfig:
    """Infer the architecture of an official checkpoint from its tensors' shapes."""
    try:
        proj = state["x_embedder.proj.weight"]  # (C, in, p, p)
        caption = state["y_embedder.y_proj.fc1.weight"]  # (C, caption_channels)
        final = state["final_layer.linear.weight"]  # (p·p·out, C)
        ffn = state["blocks.0.mlp.point_conv.conv.weight"]  # (C, h, 1, 1)
    except KeyError as e:
        raise CheckpointError(f"official checkpoint lacks {e.args[0]!r}; is it a SANA DiT?") from e
    hidden, in_ch, p = proj.shape[0], proj.shape[1], proj.shape[2]
    depth = 1 + max(int(m.group(1)) for k in state if (m := _BLOCK_RE.match(k)))
    if hidden not in _CROSS_HEADS_BY_WIDTH:
        raise CheckpointError(
            f"cannot infer cross-attention heads for width {hidden}; pass config=DiTConfig(...)"
        )
    cross_heads = _CROSS_HEADS_BY_WIDTH[hidden]
    pos = state.get("pos_embed")
    interpolation_scale = None
    sample_size = 32
    if pos is not None and pos.abs().max() > 0:  # some files carry an all-zero buffer
        side = math.isqrt(pos.shape[1])
        sample_size = side * p
        interpolation_scale = _PE_SCALE_BY_SAMPLE_SIZE.get(sample_size, sample_size / 64)
    return DiTConfig(
        in_channels=in_ch,
        out_channels=final.shape[0] // (p * p),
        hidden_size=hidden,
        depth=depth,
        num_heads=hidden // 32,
        head_dim=32,
        cross_num_heads=cross_heads,
        cross_head_dim=hidden // cross_heads,
        caption_channels=caption.shape[1],
        mlp_ratio=ffn.shape[1] / hidden,
        patch_size=p,
        sample_size=sample_size,
        attention_bias="blocks.0.attn.qkv.bias" in state,
        qk_norm="blocks.0.attn.q_norm.weight" in state,
        interpolation_scale=interpolation_scale,
    )


# ------------------------------------------------------------------------------ public


def _resolve(path: Path) -> tuple[Path, Path | None]:
    """(weights file, config.json or None) for a folder or a file path."""
    if path.is_dir():
        if (path / "transformer").is_dir() and not (path / "config.json").is_file():
            path = path / "transformer"  # a whole pipeline folder was given
        config = path / "config.json"
        return find_weights_file(path, WEIGHTS_STEM), config if config.is_file() else None
    if path.is_file():
        sibling = path.parent / "config.json"
        is_diffusers = path.name.startswith(WEIGHTS_STEM) and sibling.is_file()
        return path, sibling if is_diffusers else None
    raise CheckpointError(f"transformer checkpoint not found: {path}")


def load_transformer(
    path: str | os.PathLike[str],
    dtype: torch.dtype | None = None,
    device: str | torch.device | None = None,
    config: DiTConfig | None = None,
) -> SanaTransformer:
    """Load a Linear DiT from a diffusers folder or an official ``.pth``/``.safetensors`` file.

    Args:
        path: a diffusers transformer folder (``config.json`` + weights, sharded or not), a
            pipeline folder (its ``transformer/`` is used), or an official NVlabs checkpoint.
        dtype: convert floating weights to this dtype; None keeps the stored dtype.
        device: where the weights go (default CPU).
        config: override the architecture (otherwise read from config.json or inferred).
    """
    weights, config_file = _resolve(Path(path))
    state = read_state_dict(weights)
    if is_official_state_dict(state):
        config = config or config_from_official(state)
        state = official_to_diffusers(state)
    elif config is None:
        if config_file is None:
            raise CheckpointError(
                f"{weights}: diffusers-format weights need a config.json beside them"
            )
        config = config_from_diffusers(read_json(config_file, "transformer config"))
    with torch.device("meta"):
        model = SanaTransformer(config)
    load_state_dict_into(
        model, state, f"transformer checkpoint {path}", dtype or storage_dtype(state), device
    )
    return model.eval()


def save_transformer(
    model: SanaTransformer,
    folder: str | os.PathLike[str],
    dtype: torch.dtype | None = None,
    max_shard_size: int | str = "10GB",
) -> Path:
    """Write ``model`` as a diffusers transformer folder (config.json + safetensors)."""
    folder = Path(folder)
    with torch.device("meta"):
        plain = SanaTransformer(model.config).state_dict().keys()
    if model.state_dict().keys() != plain:  # e.g. W8A8 layers: int8 buffers no loader reads
        raise CheckpointError(
            "save_transformer: the model's parameters are not a plain SanaTransformer's "
            "(quantised?); save the float model and quantise after loading (quantize='w8a8')"
        )
    state = {
        k: (v.to(dtype) if dtype is not None and v.is_floating_point() else v)
        for k, v in model.state_dict().items()
    }
    save_safetensors(state, folder, WEIGHTS_STEM, max_shard_size=max_shard_size)
    atomic_write_json(folder / "config.json", config_to_diffusers(model.config))
    return folder


def convert_transformer(
    src: str | os.PathLike[str],
    dst: str | os.PathLike[str],
    dtype: torch.dtype | None = None,
    config: DiTConfig | None = None,
) -> DiTConfig:
    """Convert any supported transformer checkpoint to a diffusers folder; returns its config."""
    model = load_transformer(src, dtype=dtype, config=config)
    save_transformer(model, dst)
    return model.config


__all__ = [
    "config_from_diffusers",
    "config_from_official",
    "config_to_diffusers",
    "convert_transformer",
    "load_transformer",
    "official_to_diffusers",
    "save_transformer",
]
