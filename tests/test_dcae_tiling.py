"""Tiled DC-AE encode/decode: exact bookkeeping, bounded memory, no seams."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from fastsana.configs import AutoencoderConfig, replace
from fastsana.models.dcae import DCAE, TilingConfig, _tile_starts, _tiled_apply

# f = 8 with global linear attention in the two low-resolution stages, so tiles really do see
# a different context than the whole image.
CONFIG = AutoencoderConfig(
    latent_channels=8,
    head_dim=8,
    encoder_block_types=("ResBlock", "ResBlock", "EfficientViTBlock", "EfficientViTBlock"),
    decoder_block_types=("ResBlock", "ResBlock", "EfficientViTBlock", "EfficientViTBlock"),
    encoder_widths=(8, 16, 32, 32),
    decoder_widths=(8, 16, 32, 32),
    encoder_depths=(1, 1, 1, 1),
    decoder_depths=(1, 1, 1, 1),
    encoder_qkv_multiscales=((), (), (5,), (5,)),
    decoder_qkv_multiscales=((), (), (5,), (5,)),
    scaling_factor=1.0,
)
F_ = 8


@pytest.fixture(scope="module")
def ae() -> DCAE:
    torch.manual_seed(0)
    return DCAE(CONFIG).eval()


def _smooth_latent(h: int, w: int, seed: int = 0) -> torch.Tensor:
    """A latent without high frequencies, so sharp changes in the output come from tiling."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.randn(1, CONFIG.latent_channels, max(h // 8, 2), max(w // 8, 2), generator=g)
    return F.interpolate(coarse, size=(h, w), mode="bilinear", align_corners=False)


def seam_score(image: torch.Tensor, borders: list[int]) -> float:
    """Mean |horizontal step| across the given columns over that across all other columns at
    the same position modulo f (the decoder's upsampling makes statistics periodic in f).
    About 1 without seams; a hard tile edge makes it several times larger."""
    step = (image[..., 1:] - image[..., :-1]).abs().mean(dim=(0, 1, 2))  # step[x-1]: x-1 → x
    columns = range(F_, image.shape[-1], F_)
    at_border = torch.stack([step[x - 1] for x in borders])
    elsewhere = torch.stack([step[x - 1] for x in columns if x not in borders])
    return (at_border.mean() / elsewhere.mean()).item()


