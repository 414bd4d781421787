"""The Linear DiT of SANA, read top to bottom like the paper's figure.

    latents ─ patchify ─▶ tokens ─▶ N × [ adaLN · ReLU linear self-attention
                                          + softmax cross-attention to the caption
                                          + adaLN · Mix-FFN ] ─▶ adaLN · linear ─ unpatchify ─▶ v

No positional embedding (the 3×3 depthwise conv in Mix-FFN carries position), except the
2K/4K checkpoints, which add a fixed 2-D sin-cos embedding. Module and parameter names follow
the diffusers checkpoint layout, so a diffusers state dict loads key-for-key.

Contract: ``model(x, t, text, text_mask, guidance=None) -> v`` with x (B, C, H, W), t (B,) in
[0, 1000], text (B, L, caption_channels), text_mask (B, L) bool or 0/1; returns x's shape in
the model's dtype.

Speed (see docs/benchmarks.md). Activations run in ``fastsana.runtime.matmul_dtype``: the
model's dtype, except half-precision models on CPUs without native half matmuls, which compute
in fp32 from their half-precision weights. Every module uses ``linear``, which casts the
weight to the activations' dtype (a no-op when they agree). Under ``torch.no_grad()`` the
blocks update their own temporaries in place instead of allocating (B, N, C) tensors; with
autograd on they take the out-of-place path (same maths, tested equal).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from fastsana.configs import DiTConfig
from fastsana.models.attention import (
    FP16_MAX,
    linear_attention,
    mask_to_bias,
    softmax_attention,
)
from fastsana.models.ops import depthwise_glu
from fastsana.runtime import matmul_dtype

TIMESTEP_CHANNELS = 256


# --------------------------------------------------------------------------- embeddings


def linear(x: Tensor, layer: nn.Module) -> Tensor:
    """``layer`` applied to the last dim of ``x`` (1×1 convs too), with its weights cast to
    x's dtype: lets half-precision weights feed fp32 activations without a model-wide copy.
    Quantised layers (``fastsana.quantize.W8A8Linear``, which hold ``qweight``) are called as
    they are; anything else with a ``weight`` (plain, parametrised or peft-wrapped layers) takes
    the float path, so LoRA's adapted weights are used."""
    if hasattr(layer, "qweight"):
        return layer(x)
    w = layer.weight.flatten(1) if layer.weight.dim() > 2 else layer.weight
    bias = None if layer.bias is None else layer.bias.to(x.dtype)
    return F.linear(x, w.to(x.dtype), bias)


def residual_add(x: Tensor, y: Tensor, gate: Tensor | None = None) -> Tensor:
    """x + gate·y (x + y without a gate); in place on x when autograd is off."""
    if torch.is_grad_enabled():
        return x + y if gate is None else torch.addcmul(x, gate, y)
    return x.add_(y) if gate is None else x.addcmul_(gate, y)


def modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    """adaLN: x·(1 + scale) + shift in one pass (in place on x when autograd is off)."""
    if torch.is_grad_enabled():
        return torch.addcmul(shift, x, 1 + scale)
    return torch.addcmul(shift, x, 1 + scale, out=x)


def timestep_sinusoid(t: Tensor, channels: int = TIMESTEP_CHANNELS) -> Tensor:
    """(B,) → (B, channels) as [cos, sin] at frequencies exp(−ln(10000)·i/half), in fp32."""
    half = channels // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=t.device) / half)  # (half,)
    angles = t.float()[:, None] * freqs[None]  # (B, half)
    return torch.cat([torch.cos(angles), torch.sin(angles)], dim=-1)  # (B, channels)


