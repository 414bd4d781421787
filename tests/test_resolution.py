"""Aspect-ratio bins against diffusers' tables and functions (diffusers is the reference)."""

import itertools
import random

import pytest
import torch
from diffusers.image_processor import PixArtImageProcessor
from diffusers.pipelines.pixart_alpha.pipeline_pixart_alpha import (
    ASPECT_RATIO_256_BIN,
    ASPECT_RATIO_512_BIN,
    ASPECT_RATIO_1024_BIN,
)
from diffusers.pipelines.pixart_alpha.pipeline_pixart_sigma import ASPECT_RATIO_2048_BIN
from diffusers.pipelines.sana.pipeline_sana import ASPECT_RATIO_4096_BIN

from fastsana.resolution import (
    SUPPORTED_BASE_SIZES,
    aspect_ratio_bins,
    bin_for,
    resize_and_center_crop,
)

# The tables diffusers' SanaPipeline picks for each base size.
DIFFUSERS_TABLES = {
    512: ASPECT_RATIO_512_BIN,
    1024: ASPECT_RATIO_1024_BIN,
    2048: ASPECT_RATIO_2048_BIN,
    4096: ASPECT_RATIO_4096_BIN,
}


def as_int_items(table):
    return [(key, (int(h), int(w))) for key, (h, w) in table.items()]


@pytest.mark.parametrize("base_size", sorted(DIFFUSERS_TABLES))
def test_bins_equal_diffusers_tables(base_size):
    # Same keys, same order (it decides ties), same sizes.
    assert list(aspect_ratio_bins(base_size).items()) == as_int_items(DIFFUSERS_TABLES[base_size])


def test_256_bins_are_diffusers_256_table_on_the_32px_grid():
    on_grid = [
        (key, hw) for key, hw in as_int_items(ASPECT_RATIO_256_BIN) if hw[0] % 32 == hw[1] % 32 == 0
    ]
    assert list(aspect_ratio_bins(256).items()) == on_grid
    assert len(on_grid) >= 9


@pytest.mark.parametrize("base_size", SUPPORTED_BASE_SIZES)
def test_every_bin_is_encodable_and_near_the_base_area(base_size):
    for h, w in aspect_ratio_bins(base_size).values():
        assert h % 32 == 0 and w % 32 == 0
        assert 0.9 * base_size**2 <= h * w <= base_size**2
        assert 0.25 <= h / w <= 4


@pytest.mark.parametrize("base_size", sorted(DIFFUSERS_TABLES))
def test_bin_for_matches_diffusers(base_size):
    rng = random.Random(base_size)
    sizes = [(rng.randint(1, 5000), rng.randint(1, 5000)) for _ in range(1500)]
    # Ratios halfway between neighbouring keys exercise the tie-breaking.
    keys = [float(k) for k in DIFFUSERS_TABLES[base_size]]
    sizes += [(round((a + b) * 500), 1000) for a, b in itertools.pairwise(keys)]
    sizes += [(1, 1), (1, 5000), (5000, 1), (base_size, base_size)]
    table = DIFFUSERS_TABLES[base_size]
    for h, w in sizes:
        expected = PixArtImageProcessor.classify_height_width_bin(h, w, ratios=table)
        assert bin_for(h, w, base_size) == expected, (h, w)


def test_resize_and_center_crop_matches_diffusers():
    rng = random.Random(0)
    torch.manual_seed(0)
    bins = list(aspect_ratio_bins(256).values())
    compared = 0
    for _ in range(40):
        src_h, src_w = rng.choice(bins)
        images = torch.rand(1, 3, src_h, src_w)
        height, width = rng.randint(16, 400), rng.randint(16, 400)
        ours = resize_and_center_crop(images, height, width)
        assert ours.shape == (1, 3, height, width)
        theirs = PixArtImageProcessor.resize_and_crop_tensor(images, width, height)
        if theirs.shape == ours.shape:
            torch.testing.assert_close(ours, theirs, rtol=0, atol=0)
            compared += 1
        # Otherwise diffusers truncated a side one pixel short; ours kept the requested size.
    assert compared >= 25
    same = torch.rand(1, 3, 64, 96)
    assert resize_and_center_crop(same, 64, 96) is same


def test_bad_arguments_raise_clear_errors():
    with pytest.raises(ValueError, match="base_size must be one of"):
        aspect_ratio_bins(768)
    with pytest.raises(ValueError, match="base_size must be one of"):
        bin_for(512, 512, 300)
    with pytest.raises(ValueError, match="height must be a positive integer"):
        bin_for(0, 512, 512)
    with pytest.raises(ValueError, match="width must be a positive integer"):
        bin_for(512, -3, 512)
    with pytest.raises(ValueError, match="width must be a positive integer"):
        resize_and_center_crop(torch.zeros(1, 3, 8, 8), 8, 0)
    with pytest.raises(ValueError, match=r"\(B, C, H, W\)"):
        resize_and_center_crop(torch.zeros(3, 8, 8), 8, 8)
