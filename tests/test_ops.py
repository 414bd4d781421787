"""Shared tensor operations."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from fastsana.models.ops import grouped_conv2d


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("autocast", [False, True])
def test_grouped_conv_matches_conv_and_keeps_dtype(dtype: torch.dtype, autocast: bool) -> None:
    torch.manual_seed(0)
    conv = nn.Conv2d(12, 12, 3, padding=2, dilation=2, groups=12)
    x = torch.randn(2, 12, 9, 7).to(memory_format=torch.channels_last)
    expected = conv(x)  # fp32 reference
    conv_d, x_d = conv.to(dtype), x.to(dtype)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        out = grouped_conv2d(conv_d, x_d)
    want = torch.bfloat16 if autocast else dtype
    assert out.dtype == want
    tolerance = 1e-6 if want == torch.float32 else 3e-2
    torch.testing.assert_close(out.float(), expected, atol=tolerance, rtol=tolerance)


def test_grouped_conv_has_gradients_in_half_precision() -> None:
    conv = nn.Conv2d(8, 8, 3, padding=1, groups=4).to(torch.bfloat16)
    x = torch.randn(1, 8, 5, 5, dtype=torch.bfloat16, requires_grad=True)
    grouped_conv2d(conv, x).float().square().sum().backward()
    assert x.grad is not None and conv.weight.grad is not None
    assert x.grad.dtype == torch.bfloat16 and conv.weight.grad.dtype == torch.bfloat16