def _tile_borders(cells: int, tile: int, stride: int) -> list[int]:
    """Output columns where a new tile starts (decode, tile/stride in image pixels)."""
    return [s * F_ for s in _tile_starts(cells, tile // F_, stride // F_)[1:]]


@pytest.mark.parametrize(
    ("h", "w", "tile", "stride"),
    [(5, 7, 2, 1), (16, 9, 4, 3), (3, 3, 4, 2), (12, 30, 6, 6), (10, 11, 5, 2)],
)
def test_blending_is_exact_for_a_pointwise_function(h: int, w: int, tile: int, stride: int):
    """With a position-independent fn every tile agrees, so any placement or normalisation
    error shows up as a difference; weights must sum to exactly 1 everywhere."""
    g = torch.Generator().manual_seed(h * w)
    x = torch.randn(2, 3, h, w, generator=g)
    mix = torch.randn(5, 3, 1, 1, generator=g)

    def up(t: torch.Tensor) -> torch.Tensor:  # 1 cell → 4×4 output pixels
        return F.interpolate(F.conv2d(t, mix), scale_factor=4, mode="nearest")

    def down(t: torch.Tensor) -> torch.Tensor:  # 4×4 input pixels → 1 cell
        return F.conv2d(F.avg_pool2d(t, 4), mix)

    torch.testing.assert_close(_tiled_apply(up, x, 1, 4, 5, (tile, stride), False), up(x))
    x4 = torch.randn(2, 3, 4 * h, 4 * w, generator=g)
    torch.testing.assert_close(_tiled_apply(down, x4, 4, 1, 5, (tile, stride), False), down(x4))


def test_one_tile_covering_the_image_is_the_untiled_result(ae: DCAE) -> None:
    z = _smooth_latent(6, 10)
    ae.tiling = TilingConfig(tile=128, stride=96)  # 16 cells ≥ the 10-cell image
    with torch.no_grad():
        assert torch.equal(ae.decode(z, tiled=True), ae.decode(z, tiled=False))
        x = torch.rand(1, 3, 48, 80) * 2 - 1
        assert torch.equal(ae.encode(x, tiled=True), ae.encode(x, tiled=False))


def _record_inputs(module: torch.nn.Module) -> tuple[list, torch.utils.hooks.RemovableHandle]:
    seen: list[tuple[int, ...]] = []
    handle = module.register_forward_pre_hook(lambda _, args: seen.append(tuple(args[0].shape)))
    return seen, handle


def test_tiles_are_processed_one_at_a_time_at_tile_size(ae: DCAE) -> None:
    """Memory is bounded by the tile: the decoder/encoder never see more than one tile."""
    ae.tiling = TilingConfig(tile=64, stride=48)  # 8 cells, stride 6
    z = torch.randn(2, 8, 14, 20)  # rows at 0, 6 (last moved back to 6): 2; cols 0, 6, 12: 3
    seen, handle = _record_inputs(ae.decoder)
    with torch.no_grad():
        out = ae.decode(z, tiled=True)
    handle.remove()
    assert out.shape == (2, 3, 14 * F_, 20 * F_)
    assert seen == [(1, 8, 8, 8)] * (2 * 2 * 3)
    seen, handle = _record_inputs(ae.encoder)
    with torch.no_grad():
        lat = ae.encode(torch.rand(1, 3, 14 * F_, 20 * F_), tiled=True)
    handle.remove()
    assert lat.shape == (1, 8, 14, 20)
    assert seen == [(1, 3, 64, 64)] * (2 * 3)


def test_auto_tiling_threshold(ae: DCAE) -> None:
    ae.tiling = TilingConfig(tile=64, stride=48, auto_threshold=128 * 128)
    seen, handle = _record_inputs(ae.decoder)
    with torch.no_grad():
        ae.decode(torch.randn(1, 8, 16, 16))  # exactly 128² pixels: one untiled call
        ae.decode(torch.randn(1, 8, 16, 18))  # above: tiled
        n_tiled = len(seen)
    ae.decode(torch.randn(1, 8, 16, 18))  # autograd on: never tiles by itself (keeps gradients)
    handle.remove()
    assert seen[0] == (1, 8, 16, 16)
    assert set(seen[1:n_tiled]) == {(1, 8, 8, 8)}
    assert n_tiled == 1 + 3 * 3
    assert seen[n_tiled:] == [(1, 8, 16, 18)]


def test_no_seams_and_the_check_catches_them(ae: DCAE) -> None:
    """The overlapped, cross-faded tiling shows no step at tile borders; a tiling with
    touching tiles (stride = tile, no blending) does, and the same check flags it."""
    h, w = 8, 24  # 64×192 px: one row of tiles
    z = _smooth_latent(h, w)
    scores = {}
    with torch.no_grad():
        for tile, stride in ((64, 48), (64, 64)):
            ae.tiling = TilingConfig(tile=tile, stride=stride)
            scores[stride] = seam_score(ae.decode(z, tiled=True), _tile_borders(w, tile, stride))
        untiled = seam_score(ae.decode(z, tiled=False), _tile_borders(w, 64, 48))
    assert scores[48] < 1.5, scores
    assert scores[64] > 3.0, scores  # proves the check can fail
    assert 0.7 < untiled < 1.3  # the score is ~1 on an image that has no tiles at all


def test_local_model_matches_untiled_away_from_tile_edges() -> None:
    """Without attention the decoder is local: a pixel farther than its receptive field from
    every edge of the tiles blended into it must come out exactly as in the untiled decode."""
    local = replace(
        CONFIG, encoder_block_types=("ResBlock",) * 4, decoder_block_types=("ResBlock",) * 4
    )
    torch.manual_seed(1)
    ae = DCAE(local).eval()
    z = _smooth_latent(40, 48, seed=2)
    with torch.no_grad():
        full = ae.decode(z, tiled=False)
        poked = z.clone()
        poked[..., 20, 24] += 10.0
        changed = (ae.decode(poked, tiled=False) - full).abs().amax(dim=(0, 1, 2)) > 0
        cols = changed.nonzero()[:, 0]
        reach = int(max(24 * F_ - cols.min(), cols.max() - 24 * F_ - F_ + 1))  # receptive field
        ae.tiling = TilingConfig(tile=256, stride=128)  # 128-px overlaps
        assert 2 * reach < 128, f"receptive field {reach} px too wide for this test"
        tiled = ae.decode(z, tiled=True)
    near_edge = torch.zeros(40 * F_, 48 * F_, dtype=torch.bool)
    for axis, cells in ((0, 40), (1, 48)):
        starts = _tile_starts(cells, 32, 16)
        for s in starts[1:]:  # inner left/top edges
            index = torch.arange(s * F_, min(s * F_ + reach, cells * F_))
            near_edge.index_fill_(axis, index, True)
        for s in starts[:-1]:  # inner right/bottom edges
            index = torch.arange((s + 32) * F_ - reach, (s + 32) * F_)
            near_edge.index_fill_(axis, index, True)
    far = ~near_edge
    assert far.float().mean() > 0.3
    torch.testing.assert_close(tiled[..., far], full[..., far], rtol=1e-4, atol=1e-5)
    assert (tiled[..., near_edge] - full[..., near_edge]).abs().max() > 1e-3  # edges do differ


def test_difference_from_untiled_shrinks_as_tiles_grow(ae: DCAE) -> None:
    """With global attention no tile can match the whole image exactly (tiles see less
    context); the error must fall as tiles grow and vanish once one tile covers the image."""
    z = _smooth_latent(24, 40, seed=1)
    errors = []
    with torch.no_grad():
        full = ae.decode(z, tiled=False)
        for tile, stride in ((64, 48), (128, 96), (192, 160), (320, 256)):
            ae.tiling = TilingConfig(tile=tile, stride=stride)
            errors.append(((ae.decode(z, tiled=True) - full).square().mean().sqrt()).item())
        ae.tiling = TilingConfig(tile=128, stride=96)
        x = full.clamp(-1, 1)
        latent_error = (ae.encode(x, tiled=True) - ae.encode(x, tiled=False)).abs().max()
    assert errors == sorted(errors, reverse=True), errors
    assert errors[-1] == 0.0
    assert errors[0] < full.std()
    assert torch.isfinite(latent_error) and latent_error > 0


def test_tiling_errors(ae: DCAE) -> None:
    with pytest.raises(ValueError, match="stride must be in"):
        TilingConfig(tile=64, stride=96)
    with pytest.raises(ValueError, match="stride must be in"):
        TilingConfig(tile=64, stride=0)
    ae.tiling = TilingConfig(tile=100, stride=64)
    with pytest.raises(ValueError, match="multiples of the spatial compression 8"):
        ae.decode(torch.randn(1, 8, 16, 16), tiled=True)
