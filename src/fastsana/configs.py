"""Typed configs for every component, and the one table of named presets.

A config is a frozen dataclass validated in ``__post_init__``; a preset is data (a config plus
the sampling defaults that belong to that model), never a branch on a model's name elsewhere.
The CLI takes its ``--preset`` choices from ``DIT_PRESETS``.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Literal, TypeVar

C = TypeVar("C")


def _require(cond: bool, message: str) -> None:
    if not cond:
        raise ValueError(message)


@dataclass(frozen=True)
class DiTConfig:
    """Linear DiT (SANA transformer).

    Field names follow the paper; ``checkpoints.transformer`` maps them to the diffusers
    ``config.json`` names.
    """

    in_channels: int = 32  # latent channels (DC-AE f32c32)
    out_channels: int = 32
    hidden_size: int = 1152  # width C
    depth: int = 28
    num_heads: int = 36  # linear self-attention heads
    head_dim: int = 32
    cross_num_heads: int = 16  # softmax cross-attention heads
    cross_head_dim: int = 72
    caption_channels: int = 2304  # hidden size of the text encoder (Gemma-2-2B)
    mlp_ratio: float = 2.5  # Mix-FFN hidden = int(mlp_ratio * hidden_size)
    patch_size: int = 1
    sample_size: int = 32  # native latent side; the base grid of the sin-cos embedding
    norm_eps: float = 1e-6
    attention_bias: bool = False  # bias on the self-attention q/k/v projections
    qk_norm: bool = False  # RMSNorm across heads on q and k (Sana 1.5, Sprint)
    guidance_embeds: bool = False  # guidance-scale embedding (Sana-Sprint)
    guidance_embeds_scale: float = 0.1  # the pipeline multiplies guidance by this
    interpolation_scale: float | None = None  # None: no positional embedding (512/1024 px)
    timestep_scale: float = 1.0  # the pipeline multiplies timesteps by this
    self_attention: Literal["linear", "softmax"] = "linear"  # softmax: ablation only

    def __post_init__(self) -> None:
        for name in (
            "in_channels",
            "out_channels",
            "hidden_size",
            "depth",
            "num_heads",
            "head_dim",
            "cross_num_heads",
            "cross_head_dim",
            "caption_channels",
            "patch_size",
            "sample_size",
        ):
            value = getattr(self, name)
            _require(
                isinstance(value, int) and value > 0,
                f"DiTConfig.{name} must be a positive int, got {value!r}",
            )
        _require(
            self.num_heads * self.head_dim == self.hidden_size,
            f"DiTConfig: num_heads * head_dim ({self.num_heads} * {self.head_dim}) must equal "
            f"hidden_size ({self.hidden_size})",
        )
        _require(self.mlp_ratio > 0, f"DiTConfig.mlp_ratio must be > 0, got {self.mlp_ratio}")
        _require(
            self.interpolation_scale is None or self.interpolation_scale > 0,
            f"DiTConfig.interpolation_scale must be None or > 0, got {self.interpolation_scale}",
        )
        _require(
            self.self_attention in ("linear", "softmax"),
            f"DiTConfig.self_attention must be 'linear' or 'softmax', got {self.self_attention!r}",
        )
        _require(
            self.hidden_size % 4 == 0 or self.interpolation_scale is None,
            "DiTConfig: the sin-cos positional embedding needs hidden_size divisible by 4",
        )

    @property
    def ffn_hidden(self) -> int:
        return int(self.mlp_ratio * self.hidden_size)


@dataclass(frozen=True)
class SamplingDefaults:
    """Per-model sampling behaviour; lives in the preset, never in ``if name == ...``."""

    steps: int = 20
    guidance_scale: float = 4.5
    flow_shift: float = 3.0
    sampler: Literal["flow_dpm", "flow_euler"] = "flow_dpm"
    # How prompts are encoded: with the complex human instruction (SANA's Gemma models), and
    # padded to this many tokens. A model trained on bare captions (the Shapes model) turns
    # the instruction off; the caption length is a cost knob for cross-attention.
    instruction: bool = True
    max_sequence_length: int = 300
    # Encode each prompt twice and keep the second copy, whose tokens have seen the whole
    # prompt (``TextEncoder.encode``'s echo); only for a model trained that way.
    echo: bool = False

    def __post_init__(self) -> None:
        _require(
            isinstance(self.steps, int) and self.steps >= 1,
            f"SamplingDefaults.steps must be an int >= 1, got {self.steps!r}",
        )
        _require(
            math.isfinite(self.guidance_scale) and self.guidance_scale >= 0,
            f"SamplingDefaults.guidance_scale must be >= 0, got {self.guidance_scale!r}",
        )
        _require(
            math.isfinite(self.flow_shift) and self.flow_shift > 0,
            f"SamplingDefaults.flow_shift must be > 0, got {self.flow_shift!r}",
        )
        _require(
            self.sampler in ("flow_dpm", "flow_euler"),
            f"SamplingDefaults.sampler must be 'flow_dpm' or 'flow_euler', got {self.sampler!r}",
        )
        _require(
            isinstance(self.max_sequence_length, int) and self.max_sequence_length >= 1,
            "SamplingDefaults.max_sequence_length must be an int >= 1, "
            f"got {self.max_sequence_length!r}",
        )


@dataclass(frozen=True)
class DiTPreset:
    config: DiTConfig
    sampling: SamplingDefaults
    description: str


def replace(config: C, **changes: object) -> C:
    """``dataclasses.replace`` that re-runs validation (typed helper for overrides)."""
    return dataclasses.replace(config, **changes)  # type: ignore[type-var]


_SANA_06B = DiTConfig()
_SANA_16B = DiTConfig(
    hidden_size=2240, depth=20, num_heads=70, cross_num_heads=20, cross_head_dim=112
)

DIT_PRESETS: dict[str, DiTPreset] = {
    "sana-0.6b": DiTPreset(
        _SANA_06B,
        SamplingDefaults(flow_shift=3.0),
        "Sana 0.6B, 512/1024 px, no positional embedding",
    ),
    "sana-1.6b": DiTPreset(
        _SANA_16B, SamplingDefaults(flow_shift=3.0), "Sana 1.6B, 1024 px, no positional embedding"
    ),
    "sana-1.6b-2k": DiTPreset(
        replace(_SANA_16B, sample_size=64, interpolation_scale=1.0),
        SamplingDefaults(flow_shift=3.0),
        "Sana 1.6B at 2048 px: adds a 2-D sin-cos positional embedding",
    ),
    "sana-1.6b-4k": DiTPreset(
        replace(_SANA_16B, sample_size=128, interpolation_scale=2.0),
        SamplingDefaults(flow_shift=6.0),
        "Sana 1.6B at 4096 px: sin-cos positional embedding, interpolation scale 2",
    ),
    "sana-1.5-1.6b": DiTPreset(
        replace(_SANA_16B, qk_norm=True),
        SamplingDefaults(flow_shift=3.0),
        "Sana 1.5 1.6B: RMSNorm on q and k",
    ),
    "sana-1.5-4.8b": DiTPreset(
        replace(_SANA_16B, depth=60, qk_norm=True),
        SamplingDefaults(flow_shift=3.0),
        "Sana 1.5 4.8B: 60 blocks of width 2240, RMSNorm on q and k",
    ),
    "sana-sprint-0.6b": DiTPreset(
        replace(_SANA_06B, qk_norm=True, guidance_embeds=True),
        SamplingDefaults(steps=2, guidance_scale=4.5, flow_shift=3.0),
        "Sana-Sprint 0.6B: qk-norm and a guidance embedding (few-step distilled)",
    ),
    # Small configs for tests and for training our own models on a CPU.
    "sana-tiny": DiTPreset(
        DiTConfig(
            hidden_size=64,
            depth=2,
            num_heads=2,
            head_dim=32,
            cross_num_heads=2,
            cross_head_dim=32,
            caption_channels=64,
            sample_size=8,
        ),
        SamplingDefaults(),
        "2 blocks of width 64 (tests)",
    ),
    "sana-small": DiTPreset(
        DiTConfig(
            hidden_size=256,
            depth=8,
            num_heads=8,
            head_dim=32,
            cross_num_heads=4,
            cross_head_dim=64,
            caption_channels=256,
            sample_size=8,
        ),
        SamplingDefaults(),
        "8 blocks of width 256 (≈9M parameters; trainable on a CPU)",
    ),
}


def dit_preset(name: str) -> DiTPreset:
    try:
        return DIT_PRESETS[name]
    except KeyError:
        raise ValueError(
            f"unknown DiT preset {name!r}; choose one of {', '.join(DIT_PRESETS)}"
        ) from None


# --- DC-AE ---

AEBlockType = Literal["ResBlock", "EfficientViTBlock"]
AENormType = Literal["rms_norm", "batch_norm"]
AEActivation = Literal["silu", "relu"]
_AE_BLOCK_TYPES = ("ResBlock", "EfficientViTBlock")
_AE_NORM_TYPES = ("rms_norm", "batch_norm")
_AE_ACTIVATIONS = ("silu", "relu")


@dataclass(frozen=True)
class AutoencoderConfig:
    """DC-AE (deep-compression autoencoder), one entry per resolution stage.

    Stage ``i`` works at 1/2^i of the image size, so ``n`` stages compress by ``2^(n-1)``.
    Field names mirror the diffusers ``AutoencoderDC`` config (``checkpoints.autoencoder`` maps
    them); every per-stage field is a tuple of the same length. A depth of 0 is only allowed for
    stage 0: the encoder then starts with a downsampling conv and the decoder ends with an
    upsampling one (the ImageNet DC-AE checkpoints do this).
    """

    in_channels: int = 3
    latent_channels: int = 32
    head_dim: int = 32  # EfficientViT linear attention: heads = width // head_dim
    encoder_block_types: tuple[AEBlockType, ...] = ("ResBlock",) * 3 + ("EfficientViTBlock",) * 3
    decoder_block_types: tuple[AEBlockType, ...] = ("ResBlock",) * 3 + ("EfficientViTBlock",) * 3
    encoder_widths: tuple[int, ...] = (128, 256, 512, 512, 1024, 1024)
    decoder_widths: tuple[int, ...] = (128, 256, 512, 512, 1024, 1024)
    encoder_depths: tuple[int, ...] = (2, 2, 2, 3, 3, 3)
    decoder_depths: tuple[int, ...] = (3, 3, 3, 3, 3, 3)
    # Kernel sizes of the extra depthwise q/k/v branches of each EfficientViT stage ("multi-scale").
    encoder_qkv_multiscales: tuple[tuple[int, ...], ...] = ((), (), (), (5,), (5,), (5,))
    decoder_qkv_multiscales: tuple[tuple[int, ...], ...] = ((), (), (), (5,), (5,), (5,))
    downsample: Literal["conv", "pixel_unshuffle"] = "conv"  # strided conv or conv+unshuffle
    upsample: Literal["interpolate", "pixel_shuffle"] = (
        "interpolate"  # nearest+conv or conv+shuffle
    )
    # Per decoder stage (ResBlock norm/activation, attention output norm); None: RMSNorm/SiLU
    # everywhere (filled in by __post_init__, so configs compare equal either way).
    decoder_norm_types: tuple[AENormType, ...] | None = None
    decoder_act_fns: tuple[AEActivation, ...] | None = None
    encoder_out_shortcut: bool = True  # latent += channel-group mean of the last features
    decoder_in_shortcut: bool = True  # features += latent channels repeated
    decoder_out_act: AEActivation = "relu"  # between the final RMSNorm and the output conv
    scaling_factor: float = 0.41407  # the DiT sees latents * scaling_factor (unit variance)

    def __post_init__(self) -> None:
        for name in ("in_channels", "latent_channels", "head_dim"):
            value = getattr(self, name)
            _require(
                isinstance(value, int) and value > 0,
                f"AutoencoderConfig.{name} must be a positive int, got {value!r}",
            )
        stages = self.encoder_widths
        _require(
            isinstance(stages, tuple) and len(stages) >= 1,
            f"AutoencoderConfig.encoder_widths must be a non-empty tuple, got {stages!r}",
        )
        n = len(stages)
        # Frozen dataclass: fill the None defaults once, here, so equality stays field-wise.
        if self.decoder_norm_types is None:
            object.__setattr__(self, "decoder_norm_types", ("rms_norm",) * n)
        if self.decoder_act_fns is None:
            object.__setattr__(self, "decoder_act_fns", ("silu",) * n)
        per_stage = {
            "encoder_block_types": _AE_BLOCK_TYPES,
            "decoder_block_types": _AE_BLOCK_TYPES,
            "encoder_widths": None,
            "decoder_widths": None,
            "encoder_depths": None,
            "decoder_depths": None,
            "encoder_qkv_multiscales": None,
            "decoder_qkv_multiscales": None,
            "decoder_norm_types": _AE_NORM_TYPES,
            "decoder_act_fns": _AE_ACTIVATIONS,
        }
        for name, allowed in per_stage.items():
            value = getattr(self, name)
            _require(
                isinstance(value, tuple) and len(value) == n,
                f"AutoencoderConfig.{name} must be a tuple with one entry per stage "
                f"({n}, like encoder_widths), got {value!r}",
            )
            if allowed is not None:
                for v in value:
                    _require(
                        v in allowed, f"AutoencoderConfig.{name}: {v!r} is not one of {allowed}"
                    )
        for name in ("encoder_widths", "decoder_widths"):
            _require(
                all(isinstance(w, int) and w > 0 for w in getattr(self, name)),
                f"AutoencoderConfig.{name} must hold positive ints, got {getattr(self, name)!r}",
            )
        for name in ("encoder_depths", "decoder_depths"):
            depths = getattr(self, name)
            _require(
                all(isinstance(d, int) and d >= 0 for d in depths),
                f"AutoencoderConfig.{name} must hold ints >= 0, got {depths!r}",
            )
            _require(
                all(d > 0 for d in depths[1:]),
                f"AutoencoderConfig.{name}: only stage 0 may have depth 0 (a stage without "
                f"blocks also loses its resampling layer), got {depths!r}",
            )
            _require(
                n > 1 or depths[0] > 0,
                f"AutoencoderConfig.{name}: a single stage needs depth > 0, got {depths!r}",
            )
        for name in ("encoder_qkv_multiscales", "decoder_qkv_multiscales"):
            for scales in getattr(self, name):
                _require(
                    isinstance(scales, tuple)
                    and all(isinstance(k, int) and k > 0 and k % 2 == 1 for k in scales),
                    f"AutoencoderConfig.{name} entries must be tuples of odd positive "
                    f"kernel sizes, got {scales!r}",
                )
        _require(
            self.downsample in ("conv", "pixel_unshuffle"),
            f"AutoencoderConfig.downsample must be 'conv' or 'pixel_unshuffle', "
            f"got {self.downsample!r}",
        )
        _require(
            self.upsample in ("interpolate", "pixel_shuffle"),
            f"AutoencoderConfig.upsample must be 'interpolate' or 'pixel_shuffle', "
            f"got {self.upsample!r}",
        )
        _require(
            self.decoder_out_act in _AE_ACTIVATIONS,
            f"AutoencoderConfig.decoder_out_act must be one of {_AE_ACTIVATIONS}, "
            f"got {self.decoder_out_act!r}",
        )
        _require(
            isinstance(self.scaling_factor, (int, float)) and self.scaling_factor > 0,
            f"AutoencoderConfig.scaling_factor must be > 0, got {self.scaling_factor!r}",
        )
        self._check_channels(
            "encoder", self.encoder_widths, self.encoder_block_types, self.encoder_depths
        )
        self._check_channels(
            "decoder", self.decoder_widths, self.decoder_block_types, self.decoder_depths
        )

    def _check_channels(
        self, part: str, widths: tuple[int, ...], blocks: tuple[str, ...], depths: tuple[int, ...]
    ) -> None:
        """The space-to-channel shortcuts reshape channels, so widths must divide evenly."""
        for i, (width, block, depth) in enumerate(zip(widths, blocks, depths, strict=True)):
            _require(
                block != "EfficientViTBlock" or depth == 0 or width % self.head_dim == 0,
                f"AutoencoderConfig.{part}_widths[{i}] = {width} must be a multiple of "
                f"head_dim ({self.head_dim}) for an EfficientViT stage",
            )
        for i in range(len(widths) - 1):
            # Down: the shortcut averages groups of the 4*w[i] unshuffled channels into w[i+1].
            # Up: it repeats the w[i+1] channels into 4*w[i] before the pixel shuffle.
            _require(
                (4 * widths[i]) % widths[i + 1] == 0,
                f"AutoencoderConfig.{part}_widths: 4 * width[{i}] ({4 * widths[i]}) must be "
                f"a multiple of width[{i + 1}] ({widths[i + 1]}) for the space-to-channel "
                f"shortcut",
            )
            _require(
                part == "decoder" or self.downsample == "conv" or widths[i + 1] % 4 == 0,
                f"AutoencoderConfig.encoder_widths[{i + 1}] ({widths[i + 1]}) must be a "
                f"multiple of 4 with downsample='pixel_unshuffle'",
            )
        _require(
            widths[-1] % self.latent_channels == 0,
            f"AutoencoderConfig.{part}_widths[-1] ({widths[-1]}) must be a multiple of "
            f"latent_channels ({self.latent_channels}) for the latent shortcut",
        )

    @property
    def num_stages(self) -> int:
        return len(self.encoder_widths)

    @property
    def spatial_compression(self) -> int:
        """Image side / latent side (32 for the SANA autoencoder)."""
        return 2 ** (self.num_stages - 1)


_RES3_EVIT3: tuple[AEBlockType, ...] = ("ResBlock",) * 3 + ("EfficientViTBlock",) * 3
_DC_AE_SANA = AutoencoderConfig()


def _dc_ae_imagenet(stages: int, latent_channels: int, scaling_factor: float) -> AutoencoderConfig:
    """The ImageNet / mixed-data DC-AE family (f32c32, f64c128, f128c512)."""
    widths = (128, 256, 512, 512, 1024, 1024, 2048, 2048)[:stages]
    blocks: tuple[AEBlockType, ...] = ("ResBlock",) * 3 + ("EfficientViTBlock",) * (stages - 3)
    return AutoencoderConfig(
        latent_channels=latent_channels,
        encoder_block_types=blocks,
        decoder_block_types=blocks,
        encoder_widths=widths,
        decoder_widths=widths,
        encoder_depths=(0, 4, 8) + (2,) * (stages - 3),
        decoder_depths=(0, 5, 10) + (2,) * (stages - 3),
        encoder_qkv_multiscales=((),) * stages,
        decoder_qkv_multiscales=((),) * stages,
        downsample="pixel_unshuffle",
        upsample="pixel_shuffle",
        decoder_norm_types=("batch_norm",) * 3 + ("rms_norm",) * (stages - 3),
        decoder_act_fns=("relu",) * 3 + ("silu",) * (stages - 3),
        scaling_factor=scaling_factor,
    )


AE_PRESETS: dict[str, AutoencoderConfig] = {
    # SANA's autoencoder (312,250,275 parameters); 1.1 has the same architecture, retrained decoder.
    "dc-ae-f32c32-sana-1.0": _DC_AE_SANA,
    "dc-ae-f32c32-sana-1.1": _DC_AE_SANA,
    # The other released DC-AE checkpoints (scaling factors from their diffusers configs).
    "dc-ae-f32c32-in-1.0": _dc_ae_imagenet(6, 32, 0.3189),
    "dc-ae-f32c32-mix-1.0": _dc_ae_imagenet(6, 32, 0.4552),
    "dc-ae-f64c128-in-1.0": _dc_ae_imagenet(7, 128, 0.2889),
    "dc-ae-f64c128-mix-1.0": _dc_ae_imagenet(7, 128, 0.4538),
    "dc-ae-f128c512-in-1.0": _dc_ae_imagenet(8, 512, 0.4883),
    "dc-ae-f128c512-mix-1.0": _dc_ae_imagenet(8, 512, 0.3620),
    # SANA's architecture at 1/8 width, one block per stage (7,657,251 parameters): small enough
    # to train on a CPU. scaling_factor 1.0 until measured on the trained latents.
    "dc-ae-f32-small": AutoencoderConfig(
        encoder_widths=(16, 32, 64, 128, 256, 256),
        decoder_widths=(16, 32, 64, 128, 256, 256),
        encoder_depths=(1,) * 6,
        decoder_depths=(1,) * 6,
        scaling_factor=1.0,
    ),
    # A few thousand parameters, 32x compression and 32 latent channels like the real one, so
    # tests of anything that consumes latents (pipeline, training) run in milliseconds.
    "dc-ae-tiny": AutoencoderConfig(
        head_dim=8,
        encoder_block_types=_RES3_EVIT3,
        decoder_block_types=_RES3_EVIT3,
        encoder_widths=(8, 16, 16, 32, 32, 32),
        decoder_widths=(8, 16, 16, 32, 32, 32),
        encoder_depths=(1,) * 6,
        decoder_depths=(1,) * 6,
        scaling_factor=1.0,
    ),
}


def ae_preset(name: str) -> AutoencoderConfig:
    try:
        return AE_PRESETS[name]
    except KeyError:
        raise ValueError(
            f"unknown autoencoder preset {name!r}; choose one of {', '.join(AE_PRESETS)}"
        ) from None
