"""DC-AE: the deep-compression autoencoder that SANA works in (Chen et al. 2024, arXiv 2410.10733).

A convolutional encoder maps an image (B, 3, H, W) in [-1, 1] to a deterministic latent
(B, c, H/f, W/f) (f = 32, c = 32 for SANA) and a decoder maps it back. Every resolution change
has a parameter-free "space-to-channel" shortcut next to its conv (pixel-unshuffle and average
channel groups going down, repeat channels and pixel-shuffle going up), so each layer only
learns a residual. The low-resolution stages use EfficientViT blocks: multi-scale ReLU linear
attention (global over the whole image, O(N) cost) followed by a gated depthwise-conv MLP.

Module and parameter names follow diffusers' ``AutoencoderDC`` key for key, so one of its
state dicts loads with a plain strict ``load_state_dict`` (``fastsana.checkpoints.autoencoder``).

Large images: ``encode``/``decode`` can run on overlapping tiles, one tile at a time, written
into a preallocated output with linear cross-fades over the overlaps (see ``TilingConfig``).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint
from tqdm.auto import tqdm

from fastsana.configs import AutoencoderConfig
from fastsana.models.ops import depthwise_glu, grouped_conv2d
from fastsana.runtime import matmul_dtype, use_triton

# The reference's linear-attention denominator guard; any tiny value gives the same result.
ATTENTION_EPS = 1e-15
NORM_EPS = 1e-5


class Conv2d(nn.Conv2d):
    """``nn.Conv2d`` computing in its input's dtype: half-precision weights are widened per
    call when the activations are fp32 (see ``DCAE.compute_dtype``); a no-op otherwise."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.to(x.dtype)
        weight = self.weight.to(x.dtype)
        return F.conv2d(x, weight, bias, self.stride, self.padding, self.dilation, self.groups)


