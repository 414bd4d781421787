"""Small tensor operations shared by the models."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


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
