"""Aspect-ratio bins: the sizes a model of a given base size generates and trains at.

A SANA model is trained on a fixed set of shapes per base size (~40 aspect ratios from 1:4 to
4:1, all of about ``base_size**2`` pixels). At inference a requested size snaps to the nearest
bin, the image is generated there, then resized and centre-cropped back to the request
(:func:`bin_for`, :func:`resize_and_center_crop`). Training buckets use the same bins.

The rule that generates the bins
--------------------------------
Heights and widths lie on a grid of ``cell = max(base_size // 16, 32)`` pixels; with
``n = base_size // cell`` cells per side of the square bin, the bins are every
``(h, w)`` cell count with

    1/4 <= h / w <= 4      and      0.9 * n**2 <= h * w <= n**2

i.e. every grid shape within 10 % below the base area. Each bin is keyed by
``str(round(h / w, 2))`` (``"0.25"``, ``"1.0"``, ``"3.62"`` ...) and the keys are ordered by
ratio. For ``base_size >= 512`` the cell is ``base_size / 16`` and the rule yields 41 shapes.

This reproduces the tables diffusers ships (``ASPECT_RATIO_{512,1024,2048,4096}_BIN``) exactly
after removing the ratios those tables omit, listed in ``_OMITTED_RATIOS``:

- All tables omit ``"1.91"`` (21 x 11 cells) although they keep its transpose ``"0.52"``.
- The 512/1024 tables (PixArt-alpha's, reused by SANA) also omit the seven most extreme
  ratios the 2048/4096 tables (PixArt-sigma's and SANA's) have.

Base size 256 deviates on purpose: diffusers' PixArt-alpha 256 table uses a 16-px grid, which
the 32x-downsampling DC-AE cannot encode (e.g. 144 x 432), so our 256 bins use a 32-px grid.
The same rule and omissions then give exactly the entries of diffusers' 256 table whose sides
are multiples of 32 (9 bins).
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from types import MappingProxyType

import torch
import torch.nn.functional as F

MAX_SIDE = 8192  # largest image side the pipeline accepts (4K plus headroom)

SUPPORTED_BASE_SIZES = (256, 512, 1024, 2048, 4096)

# The DC-AE downsamples 32x, so every generated or trained side must be a multiple of 32.
_MIN_CELL = 32

# Bins the rule yields that diffusers' tables leave out (see the module docstring).
_PIXART_ALPHA_OMITTED = frozenset({"0.26", "0.27", "1.91", "2.89", "3.11", "3.62", "3.75", "3.88"})
_OMITTED_RATIOS: Mapping[int, frozenset[str]] = {
    256: _PIXART_ALPHA_OMITTED,
    512: _PIXART_ALPHA_OMITTED,
    1024: _PIXART_ALPHA_OMITTED,
    2048: frozenset({"1.91"}),
    4096: frozenset({"1.91"}),
}


def _check_base_size(base_size: int) -> None:
    if base_size not in SUPPORTED_BASE_SIZES:
        raise ValueError(f"base_size must be one of {SUPPORTED_BASE_SIZES}, got {base_size!r}")


def _check_side(name: str, value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name} must be a positive integer number of pixels, got {value!r}")


@functools.cache
def aspect_ratio_bins(base_size: int) -> Mapping[str, tuple[int, int]]:
    """The bins of ``base_size`` as ``{ratio key: (height, width)}``, ordered by ratio.

    Keys are ``height / width`` rounded to 2 decimals, as in diffusers' tables. The mapping is
    read-only (it is cached).
    """
    _check_base_size(base_size)
    cell = max(base_size // 16, _MIN_CELL)
    n = base_size // cell
    bins: dict[str, tuple[int, int]] = {}
    for h in range(1, 4 * n + 1):
        for w in range(max(1, -(-h // 4)), min(4 * h, 4 * n) + 1):
            # Integer form of 0.9 * n**2 <= h * w <= n**2, so no float rounding decides a bin.
            if 10 * h * w >= 9 * n * n and h * w <= n * n:
                bins[str(round(h / w, 2))] = (h * cell, w * cell)
    kept = {k: v for k, v in bins.items() if k not in _OMITTED_RATIOS[base_size]}
    return MappingProxyType(dict(sorted(kept.items(), key=lambda item: float(item[0]))))


def bin_for(height: int, width: int, base_size: int) -> tuple[int, int]:
    """The ``(height, width)`` of the bin of ``base_size`` nearest in aspect ratio.

    Distance is ``|float(key) - height / width|`` against the rounded ratio keys, and a tie
    goes to the smaller ratio, which is how diffusers' ``classify_height_width_bin`` picks.
    """
    _check_side("height", height)
    _check_side("width", width)
    bins = aspect_ratio_bins(base_size)
    ratio = height / width
    # min() keeps the first of equal distances, and the keys are in ascending ratio order.
    key = min(bins, key=lambda k: abs(float(k) - ratio))
    return bins[key]


def resize_and_center_crop(images: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Resize ``images`` (B, C, H, W) to cover ``height x width``, then centre-crop to it.

    The scale is ``max(height / H, width / W)``; the resized sides are truncated to integers,
    interpolation is bilinear without antialiasing (``align_corners=False``) and the crop starts
    at ``(resized - target) // 2`` -- the maths of diffusers' ``resize_and_crop_tensor``, so a
    pipeline using this matches diffusers' output. One difference: when float rounding makes a
    truncated side one pixel short of the target (diffusers then returns a smaller image), the
    side is raised to the target, so the result always has the requested size.
    """
    if images.ndim != 4:
        raise ValueError(f"images must have shape (B, C, H, W), got {tuple(images.shape)}")
    _check_side("height", height)
    _check_side("width", width)
    src_h, src_w = images.shape[-2:]
    if (src_h, src_w) == (height, width):
        return images
    scale = max(height / src_h, width / src_w)
    resized_h = max(int(src_h * scale), height)
    resized_w = max(int(src_w * scale), width)
    images = F.interpolate(
        images, size=(resized_h, resized_w), mode="bilinear", align_corners=False
    )  # (B, C, resized_h, resized_w)
    top = (resized_h - height) // 2
    left = (resized_w - width) // 2
    return images[:, :, top : top + height, left : left + width]  # (B, C, height, width)
