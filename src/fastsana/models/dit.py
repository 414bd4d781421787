"""The Linear DiT of SANA, read top to bottom like the paper's figure.

    latents ─ patchify ─▶ tokens ─▶ N × [ adaLN · ReLU linear self-attention
                                          + softmax cross-attention to the caption
                                          + adaLN · Mix-FFN ] ─▶ adaLN · linear ─ unpatchify ─▶ v

No positional embedding (the 3×3 depthwise conv in Mix-FFN carries position), except the
2K/4K checkpoints, which add a fixed 2-D sin-cos embedding. Module and parameter names follow
the diffusers checkpoint layout, so a diffusers state dict loads key-for-key.

Contract: ``model(x, t, text, text_mask, guidance=None) -> v`` with x (B, C, H, W), t (B,) in
[0, 1000], text (B, L, caption_channels), text_mask (B, L) bool or 0/1; returns x's shape.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from fastsana.configs import DiTConfig
from fastsana.models.attention import (
    FP16_MAX,
    mask_to_bias,
    relu_linear_attention,
    softmax_attention,
)

TIMESTEP_CHANNELS = 256


# --------------------------------------------------------------------------- embeddings


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
        return self.linear_2(self.act(self.linear_1(x)))


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
        return self.linear(F.silu(temb)), temb  # (B, 6C), (B, C)


class RMSNorm(nn.Module):
    """RMSNorm over the last dimension with a learnable scale; statistics in fp32."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        rms = torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + self.eps)  # (..., 1)
        return (x.float() * rms).to(self.weight.dtype) * self.weight  # (..., dim)


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
        q, k, v = self.to_q(x), self.to_k(x), self.to_v(x)  # (B, N, C) each
        if hasattr(self, "norm_q"):
            q, k = self.norm_q(q), self.norm_k(k)  # (B, N, C)
        if self.softmax:
            out = softmax_attention(q, k, v, self.heads)  # (B, N, C)
        else:
            out = relu_linear_attention(q, k, v, self.heads)  # (B, N, C) fp32
        out = self.to_out[0](out.to(x.dtype))  # (B, N, C)
        if out.dtype == torch.float16:
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

    def forward(self, x: Tensor, text: Tensor, bias: Tensor | None) -> Tensor:
        q = self.to_q(x)  # (B, N, inner)
        k, v = self.to_k(text), self.to_v(text)  # (B, L, inner)
        if hasattr(self, "norm_q"):
            q, k = self.norm_q(q), self.norm_k(k)
        out = softmax_attention(q, k, v, self.heads, bias)  # (B, N, inner)
        return self.to_out[0](out)  # (B, N, C)


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
        w_in, w_out = self.conv_inverted.weight, self.conv_point.weight
        x = F.silu(F.linear(x, w_in.flatten(1), self.conv_inverted.bias))  # (B, N, 2h)
        x = x.view(b, height, width, -1).permute(0, 3, 1, 2)  # (B, 2h, H, W) channels-last
        x = self._depthwise(x).permute(0, 2, 3, 1)  # (B, H, W, 2h)
        a, gate = x.chunk(2, dim=-1)  # (B, H, W, h) each
        x = (a * F.silu(gate)).reshape(b, n, -1)  # (B, N, h)
        return F.linear(x, w_out.flatten(1))  # (B, N, C)

    def _depthwise(self, x: Tensor) -> Tensor:
        conv = self.conv_depth
        if x.device.type == "cpu" and x.dtype != torch.float32:
            # PyTorch's CPU depthwise conv has no fast half-precision kernel (it falls back to
            # one slow conv per channel, ~100× slower); in fp32 on channels-last it is fast.
            w, bias = conv.weight.float(), conv.bias.float()
            return F.conv2d(x.float(), w, bias, padding=1, groups=conv.groups).to(x.dtype)
        return conv(x)


