"""The models under test: ours and diffusers', built from one config with the same random
weights, and the inputs they are fed.

Models are built on the meta device and materialised with ``to_empty`` (no wasted default
init), then every parameter is drawn from a seeded generator, so two processes that build the
same config get the same weights.
"""

from __future__ import annotations

import dataclasses
import logging

import torch
from torch import Tensor, nn

from fastsana.checkpoints.autoencoder import config_to_diffusers as ae_config_to_diffusers
from fastsana.checkpoints.transformer import config_to_diffusers as dit_config_to_diffusers
from fastsana.configs import AutoencoderConfig, DiTConfig, ae_preset, dit_preset
from fastsana.models.dcae import DCAE
from fastsana.models.dit import SanaTransformer

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
DIT_MODELS = ("sana-0.6b", "sana-1.6b")
AE_MODEL = "dc-ae-f32c32-sana-1.0"
TEXT_TOKENS = 300  # SANA's caption length (with the complex human instruction)
AE_FACTOR = 32  # DC-AE f32: pixels per latent cell


def quiet_diffusers() -> None:
    """diffusers warns on every ``.to(bf16)``; the warning is about loading, not speed."""
    logging.getLogger("diffusers").setLevel(logging.ERROR)
    try:
        from diffusers.utils import logging as dlogging

        dlogging.set_verbosity_error()
    except ImportError:
        pass


@torch.no_grad()
def randomize_(model: nn.Module, seed: int) -> None:
    """Weights ~ N(0, 1/fan_in) (activations stay O(1) through the depth), vectors ~ N(0, 0.02²)
    plus 1 for norm scales. Drawn in fp32 per tensor, so the result is the same in any dtype."""
    g = torch.Generator().manual_seed(seed)
    for name, p in sorted(model.named_parameters()):
        if p.dim() >= 2:
            fan_in = p[0].numel()
            value = torch.randn(p.shape, generator=g) / fan_in**0.5
        else:
            value = torch.randn(p.shape, generator=g) * 0.02
            if "norm" in name:
                value += 1.0
        p.copy_(value)


def _materialise(model: nn.Module, dtype: torch.dtype, device: str, seed: int) -> nn.Module:
    model = model.to_empty(device=device).to(dtype)
    randomize_(model, seed)
    return model.eval().requires_grad_(False)


def dit_config(name: str, depth: int | None = None, attention: str = "linear") -> DiTConfig:
    config = dit_preset(name).config
    changes: dict[str, object] = {"self_attention": attention}
    if depth is not None:
        changes["depth"] = depth
    return dataclasses.replace(config, **changes)


def diffusers_dit_kwargs(config: DiTConfig) -> dict[str, object]:
    raw = dit_config_to_diffusers(config)
    return {k: v for k, v in raw.items() if not k.startswith("_") and k != "self_attention"}


def build_dit(
    config: DiTConfig, which: str, dtype: torch.dtype, device: str = "cpu", seed: int = 0
) -> nn.Module:
    """``which``: "ours" or "diffusers"; same seed → same weights (identical key names)."""
    return _build(
        which,
        lambda: SanaTransformer(config),
        lambda d: d.SanaTransformer2DModel(**diffusers_dit_kwargs(config)),
        dtype,
        device,
        seed,
    )


def ae_config() -> AutoencoderConfig:
    return ae_preset(AE_MODEL)


def build_dcae(
    config: AutoencoderConfig, which: str, dtype: torch.dtype, device: str = "cpu", seed: int = 0
) -> nn.Module:
    raw = {k: v for k, v in ae_config_to_diffusers(config).items() if not k.startswith("_")}
    return _build(
        which, lambda: DCAE(config), lambda d: d.AutoencoderDC(**raw), dtype, device, seed
    )


def _build(which, ours, theirs, dtype: torch.dtype, device: str, seed: int) -> nn.Module:
    """Build ``ours()`` or ``theirs(diffusers)`` on the meta device, then random weights."""
    if which not in ("ours", "diffusers"):
        raise ValueError(f"which must be 'ours' or 'diffusers', got {which!r}")
    if which == "diffusers":
        import diffusers

        quiet_diffusers()
    with torch.device("meta"):
        model = ours() if which == "ours" else theirs(diffusers)
    return _materialise(model, dtype, device, seed)


# ------------------------------------------------------------------------------- inputs


@dataclasses.dataclass(frozen=True)
class DiTInputs:
    x: Tensor  # (B, 32, h, w) fp32
    t: Tensor  # (B,)
    text: Tensor  # (B, 300, caption_channels) fp32
    mask: Tensor  # (B, 300) int64, all ones


def dit_inputs(
    config: DiTConfig, pixels: int, batch: int = 1, device: str = "cpu", seed: int = 0
) -> DiTInputs:
    g = torch.Generator().manual_seed(seed)
    side = pixels // AE_FACTOR
    return DiTInputs(
        x=torch.randn(batch, config.in_channels, side, side, generator=g).to(device),
        t=torch.full((batch,), 500.0, device=device),
        text=torch.randn(batch, TEXT_TOKENS, config.caption_channels, generator=g).to(device),
        mask=torch.ones(batch, TEXT_TOKENS, dtype=torch.long, device=device),
    )


def dit_call(model: nn.Module, which: str, inputs: DiTInputs, dtype: torch.dtype):
    """A no-argument callable running one forward in the implementation's own calling style."""
    if which == "ours":
        return lambda: model(inputs.x, inputs.t, inputs.text, inputs.mask)
    x, text = inputs.x.to(dtype), inputs.text.to(dtype)
    return lambda: model(
        x, encoder_hidden_states=text, timestep=inputs.t,
        encoder_attention_mask=inputs.mask, return_dict=False,
    )[0]  # fmt: skip