class BatchNorm2d(nn.BatchNorm2d):
    """``nn.BatchNorm2d`` that, in eval mode, also accepts activations wider than its weights."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training or x.dtype == self.weight.dtype:
            return super().forward(x)
        stats = [t.to(x.dtype) for t in (self.running_mean, self.running_var)]
        affine = [t.to(x.dtype) for t in (self.weight, self.bias)]
        return F.batch_norm(x, *stats, *affine, False, 0.0, self.eps)  # (B, C, H, W)


class ChannelRMSNorm(nn.Module):
    """RMSNorm over the channel axis of a (B, C, H, W) map, with a learned scale and shift."""

    def __init__(self, channels: int, eps: float = NORM_EPS) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.empty(channels))
        self.bias = nn.Parameter(torch.empty(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()  # (B, C, H, W); statistics in fp32 as in the reference
        inv_rms = torch.rsqrt(xf.square().mean(dim=1, keepdim=True) + self.eps)  # (B, 1, H, W)
        dtype = torch.promote_types(x.dtype, self.weight.dtype)  # the reference's output dtype
        y = (xf * inv_rms).to(dtype)  # (B, C, H, W)
        weight, bias = self.weight.to(dtype)[:, None, None], self.bias.to(dtype)[:, None, None]
        return torch.addcmul(bias, y, weight)  # (B, C, H, W)


def _norm(kind: str, channels: int) -> nn.Module:
    if kind == "rms_norm":
        return ChannelRMSNorm(channels)
    if kind == "batch_norm":
        return BatchNorm2d(channels, eps=NORM_EPS)
    raise ValueError(f"unknown norm type {kind!r}; expected 'rms_norm' or 'batch_norm'")


def _activation(kind: str) -> nn.Module:
    if kind == "silu":
        return nn.SiLU()
    if kind == "relu":
        return nn.ReLU()
    raise ValueError(f"unknown activation {kind!r}; expected 'silu' or 'relu'")


class ResBlock(nn.Module):
    """x + norm(conv3x3(act(conv3x3(x))))."""

    def __init__(self, channels: int, norm: str, act: str) -> None:
        super().__init__()
        self.conv1 = Conv2d(channels, channels, 3, padding=1)
        self.act = _activation(act)
        self.conv2 = Conv2d(channels, channels, 3, padding=1, bias=False)
        self.norm = _norm(norm, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.act(self.conv1(x))  # (B, C, H, W)
        h = self.conv2(h)  # (B, C, H, W)
        return x + self.norm(h)  # (B, C, H, W)


class MultiscaleProjection(nn.Module):
    """An extra q/k/v branch: depthwise k×k conv, then a 1×1 conv within groups of head_dim."""

    def __init__(self, qkv_channels: int, groups: int, kernel_size: int) -> None:
        super().__init__()
        self.proj_in = Conv2d(
            qkv_channels,
            qkv_channels,
            kernel_size,
            padding=kernel_size // 2,
            groups=qkv_channels,
            bias=False,
        )
        self.proj_out = Conv2d(qkv_channels, qkv_channels, 1, groups=groups, bias=False)

    def forward(self, qkv: torch.Tensor) -> torch.Tensor:
        return grouped_conv2d(self.proj_out, grouped_conv2d(self.proj_in, qkv))  # (B, 3I, H, W)


class MultiscaleLinearAttention(nn.Module):
    """x + norm(out(ReLU linear attention over [qkv, multi-scale branches of qkv])).

    The q/k/v projections are stored as three matrices (diffusers' layout) but applied as one
    1×1 conv. Channel layout after concatenation is [q | k | v] per branch; the reference
    reshapes it to (groups, 3·head_dim) and splits each group into q, k, v, so "heads" here are
    consecutive 3·head_dim channel slices of that concatenation. We keep that exact layout
    because released weights depend on it.
    """

    def __init__(self, channels: int, head_dim: int, kernel_sizes: tuple[int, ...], norm: str):
        super().__init__()
        self.head_dim = head_dim
        heads = channels // head_dim
        inner = heads * head_dim
        self.to_q = nn.Linear(channels, inner, bias=False)
        self.to_k = nn.Linear(channels, inner, bias=False)
        self.to_v = nn.Linear(channels, inner, bias=False)
        self.to_qkv_multiscale = nn.ModuleList(
            MultiscaleProjection(3 * inner, 3 * heads, k) for k in kernel_sizes
        )
        self.to_out = nn.Linear(inner * (1 + len(kernel_sizes)), channels, bias=False)
        self.norm_out = _norm(norm, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, _, h, w = x.shape
        n = h * w
        w_qkv = torch.cat([self.to_q.weight, self.to_k.weight, self.to_v.weight]).to(x.dtype)
        qkv = F.conv2d(x, w_qkv[:, :, None, None])  # (B, 3I, H, W); w_qkv is (3I, C)
        branches = [qkv, *(ms(qkv) for ms in self.to_qkv_multiscale)]  # S maps (B, 3I, H, W)
        qkv = torch.cat(branches, dim=1)  # (B, 3I·S, H, W)
        # The reference switches to the N×N form when the map has no more pixels than head_dim
        # (cheaper there) and computes only the linear form in fp32; we follow it for parity.
        linear = n > self.head_dim
        if linear and use_triton(x.device):  # reads qkv as is, sums in fp32, writes x.dtype
            from fastsana.kernels import relu_linear_attention as relu_linear_attention_kernel

            q, k, v = qkv.reshape(b, -1, 3 * self.head_dim, n).split(self.head_dim, dim=2)
            out = torch.empty_like(q, dtype=x.dtype, memory_format=torch.contiguous_format)
            tokens = [t.transpose(-1, -2) for t in (q, k, v, out)]  # (B, G, N, d) views
            relu_linear_attention_kernel(*tokens, eps=ATTENTION_EPS)
        else:
            if linear:
                qkv = qkv.float()  # (B, 3I·S, H, W)
            qkv = qkv.reshape(b, -1, 3 * self.head_dim, n)  # (B, G, 3d, N)
            q, k, v = qkv.split(self.head_dim, dim=2)  # each (B, G, d, N)
            q, k = F.relu(q), F.relu(k)  # (B, G, d, N)
            with torch.autocast(x.device.type, enabled=False):  # keep the fp32 kernel fp32
                attend = _relu_linear_attention if linear else _relu_quadratic_attention
                out = attend(q, k, v)  # (B, G, d, N)
        out = out.to(x.dtype).reshape(b, -1, h, w)  # (B, I·S, H, W)
        out = F.conv2d(out, self.to_out.weight.to(x.dtype)[:, :, None, None])  # (B, C, H, W)
        return x + self.norm_out(out)  # (B, C, H, W)


def _relu_linear_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """out_n = Σ_m v_m (k_m·q_n) / (Σ_m k_m·q_n + ε), computed as (V Kᵀ) Q in O(N·d²)."""
    vk = v @ k.transpose(-1, -2)  # (B, G, d, d)
    numerator = vk @ q  # (B, G, d, N)
    k_sum = k.sum(dim=-1, keepdim=True)  # (B, G, d, 1)
    denominator = k_sum.transpose(-1, -2) @ q  # (B, G, 1, N)
    return numerator / (denominator + ATTENTION_EPS)  # (B, G, d, N)


def _relu_quadratic_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """The same kernel in N×N form (used for maps with N ≤ head_dim), normalised in fp32."""
    scores = (k.transpose(-1, -2) @ q).float()  # (B, G, N, N): scores[m, n] = k_m·q_n
    scores = scores / (scores.sum(dim=2, keepdim=True) + ATTENTION_EPS)  # (B, G, N, N)
    return v @ scores.to(v.dtype)  # (B, G, d, N)


class GLUMBConv(nn.Module):
    """x + norm(1×1(a · SiLU(g))), (a, g) = split(dwconv3×3(SiLU(1×1(x)))), hidden 4·C."""

    def __init__(self, channels: int, expand_ratio: int = 4) -> None:
        super().__init__()
        hidden = expand_ratio * channels
        self.conv_inverted = Conv2d(channels, 2 * hidden, 1)
        self.conv_depth = Conv2d(2 * hidden, 2 * hidden, 3, padding=1, groups=2 * hidden)
        self.conv_point = Conv2d(hidden, channels, 1, bias=False)
        self.norm = ChannelRMSNorm(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_inverted(x)  # (B, 2h, H, W)
        h = depthwise_glu(self.conv_depth, h, silu_input=True)  # (B, h, H, W)
        h = self.conv_point(h)  # (B, C, H, W)
        return x + self.norm(h)  # (B, C, H, W)


class EfficientViTBlock(nn.Module):
    """Global context (linear attention) then local mixing (GLUMBConv), both residual."""

    def __init__(self, channels: int, head_dim: int, kernel_sizes: tuple[int, ...], norm: str):
        super().__init__()
        self.attn = MultiscaleLinearAttention(channels, head_dim, kernel_sizes, norm)
        self.conv_out = GLUMBConv(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv_out(self.attn(x))  # (B, C, H, W)


def _block(
    kind: str, channels: int, head_dim: int, scales: tuple[int, ...], norm: str, act: str
) -> nn.Module:
    if kind == "ResBlock":
        return ResBlock(channels, norm, act)
    if kind == "EfficientViTBlock":
        return EfficientViTBlock(channels, head_dim, scales, norm)
    raise ValueError(f"unknown block type {kind!r}; expected 'ResBlock' or 'EfficientViTBlock'")


class Downsample(nn.Module):
    """Halve the resolution: a conv (stride 2, or stride 1 then pixel-unshuffle) plus,
    with ``shortcut``, the pixel-unshuffled input averaged over groups of channels."""

    def __init__(self, in_channels: int, out_channels: int, mode: str, shortcut: bool) -> None:
        super().__init__()
        self.unshuffle = mode == "pixel_unshuffle"
        conv_channels = out_channels // 4 if self.unshuffle else out_channels
        self.conv = Conv2d(
            in_channels, conv_channels, 3, stride=1 if self.unshuffle else 2, padding=1
        )
        self.shortcut = shortcut
        self.group_size = 4 * in_channels // out_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)  # (B, C', H/2, W/2) or (B, C'/4, H, W)
        if self.unshuffle:
            y = F.pixel_unshuffle(y, 2)  # (B, C', H/2, W/2)
        if self.shortcut:
            s = F.pixel_unshuffle(x, 2)  # (B, 4C, H/2, W/2)
            y = y + s.unflatten(1, (-1, self.group_size)).mean(dim=2)  # (B, C', H/2, W/2)
        return y


class Upsample(nn.Module):
    """Double the resolution: nearest ×2 then conv (or conv then pixel-shuffle) plus, with
    ``shortcut``, the input's channels repeated and pixel-shuffled."""

    def __init__(self, in_channels: int, out_channels: int, mode: str, shortcut: bool) -> None:
        super().__init__()
        self.interpolate = mode == "interpolate"
        conv_channels = out_channels if self.interpolate else 4 * out_channels
        self.conv = Conv2d(in_channels, conv_channels, 3, padding=1)
        self.shortcut = shortcut
        self.repeats = 4 * out_channels // in_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.interpolate:
            y = _nearest_up_conv3x3(x, self.conv.weight, self.conv.bias)  # (B, C', 2H, 2W)
        else:
            y = F.pixel_shuffle(self.conv(x), 2)  # (B, C', 2H, 2W)
        if self.shortcut:
            s = x.repeat_interleave(self.repeats, dim=1)  # (B, 4C', H, W)
            y = y + F.pixel_shuffle(s, 2)  # (B, C', 2H, 2W)
        return y


# Which rows of a 3×3 kernel fall on which input row after a nearest ×2 upsampling: output row
# 2i (phase 0) sees input rows (i-1, i) through kernel rows (0, 1+2); row 2i+1 (phase 1) sees
# rows (i, i+1) through kernel rows (0+1, 2). Indexed [phase, tap, kernel row]; same for columns.
_PHASE_TAPS = (((1, 0, 0), (0, 1, 1)), ((1, 1, 0), (0, 0, 1)))


def _nearest_up_conv3x3(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None):
    """conv3×3(pad 1)(nearest ×2 upsample(x)), computed as four 2×2 convs of x, one per output
    phase: 16 multiply-adds per input pixel instead of 36, and no 4× larger intermediate."""
    b, _, h, w = x.shape
    out = weight.shape[0]
    exact = torch.promote_types(weight.dtype, torch.float32)  # sum kernel taps without rounding
    taps = torch.tensor(_PHASE_TAPS, dtype=exact, device=x.device)  # (2, 2, 3)
    k = torch.einsum("ary,ocyx,bsx->abocrs", taps, weight.to(exact), taps)  # (2, 2, O, C, 2, 2)
    k = k.reshape(4 * out, -1, 2, 2).to(x.dtype)  # (4O, C, 2, 2), phases (a, b) outermost
    bias4 = None if bias is None else bias.to(x.dtype).repeat(4)  # (4O,)
    y = F.conv2d(F.pad(x, (1, 1, 1, 1)), k, bias4)  # (B, 4O, H+1, W+1)
    y = y.view(b, 2, 2, out, h + 1, w + 1)  # (B, a, b, O, H+1, W+1)
    result = x.new_empty(b, out, 2 * h, 2 * w)  # (B, O, 2H, 2W)
    for pa, pb in itertools.product((0, 1), (0, 1)):
        result[:, :, pa::2, pb::2] = y[:, pa, pb, :, pa : pa + h, pb : pb + w]  # (B, O, H, W)
    return result


def _run(layer: nn.Module, x: torch.Tensor, use_checkpoint: bool) -> torch.Tensor:
    """One layer, recomputed in the backward pass when gradient checkpointing is on."""
    if use_checkpoint and torch.is_grad_enabled():
        return checkpoint(layer, x, use_reentrant=False)
    return layer(x)


class Encoder(nn.Module):
    def __init__(self, cfg: AutoencoderConfig) -> None:
        super().__init__()
        widths, depths, n = cfg.encoder_widths, cfg.encoder_depths, cfg.num_stages
        if depths[0] > 0:
            self.conv_in: nn.Module = Conv2d(cfg.in_channels, widths[0], 3, padding=1)
        else:  # no full-resolution stage: go straight to half resolution
            self.conv_in = Downsample(cfg.in_channels, widths[1], cfg.downsample, shortcut=False)
        stages = []
        for i in range(n):
            layers = [
                _block(
                    cfg.encoder_block_types[i],
                    widths[i],
                    cfg.head_dim,
                    cfg.encoder_qkv_multiscales[i],
                    "rms_norm",
                    "silu",
                )
                for _ in range(depths[i])
            ]
            if i < n - 1 and depths[i] > 0:
                layers.append(Downsample(widths[i], widths[i + 1], cfg.downsample, shortcut=True))
            stages.append(nn.Sequential(*layers))
        self.down_blocks = nn.ModuleList(stages)
        self.conv_out = Conv2d(widths[-1], cfg.latent_channels, 3, padding=1)
        self.out_shortcut = cfg.encoder_out_shortcut
        self.out_group_size = widths[-1] // cfg.latent_channels
        self.gradient_checkpointing = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv_in(x)  # (B, W0, H, W) or (B, W1, H/2, W/2)
        for layer in itertools.chain.from_iterable(self.down_blocks):
            x = _run(layer, x, self.gradient_checkpointing)  # down to (B, W_last, H/f, W/f)
        z = self.conv_out(x)  # (B, c, H/f, W/f)
        if self.out_shortcut:
            z = z + x.unflatten(1, (-1, self.out_group_size)).mean(dim=2)  # (B, c, H/f, W/f)
        return z


class Decoder(nn.Module):
    def __init__(self, cfg: AutoencoderConfig) -> None:
        super().__init__()
        widths, depths, n = cfg.decoder_widths, cfg.decoder_depths, cfg.num_stages
        self.conv_in = Conv2d(cfg.latent_channels, widths[-1], 3, padding=1)
        self.in_shortcut = cfg.decoder_in_shortcut
        self.in_repeats = widths[-1] // cfg.latent_channels
        stages = []
        for i in range(n):
            layers: list[nn.Module] = []
            if i < n - 1 and depths[i] > 0:
                layers.append(Upsample(widths[i + 1], widths[i], cfg.upsample, shortcut=True))
            layers += [
                _block(
                    cfg.decoder_block_types[i],
                    widths[i],
                    cfg.head_dim,
                    cfg.decoder_qkv_multiscales[i],
                    cfg.decoder_norm_types[i],
                    cfg.decoder_act_fns[i],
                )
                for _ in range(depths[i])
            ]
            stages.append(nn.Sequential(*layers))
        # Indexed by stage (0 = full resolution) like the encoder; run from the last one.
        self.up_blocks = nn.ModuleList(stages)
        channels = widths[0] if depths[0] > 0 else widths[1]
        self.norm_out = ChannelRMSNorm(channels)
        self.out_act = _activation(cfg.decoder_out_act)
        if depths[0] > 0:
            self.conv_out: nn.Module = Conv2d(channels, cfg.in_channels, 3, padding=1)
        else:  # no full-resolution stage: the output conv also upsamples
            self.conv_out = Upsample(channels, cfg.in_channels, cfg.upsample, shortcut=False)
        self.gradient_checkpointing = False

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        x = self.conv_in(z)  # (B, W_last, h, w)
        if self.in_shortcut:
            x = x + z.repeat_interleave(self.in_repeats, dim=1)  # (B, W_last, h, w)
        for layer in itertools.chain.from_iterable(reversed(self.up_blocks)):
            x = _run(layer, x, self.gradient_checkpointing)  # up to (B, W0, h·f, w·f)
        x = self.out_act(self.norm_out(x))  # (B, W0, h·f, w·f)
        return self.conv_out(x)  # (B, 3, h·f, w·f)


@dataclass(frozen=True)
class TilingConfig:
    """How ``encode``/``decode`` split large images (sizes in image pixels).

    Defaults: 1024-px tiles every 896 px (128 px of linear cross-fade). Users of SANA at 4K
    report visible flat-area artefacts with 512-px tiles and none with 1024/896; the
    EfficientViT attention is global within a tile, so a tile should see enough of the image.
    Measurements are in ``docs/benchmarks.md``. ``tiled=None`` tiles images with more than
    ``auto_threshold`` pixels (default 2048², so SANA's 512–2048 px outputs are decoded whole,
    exactly like the reference, and 4K images are tiled).
    """

    tile: int = 1024
    stride: int = 896
    auto_threshold: int = 2048 * 2048

    def __post_init__(self) -> None:
        if not (isinstance(self.tile, int) and isinstance(self.stride, int) and self.tile > 0):
            raise ValueError(f"TilingConfig: tile and stride must be ints, tile > 0; got {self}")
        if not 0 < self.stride <= self.tile:
            raise ValueError(
                f"TilingConfig.stride must be in (0, tile={self.tile}] so tiles touch or overlap; "
                f"got {self.stride}"
            )
        if self.auto_threshold < 0:
            raise ValueError(f"TilingConfig.auto_threshold must be >= 0, got {self.auto_threshold}")


class DCAE(nn.Module):
    """The autoencoder. ``encode`` returns UNSCALED latents; multiply by ``scaling_factor``
    before the DiT and divide after it, before ``decode``."""

    def __init__(self, config: AutoencoderConfig, tiling: TilingConfig | None = None) -> None:
        super().__init__()
        self.config = config
        self.tiling = tiling or TilingConfig()
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)
        self.init_weights()

    def init_weights(self) -> None:
        """PyTorch's default init (Kaiming-uniform convs/linears, unit norms), the one the
        reference implementations train from: every block is residual and every resolution
        change has a parameter-free shortcut, so the network starts close to its shortcut path
        without special scaling."""
        for module in self.modules():
            if isinstance(module, (nn.Conv2d, nn.Linear, nn.BatchNorm2d)):
                module.reset_parameters()
            elif isinstance(module, ChannelRMSNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    @property
    def scaling_factor(self) -> float:
        return self.config.scaling_factor

    @property
    def spatial_compression(self) -> int:
        return self.config.spatial_compression

    @property
    def dtype(self) -> torch.dtype:
        return self.decoder.conv_in.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.decoder.conv_in.weight.device

    @property
    def compute_dtype(self) -> torch.dtype:
        """The activations' dtype in ``encode``/``decode``: the weights' dtype, except for a
        half-precision model on a CPU without half-precision GEMMs (AVX2 only), where PyTorch's
        fallback is ~100× slower than fp32; there it runs in fp32 with weights widened per layer.
        """
        return matmul_dtype(self.device, self.dtype)

    @property
    def gradient_checkpointing(self) -> bool:
        return self.encoder.gradient_checkpointing

    @gradient_checkpointing.setter
    def gradient_checkpointing(self, enabled: bool) -> None:
        """Recompute each block in the backward pass (training at high resolution)."""
        self.encoder.gradient_checkpointing = bool(enabled)
        self.decoder.gradient_checkpointing = bool(enabled)

    def encode(
        self, images: torch.Tensor, tiled: bool | None = None, progress: bool = False
    ) -> torch.Tensor:
        """(B, in_channels, H, W) in [-1, 1] → unscaled latents (B, c, H/f, W/f).

        H and W must be multiples of f. The result has the model's dtype. ``tiled=True``
        works on overlapping tiles (inference only: the result carries no gradient);
        ``tiled=None`` does so above ``tiling.auto_threshold`` pixels when autograd is off.
        """
        f = self.spatial_compression
        _check_4d(images, "images", self.config.in_channels, "in_channels")
        h, w = images.shape[-2:]
        if h % f or w % f:
            raise ValueError(
                f"images height and width must be multiples of the spatial compression {f}; "
                f"got {h}×{w} (pad or resize to e.g. {-(-h // f) * f}×{-(-w // f) * f})"
            )
        images = images.to(self.compute_dtype)
        if self._use_tiling(tiled, h * w):
            latents = _tiled_apply(
                self.encoder,
                images,
                in_px=f,
                out_px=1,
                out_channels=self.config.latent_channels,
                tile_stride=self._tile_cells(),
                progress=progress,
            )
        else:
            latents = self.encoder(images)
        return latents.to(self.dtype)

    def decode(
        self, latents: torch.Tensor, tiled: bool | None = None, progress: bool = False
    ) -> torch.Tensor:
        """Unscaled latents (B, c, h, w) → images (B, in_channels, h·f, w·f), roughly in [-1, 1].

        ``tiled`` as in ``encode``; the threshold counts output pixels.
        """
        f = self.spatial_compression
        _check_4d(latents, "latents", self.config.latent_channels, "latent_channels")
        h, w = latents.shape[-2:]
        latents = latents.to(self.compute_dtype)
        if self._use_tiling(tiled, h * w * f * f):
            images = _tiled_apply(
                self.decoder,
                latents,
                in_px=1,
                out_px=f,
                out_channels=self.config.in_channels,
                tile_stride=self._tile_cells(),
                progress=progress,
            )
        else:
            images = self.decoder(latents)
        return images.to(self.dtype)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Reconstruction decode(encode(images)), untiled (the training path)."""
        return self.decode(self.encode(images, tiled=False), tiled=False)

    def _use_tiling(self, tiled: bool | None, pixels: int) -> bool:
        if tiled is None:  # never silently drop gradients while training
            return pixels > self.tiling.auto_threshold and not torch.is_grad_enabled()
        return bool(tiled)

    def _tile_cells(self) -> tuple[int, int]:
        """Tile size and stride in latent pixels."""
        f, t = self.spatial_compression, self.tiling
        if t.tile % f or t.stride % f:
            raise ValueError(
                f"tiling.tile ({t.tile}) and tiling.stride ({t.stride}) must be multiples of the "
                f"spatial compression {f}"
            )
        return t.tile // f, t.stride // f


def _check_4d(x: object, name: str, channels: int, field: str) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.ndim != 4:
        raise ValueError(f"{name} must have shape (B, C, H, W), got {tuple(x.shape)}")
    if x.shape[1] != channels:
        raise ValueError(
            f"{name} must have {channels} channels (config.{field}), got shape {tuple(x.shape)}"
        )
    if not x.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {x.dtype}")
    if 0 in x.shape:
        raise ValueError(f"{name} is empty: shape {tuple(x.shape)}")


# --- Tiling ---------------------------------------------------------------------------------
# Positions are counted in latent pixels ("cells"); a cell is `in_px` input pixels and `out_px`
# output pixels (decode: 1 → f, encode: f → 1). Every tile has the full tile size (the last one
# along an axis is moved back to end at the border), so the attention always sees a whole tile.


def _tile_starts(length: int, tile: int, stride: int) -> list[int]:
    if length <= tile:
        return [0]
    starts = list(range(0, length - tile, stride))
    return [*starts, length - tile]


def _blend_ramps(starts: list[int], tile: int, scale: int) -> list[torch.Tensor]:
    """Per-tile 1-D weights (length tile·scale): 1 inside, a linear ramp across each overlap
    with a neighbour, so two overlapping tiles cross-fade with weights summing to 1."""
    ramps = []
    for i, start in enumerate(starts):
        weight = torch.ones(tile * scale)
        if i > 0:
            overlap = (starts[i - 1] + tile - start) * scale
            if overlap > 0:
                weight[:overlap] *= (torch.arange(overlap) + 0.5) / overlap
        if i < len(starts) - 1:
            overlap = (start + tile - starts[i + 1]) * scale
            if overlap > 0:
                weight[tile * scale - overlap :] *= 1 - (torch.arange(overlap) + 0.5) / overlap
        ramps.append(weight)
    return ramps


def _axis_plan(
    cells: int, tile: int, stride: int, out_px: int
) -> tuple[int, list[tuple[int, torch.Tensor]], torch.Tensor]:
    """(start cell, weights) for each tile along one axis, and the per-pixel weight sum."""
    tile = min(tile, cells)
    starts = _tile_starts(cells, tile, stride)
    ramps = _blend_ramps(starts, tile, out_px)
    total = torch.zeros(cells * out_px)
    for start, ramp in zip(starts, ramps, strict=True):
        total[start * out_px : (start + tile) * out_px] += ramp
    return tile, list(zip(starts, ramps, strict=True)), total


@torch.no_grad()
def _tiled_apply(
    fn: Callable[[torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    in_px: int,
    out_px: int,
    out_channels: int,
    tile_stride: tuple[int, int],
    progress: bool,
) -> torch.Tensor:
    """Run ``fn`` on overlapping tiles of each sample, one at a time, and blend into one
    preallocated fp32 output, so peak memory depends on the tile size, not the image size.
    Inference only (no autograd graph)."""
    b, _, h, w = x.shape
    tile, stride = tile_stride
    tile_h, rows, total_h = _axis_plan(h // in_px, tile, stride, out_px)
    tile_w, cols, total_w = _axis_plan(w // in_px, tile, stride, out_px)
    out = torch.zeros(b, out_channels, total_h.numel(), total_w.numel(), device=x.device)
    plan = list(itertools.product(range(b), rows, cols))
    for i, (y0, wy), (x0, wx) in tqdm(plan, desc="tiles", disable=not progress):
        rows_in = slice(y0 * in_px, (y0 + tile_h) * in_px)
        cols_in = slice(x0 * in_px, (x0 + tile_w) * in_px)
        piece = fn(x[i : i + 1, :, rows_in, cols_in])  # (1, C_out, tile_h·out_px, tile_w·out_px)
        weight = (wy[:, None] * wx[None, :]).to(x.device)  # (tile_h·out_px, tile_w·out_px)
        oy, ox = y0 * out_px, x0 * out_px
        out[i, :, oy : oy + weight.shape[0], ox : ox + weight.shape[1]] += piece[0].float() * weight
    # Separable weights: the sum over all tiles at (y, x) is total_h[y] · total_w[x].
    out /= (total_h[:, None] * total_w[None, :]).to(x.device)
    return out.to(x.dtype)