class SanaBlock(nn.Module):
    def __init__(self, config: DiTConfig) -> None:
        super().__init__()
        self.eps = config.norm_eps
        self.attn1 = SelfAttention(config)
        self.attn2 = CrossAttention(config)
        self.ff = MixFFN(config)
        self.scale_shift_table = nn.Parameter(torch.zeros(6, config.hidden_size))

    def forward(
        self, x: Tensor, t6: Tensor, text: Tensor, text_bias: Tensor | None, height: int, width: int
    ) -> Tensor:
        b, _, c = x.shape
        mod = self.scale_shift_table[None] + t6.view(b, 6, c)  # (B, 6, C)
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = mod[:, :, None].unbind(1)
        h = F.layer_norm(x, (c,), eps=self.eps) * (1 + scale_msa) + shift_msa  # (B, N, C)
        x = x + gate_msa * self.attn1(h.to(x.dtype))  # (B, N, C)
        x = x + self.attn2(x, text, text_bias)  # (B, N, C)
        h = F.layer_norm(x, (c,), eps=self.eps) * (1 + scale_mlp) + shift_mlp  # (B, N, C)
        return x + gate_mlp * self.ff(h.to(x.dtype), height, width)  # (B, N, C)


# -------------------------------------------------------------------------------- model


class PatchEmbed(nn.Module):
    def __init__(self, config: DiTConfig) -> None:
        super().__init__()
        p = config.patch_size
        self.proj = nn.Conv2d(config.in_channels, config.hidden_size, p, stride=p)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)  # (B, N, C)


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
        text: Tensor,
        text_mask: Tensor | None = None,
        guidance: Tensor | None = None,
    ) -> Tensor:
        cfg, dtype = self.config, self.dtype
        b, _, height, width = x.shape
        p = cfg.patch_size
        self._check_inputs(x, text, text_mask)
        gh, gw = height // p, width // p
        t = torch.as_tensor(t, device=x.device, dtype=torch.float32).expand(b)  # (B,)
        if guidance is not None:
            guidance = torch.as_tensor(guidance, device=x.device, dtype=torch.float32).expand(b)

        tokens = self.patch_embed(x.to(dtype))  # (B, N, C)
        if cfg.interpolation_scale is not None:
            pos = sincos_pos_embed_2d(
                gh, gw, cfg.hidden_size, cfg.sample_size // p, cfg.interpolation_scale, x.device
            )  # (1, N, C)
            tokens = (tokens + pos).to(dtype)  # (B, N, C)
        t6, temb = self.time_embed(t, guidance, dtype)  # (B, 6C), (B, C)
        text = self.caption_norm(self.caption_projection(text.to(dtype)))  # (B, L, C)
        text_bias = mask_to_bias(text_mask, dtype)  # (B, 1, 1, L) or None

        for block in self.transformer_blocks:
            if self.gradient_checkpointing and torch.is_grad_enabled():
                tokens = checkpoint(
                    block, tokens, t6, text, text_bias, gh, gw, use_reentrant=False
                )  # (B, N, C)
            else:
                tokens = block(tokens, t6, text, text_bias, gh, gw)  # (B, N, C)

        shift, scale = (self.scale_shift_table[None] + temb[:, None]).unbind(1)  # (B, C) each
        tokens = F.layer_norm(tokens, (cfg.hidden_size,), eps=1e-6)  # (B, N, C)
        tokens = tokens * (1 + scale[:, None]) + shift[:, None]  # (B, N, C)
        out = self.proj_out(tokens.to(dtype))  # (B, N, p·p·C_out)
        out = out.view(b, gh, gw, p, p, cfg.out_channels)  # (B, gh, gw, p, p, C_out)
        return out.permute(0, 5, 1, 3, 2, 4).reshape(b, cfg.out_channels, height, width)

    def _check_inputs(self, x: Tensor, text: Tensor, text_mask: Tensor | None) -> None:
        cfg = self.config
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
