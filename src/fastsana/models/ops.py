"""Small tensor operations shared by the models."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fastsana.runtime import use_triton


def grouped_conv2d(conv: nn.Conv2d, x: Tensor) -> Tensor:
    """``conv(x)`` for a grouped or depthwise convolution, fast on CPU in any precision.

    PyTorch's CPU kernels for grouped convolutions in bf16/fp16 — including under autocast —
    fall back to one small convolution per group, ~100× slower than fp32 (measured here: 9.7 s
    vs 0.08 s for a 3×3 depthwise conv over 2304 channels, 16×16, batch 16). On CPU such
    convolutions therefore run in fp32 with autocast off, and the result is cast back to the
    dtype the caller expects (autocast's, else the input's). Other devices use ``conv`` as is.
    """
    if x.device.type != "cpu" or conv.groups == 1:
        return conv(x)
    autocast = torch.is_autocast_enabled("cpu")
    out_dtype = torch.get_autocast_dtype("cpu") if autocast else x.dtype
    if out_dtype == x.dtype == conv.weight.dtype == torch.float32:
        return conv(x)
    weight, bias = conv.weight.float(), conv.bias.float() if conv.bias is not None else None
    with torch.autocast("cpu", enabled=False):
        args = (conv.stride, conv.padding, conv.dilation, conv.groups)
        out = F.conv2d(x.float(), weight, bias, *args)
    return out.to(out_dtype)


def depthwise_glu(conv: nn.Conv2d, x: Tensor, silu_input: bool) -> Tensor:
    """The gated middle of Mix-FFN / GLUMBConv: a·SiLU(g), (a, g) = split(conv(SiLU?(x))).

    x: (B, 2h, H, W), any memory format; returns (B, h, H, W) in x's dtype and, for
    channels-last input, channels-last. On CUDA inference one Triton kernel does it all
    (``fastsana.kernels.dwconv_glu``); otherwise this PyTorch path, which is the reference.
    When autograd is off, x is treated as the caller's temporary and overwritten.
    """
    if use_triton(x.device, "dwconv_glu"):
        from fastsana.kernels import dwconv_glu

        return dwconv_glu(x, conv.weight, conv.bias, silu_input=silu_input)
    inplace = not torch.is_grad_enabled()
    if silu_input:
        x = F.silu(x, inplace=inplace)  # (B, 2h, H, W)
    a, gate = grouped_conv2d(conv, x).chunk(2, dim=1)  # (B, h, H, W) each, strided views
    return a * F.silu(gate, inplace=inplace)  # (B, h, H, W), x's memory format