def sincos_pos_embed_2d(
    height: int, width: int, dim: int, base_size: int, scale: float, device: torch.device
) -> Tensor:
    """Fixed 2-D sin-cos embedding (1, H·W, dim) of the 2K/4K checkpoints.

    Positions are normalised to the training grid (``base_size`` tokens per side) and divided
    by ``scale``; the first half of the channels encodes the column, the second the row, each
    as [sin, cos] over dim/4 frequencies. Computed in fp64, like the reference.
    """
    cols = torch.arange(width, dtype=torch.float64, device=device) * (base_size / width) / scale
    rows = torch.arange(height, dtype=torch.float64, device=device) * (base_size / height) / scale
    row_grid, col_grid = torch.meshgrid(rows, cols, indexing="ij")  # (H, W) each
    quarter = dim // 4
    omega = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float64, device=device) / quarter)

    def encode(pos: Tensor) -> Tensor:
        angles = pos.reshape(-1, 1) * omega[None]  # (H·W, dim/4)
        return torch.cat([angles.sin(), angles.cos()], dim=1)  # (H·W, dim/2)

    emb = torch.cat([encode(col_grid), encode(row_grid)], dim=1)  # (H·W, dim)
    return emb.float()[None]  # (1, H·W, dim)


class MLPEmbedder(nn.Module):
    """Linear → SiLU → Linear (names ``linear_1``/``linear_2`` as in the checkpoints)."""

    def __init__(self, in_dim: int, hidden: int, act: nn.Module | None = None) -> None:
        super().__init__()
        self.linear_1 = nn.Linear(in_dim, hidden)
        self.act = act if act is not None else nn.SiLU()
        self.linear_2 = nn.Linear(hidden, hidden)

    def forward(self, x: Tensor) -> Tensor:
        return linear(self.act(linear(x, self.linear_1)), self.linear_2)


class TimestepConditioning(nn.Module):
    """adaLN-single: t (and, for Sprint, the guidance scale) → (t6 (B, 6C), temb (B, C)).

    One shared Linear(C, 6C) produces the modulation for every block; each block adds its own
    learned (6, C) table. The ``emb`` ModuleDict only reproduces the checkpoint key path
    ``time_embed.emb.timestep_embedder.*`` of the non-guidance models.
    """

    def __init__(self, hidden: int, guidance_embeds: bool) -> None:
        super().__init__()
        self.guidance_embeds = guidance_embeds
        if guidance_embeds:
            self.timestep_embedder = MLPEmbedder(TIMESTEP_CHANNELS, hidden)
            self.guidance_embedder = MLPEmbedder(TIMESTEP_CHANNELS, hidden)
        else:
            self.emb = nn.ModuleDict({"timestep_embedder": MLPEmbedder(TIMESTEP_CHANNELS, hidden)})
        self.linear = nn.Linear(hidden, 6 * hidden)

    def forward(
        self, t: Tensor, guidance: Tensor | None, dtype: torch.dtype
    ) -> tuple[Tensor, Tensor]:
        if self.guidance_embeds:
            if guidance is None:
                raise ValueError("this model has a guidance embedding: pass guidance=(B,) tensor")
            temb = self.timestep_embedder(timestep_sinusoid(t).to(dtype))  # (B, C)
            temb = temb + self.guidance_embedder(timestep_sinusoid(guidance).to(dtype))  # (B, C)
        else:
            temb = self.emb["timestep_embedder"](timestep_sinusoid(t).to(dtype))  # (B, C)
        return linear(F.silu(temb), self.linear), temb  # (B, 6C), (B, C)


class RMSNorm(nn.Module):
    """RMSNorm over the last dimension with a learnable scale; statistics in fp32."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        rms = torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + self.eps)  # (..., 1)
        return (x.float() * rms).to(x.dtype) * self.weight.to(x.dtype)  # (..., dim)


# ------------------------------------------------------------------------------- blocks


class SelfAttention(nn.Module):
    """Multi-head self-attention: ReLU linear (SANA) or softmax (ablation), same parameters."""

    def __init__(self, config: DiTConfig) -> None:
        super().__init__()
        c, heads = config.hidden_size, config.num_heads
        self.heads = heads
        self.softmax = config.self_attention == "softmax"
        self.to_q = nn.Linear(c, c, bias=config.attention_bias)
        self.to_k = nn.Linear(c, c, bias=config.attention_bias)
        self.to_v = nn.Linear(c, c, bias=config.attention_bias)
        if config.qk_norm:  # Sana 1.5: RMSNorm across all heads
            self.norm_q = RMSNorm(c, eps=1e-5)
            self.norm_k = RMSNorm(c, eps=1e-5)
        self.to_out = nn.ModuleList([nn.Linear(c, c)])  # ModuleList: checkpoint key "to_out.0"

    def forward(self, x: Tensor) -> Tensor:
        q, k, v = linear(x, self.to_q), linear(x, self.to_k), linear(x, self.to_v)  # (B, N, C)
        if hasattr(self, "norm_q"):
            q, k = self.norm_q(q), self.norm_k(k)  # (B, N, C)
        if self.softmax:
            out = softmax_attention(q, k, v, self.heads)  # (B, N, C)
        else:
            # q and k are this call's temporaries: ReLU may overwrite them when not training.
            inplace = not torch.is_grad_enabled()
            out = linear_attention(q, k, v, self.heads, inplace=inplace, out_dtype=x.dtype)
        out = linear(out, self.to_out[0])  # (B, N, C)
        if torch.float16 in (out.dtype, self.to_out[0].weight.dtype):
            # fp16 checkpoints rely on this clip, also when we compute in fp32 for them.
            out = out.clamp(-FP16_MAX, FP16_MAX)
        return out


class CrossAttention(nn.Module):
    """Softmax attention from image tokens to caption tokens; padded tokens masked out."""

    def __init__(self, config: DiTConfig) -> None:
        super().__init__()
        c = config.hidden_size
        inner = config.cross_num_heads * config.cross_head_dim
        self.heads = config.cross_num_heads
        self.to_q = nn.Linear(c, inner)
        self.to_k = nn.Linear(c, inner)
        self.to_v = nn.Linear(c, inner)
        if config.qk_norm:
            self.norm_q = RMSNorm(inner, eps=1e-5)
            self.norm_k = RMSNorm(inner, eps=1e-5)
        self.to_out = nn.ModuleList([nn.Linear(inner, c)])

    def project_text(self, text: Tensor) -> tuple[Tensor, Tensor]:
        """Keys and values of the caption (B, L, inner) each: the same at every sampling step,
        so ``SanaTransformer.prepare_text`` computes them once per image."""
        k, v = linear(text, self.to_k), linear(text, self.to_v)  # (B, L, inner)
        if hasattr(self, "norm_k"):
            k = self.norm_k(k)
        return k, v

    def forward(
        self, x: Tensor, text: Tensor | tuple[Tensor, Tensor], bias: Tensor | None
    ) -> Tensor:
        """``text``: the projected caption (B, L, C), or its keys and values from
        ``project_text`` (made once per image at inference)."""
        q = linear(x, self.to_q)  # (B, N, inner)
        if hasattr(self, "norm_q"):
            q = self.norm_q(q)
        # Projected here when not given: under FSDP a block's weights exist only in its forward.
        k, v = text if isinstance(text, tuple) else self.project_text(text)  # (B, L, inner) each
        out = softmax_attention(q, k, v, self.heads, bias)  # (B, N, inner)
        return linear(out, self.to_out[0])  # (B, N, C)


class MixFFN(nn.Module):
    """1×1 conv → SiLU → 3×3 depthwise conv → GLU → 1×1 conv (``GLUMBConv``).

    The 1×1 convs are applied as linear layers on tokens, and the depthwise conv runs on a
    channels-last view of the same memory, so no transposed copies of the activations are made.
    The Conv2d modules are kept for the checkpoint's parameter shapes.
    """

    def __init__(self, config: DiTConfig) -> None:
        super().__init__()
        c, hidden = config.hidden_size, config.ffn_hidden
        self.conv_inverted = nn.Conv2d(c, 2 * hidden, 1)
        self.conv_depth = nn.Conv2d(2 * hidden, 2 * hidden, 3, padding=1, groups=2 * hidden)
        self.conv_point = nn.Conv2d(hidden, c, 1, bias=False)

    def forward(self, x: Tensor, height: int, width: int) -> Tensor:
        b, n, _ = x.shape
        x = linear(x, self.conv_inverted)  # (B, N, 2h)
        x = x.view(b, height, width, -1).permute(0, 3, 1, 2)  # (B, 2h, H, W) channels-last
        x = depthwise_glu(self.conv_depth, x, silu_input=True)  # (B, h, H, W) channels-last
        return linear(x.permute(0, 2, 3, 1).reshape(b, n, -1), self.conv_point)  # (B, N, C)


class SanaBlock(nn.Module):
    def __init__(self, config: DiTConfig) -> None:
        super().__init__()
        self.eps = config.norm_eps
        self.attn1 = SelfAttention(config)
        self.attn2 = CrossAttention(config)
        self.ff = MixFFN(config)
        self.scale_shift_table = nn.Parameter(torch.zeros(6, config.hidden_size))

    def forward(
        self,
        x: Tensor,
        t6: Tensor,
        text: Tensor | tuple[Tensor, Tensor],
        text_bias: Tensor | None,
        height: int,
        width: int,
    ) -> Tensor:
        b, _, c = x.shape
        mod = (self.scale_shift_table[None] + t6.view(b, 6, c)).to(x.dtype)  # (B, 6, C)
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = mod[:, :, None].unbind(1)
        h = modulate(F.layer_norm(x, (c,), eps=self.eps), shift_msa, scale_msa)  # (B, N, C)
        # The first residual makes a new tensor; the later ones may then update it in place
        # (never the caller's x).
        x = torch.addcmul(x, gate_msa, self.attn1(h))  # (B, N, C)
        x = residual_add(x, self.attn2(x, text, text_bias))  # (B, N, C)
        h = modulate(F.layer_norm(x, (c,), eps=self.eps), shift_mlp, scale_mlp)  # (B, N, C)
        return residual_add(x, self.ff(h, height, width), gate_mlp)  # (B, N, C)


# -------------------------------------------------------------------------------- model


@dataclass(frozen=True)
class TextContext:
    """The caption as the blocks' cross-attention reads it: per block, keys and values
    (B, L, inner) each, and the mask as an additive bias (B, 1, 1, L). Made by
    ``SanaTransformer.prepare_text``; passing it as ``text`` skips the caption projection and
    the K/V products, which do not change between sampling steps."""

    kv: tuple[tuple[Tensor, Tensor], ...]
    bias: Tensor | None

    @property
    def batch(self) -> int:
        return self.kv[0][0].shape[0]


class PatchEmbed(nn.Module):
    def __init__(self, config: DiTConfig) -> None:
        super().__init__()
        p = config.patch_size
        self.proj = nn.Conv2d(config.in_channels, config.hidden_size, p, stride=p)

    def forward(self, x: Tensor) -> Tensor:
        b, c, h, w = x.shape
        p = self.proj.stride[0]
        # Patches as token rows in the (c, py, px) order of the conv weight: one GEMM whose
        # output is already (B, N, C) contiguous, instead of a conv and a transposed copy.
        x = x.view(b, c, h // p, p, w // p, p).permute(0, 2, 4, 1, 3, 5)  # (B, gh, gw, c, p, p)
        return linear(x.reshape(b, (h // p) * (w // p), c * p * p), self.proj)  # (B, N, C)


class SanaTransformer(nn.Module):
    """The Linear DiT. See the module docstring for the contract."""

    def __init__(self, config: DiTConfig) -> None:
        super().__init__()
        self.config = config
        c = config.hidden_size
        self.patch_embed = PatchEmbed(config)
        self.time_embed = TimestepConditioning(c, config.guidance_embeds)
        self.caption_projection = MLPEmbedder(
            config.caption_channels, c, act=nn.GELU(approximate="tanh")
        )
        self.caption_norm = RMSNorm(c, eps=1e-5)
        self.transformer_blocks = nn.ModuleList(SanaBlock(config) for _ in range(config.depth))
        self.scale_shift_table = nn.Parameter(torch.zeros(2, c))
        self.proj_out = nn.Linear(c, config.patch_size**2 * config.out_channels)
        self.gradient_checkpointing = False
        if not any(p.is_meta for p in self.parameters()):
            initialize_weights(self)

    @property
    def dtype(self) -> torch.dtype:
        return self.proj_out.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.proj_out.weight.device

    def forward(
        self,
        x: Tensor,
        t: Tensor | float,
        text: Tensor | TextContext,
        text_mask: Tensor | None = None,
        guidance: Tensor | None = None,
    ) -> Tensor:
        cfg, dtype = self.config, self.dtype
        work = matmul_dtype(x.device, dtype)  # activations' dtype (see the module docstring)
        b, _, height, width = x.shape
        p = cfg.patch_size
        self._check_inputs(x, text, text_mask)
        if isinstance(text, TextContext):  # the caption's K/V, made once per image
            per_block, text_bias = text.kv, text.bias
        else:  # each block projects the caption itself
            text, text_bias = self._embed_caption(text, text_mask)  # (B, L, C), (B, 1, 1, L)
            per_block = (text,) * cfg.depth
        gh, gw = height // p, width // p
        t = torch.as_tensor(t, device=x.device, dtype=torch.float32).expand(b)  # (B,)
        if guidance is not None:
            guidance = torch.as_tensor(guidance, device=x.device, dtype=torch.float32).expand(b)

        tokens = self.patch_embed(x.to(work))  # (B, N, C)
        if cfg.interpolation_scale is not None:
            pos = sincos_pos_embed_2d(
                gh, gw, cfg.hidden_size, cfg.sample_size // p, cfg.interpolation_scale, x.device
            )  # (1, N, C)
            tokens = (tokens + pos).to(work)  # (B, N, C)
        t6, temb = self.time_embed(t, guidance, work)  # (B, 6C), (B, C)

        for block, block_text in zip(self.transformer_blocks, per_block, strict=True):
            if self.gradient_checkpointing and torch.is_grad_enabled():
                tokens = checkpoint(
                    block, tokens, t6, block_text, text_bias, gh, gw, use_reentrant=False
                )  # (B, N, C)
            else:
                tokens = block(tokens, t6, block_text, text_bias, gh, gw)  # (B, N, C)

        table = (self.scale_shift_table[None] + temb[:, None]).to(work)  # (B, 2, C)
        shift, scale = table[:, :, None].unbind(1)  # (B, 1, C) each
        tokens = modulate(F.layer_norm(tokens, (cfg.hidden_size,), eps=1e-6), shift, scale)
        out = linear(tokens, self.proj_out)  # (B, N, p·p·C_out)
        out = out.view(b, gh, gw, p, p, cfg.out_channels)  # (B, gh, gw, p, p, C_out)
        out = out.permute(0, 5, 1, 3, 2, 4).reshape(b, cfg.out_channels, height, width)
        return out.to(dtype)  # (B, C_out, H, W)

    def prepare_text(self, text: Tensor, text_mask: Tensor | None = None) -> TextContext:
        """Caption features (B, L, caption_channels) and mask → every block's cross-attention
        keys and values. ``model(x, t, model.prepare_text(text, mask))`` equals
        ``model(x, t, text, mask)``; a sampler reuses the context at every step."""
        text, bias = self._embed_caption(text, text_mask)  # (B, L, C), (B, 1, 1, L) or None
        kv = tuple(block.attn2.project_text(text) for block in self.transformer_blocks)
        return TextContext(kv, bias)

    def _embed_caption(self, text: Tensor, mask: Tensor | None) -> tuple[Tensor, Tensor | None]:
        work = matmul_dtype(text.device, self.dtype)
        text = self.caption_norm(self.caption_projection(text.to(work)))  # (B, L, C)
        return text, mask_to_bias(mask, work)  # bias (B, 1, 1, L) or None

    def _check_inputs(self, x: Tensor, text: Tensor | TextContext, text_mask: Tensor | None):
        cfg = self.config
        if isinstance(text, TextContext):
            if text_mask is not None:
                raise ValueError("text_mask must be None when text is a TextContext (it has one)")
            if text.batch != x.shape[0] or len(text.kv) != cfg.depth:
                raise ValueError(
                    f"this TextContext has batch {text.batch} and {len(text.kv)} blocks; x has "
                    f"batch {x.shape[0]} and the model {cfg.depth} blocks"
                )
            return
        if x.dim() != 4 or x.shape[1] != cfg.in_channels:
            raise ValueError(
                f"x must have shape (B, {cfg.in_channels}, H, W), got {tuple(x.shape)}"
            )
        if x.shape[2] % cfg.patch_size or x.shape[3] % cfg.patch_size:
            raise ValueError(
                f"x's height and width ({x.shape[2]}×{x.shape[3]}) must be divisible by the "
                f"patch size {cfg.patch_size}"
            )
        if text.dim() != 3 or text.shape[0] != x.shape[0] or text.shape[2] != cfg.caption_channels:
            raise ValueError(
                f"text must have shape ({x.shape[0]}, L, {cfg.caption_channels}), "
                f"got {tuple(text.shape)}"
            )
        if text_mask is not None and tuple(text_mask.shape) != tuple(text.shape[:2]):
            raise ValueError(
                f"text_mask must have shape {tuple(text.shape[:2])}, got {tuple(text_mask.shape)}"
            )

    def enable_gradient_checkpointing(self, enabled: bool = True) -> None:
        """Recompute each block in the backward pass: activation memory O(1 block)."""
        self.gradient_checkpointing = enabled


@torch.no_grad()
def initialize_weights(model: SanaTransformer) -> None:
    """All initialisation in one place (for training from scratch; loading overwrites it)."""
    c = model.config.hidden_size
    for module in model.modules():
        # Linear layers: Xavier, zero bias — the DiT recipe; keeps activations O(1) at init.
        if isinstance(module, nn.Linear):
            nn.init.xavier_uniform_(module.weight)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
    # The patch embedding is a linear map of each patch: Xavier on its flattened weight.
    w = model.patch_embed.proj.weight
    nn.init.xavier_uniform_(w.view(w.shape[0], -1))
    nn.init.zeros_(model.patch_embed.proj.bias)
    # Conditioning MLPs: small normal init (DiT/PixArt) so t and text start as gentle signals.
    for name, module in model.named_modules():
        if name.startswith(("time_embed", "caption_projection")) and isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, std=0.02)
    # LLM features have large, uneven magnitudes; a 0.01 scale on the normed caption keeps
    # cross-attention from dominating early training (the paper's stabilising trick).
    nn.init.constant_(model.caption_norm.weight, 0.01)
    # Modulation tables start as small random offsets around the shared adaLN output.
    for block in model.transformer_blocks:
        block.scale_shift_table.copy_(torch.randn(6, c) / c**0.5)
        # Zero cross-attention output: each block starts as an unconditional block.
        nn.init.zeros_(block.attn2.to_out[0].weight)
        nn.init.zeros_(block.attn2.to_out[0].bias)
    model.scale_shift_table.copy_(torch.randn(2, c) / c**0.5)
    # Zero output projection: the initial prediction is v = 0, the stable starting point.
    nn.init.zeros_(model.proj_out.weight)
    nn.init.zeros_(model.proj_out.bias)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
