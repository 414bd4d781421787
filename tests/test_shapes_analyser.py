"""The analyser on images drawn here with plain numpy (not with the world's renderer)."""

import numpy as np
import pytest
from PIL import Image, ImageFilter

from fastsana.shapes.analyser import AnalyserConfig, analyse
from fastsana.shapes.world import BACKGROUND, PALETTE

SIZE = 200


def _canvas() -> np.ndarray:
    return np.full((SIZE, SIZE, 3), BACKGROUND, dtype=np.uint8)


def _grid():
    yy, xx = np.mgrid[0:SIZE, 0:SIZE]
    return xx + 0.5, yy + 0.5


def _draw(img, mask, colour):
    img[mask] = PALETTE[colour]


def _square(x0, y0, side):
    x, y = _grid()
    return (x >= x0) & (x < x0 + side) & (y >= y0) & (y < y0 + side)


def _disc(cx, cy, r):
    x, y = _grid()
    return (x - cx) ** 2 + (y - cy) ** 2 <= r**2


def _triangle(points):
    """On the same side of all three edges (either orientation)."""
    x, y = _grid()
    sides = [
        (bx - ax) * (y - ay) - (by - ay) * (x - ax)
        for (ax, ay), (bx, by) in zip(points, points[1:] + points[:1], strict=True)
    ]
    return np.all([s >= 0 for s in sides], 0) | np.all([s <= 0 for s in sides], 0)


def _star(cx, cy, r_out, r_in, turn=0.0):
    """Union of the five triangles centre–inner–outer–inner, as a polar test."""
    x, y = _grid()
    angle = (np.arctan2(y - cy, x - cx) - turn) % (2 * np.pi / 5)
    # Distance to the star's edge along a ray at angle a within one 72° sector (outer point at 0).
    a = np.minimum(angle, 2 * np.pi / 5 - angle)
    # Edge from outer point (r_out, 0) to inner point (r_in, 36°): intersect with the ray.
    ox, oy = r_out, 0.0
    ix, iy = r_in * np.cos(np.pi / 5), r_in * np.sin(np.pi / 5)
    dx, dy = np.cos(a), np.sin(a)
    ex, ey = ix - ox, iy - oy
    t = (ox * ey - oy * ex) / (dx * ey - dy * ex)
    return np.hypot(x - cx, y - cy) <= t


def test_known_shapes_colours_and_centroids():
    img = _canvas()
    _draw(img, _square(20, 30, 40), "red")  # centre (40, 50)
    _draw(img, _disc(140, 50, 25), "blue")
    _draw(img, _triangle([(50, 110), (20, 170), (80, 170)]), "yellow")  # centroid (50, 150)
    _draw(img, _star(140, 140, 35, 13.4, turn=-np.pi / 2), "purple")
    dets = {d.colour: d for d in analyse(img)}
    assert {c: d.shape for c, d in dets.items()} == {
        "red": "square",
        "blue": "circle",
        "yellow": "triangle",
        "purple": "star",
    }
    expected_centres = {
        "red": (40, 50),
        "blue": (140, 50),
        "yellow": (50, 150),
        "purple": (140, 140),
    }
    for colour, (cx, cy) in expected_centres.items():
        assert dets[colour].cx * SIZE == pytest.approx(cx, abs=0.6)
        assert dets[colour].cy * SIZE == pytest.approx(cy, abs=0.6)
    assert dets["red"].size * SIZE == pytest.approx(40, abs=1)
    # The 3×3 majority filter shaves the four one-pixel corners of a hard-edged square.
    assert dets["red"].area * SIZE**2 == pytest.approx(1600, abs=4)


def test_shape_features_do_not_depend_on_rotation():
    img = _canvas()
    c, h = 60.0, 30.0
    corners = [(c + h * np.cos(a), c + h * np.sin(a)) for a in np.pi / 4 + np.arange(4) * np.pi / 2]
    _draw(img, _triangle(corners[:3]) | _triangle([corners[0], corners[2], corners[3]]), "green")
    _draw(img, _star(140, 140, 35, 13.4, turn=0.3), "orange")
    _draw(img, _triangle([(150, 20), (110, 70), (190, 60)]), "white")  # a scalene triangle
    shapes = {d.colour: d.shape for d in analyse(img)}
    assert shapes == {"green": "square", "orange": "star", "white": "triangle"}


def test_same_colour_objects_are_separate_and_specks_are_ignored():
    img = _canvas()
    _draw(img, _disc(50, 50, 20), "black")
    _draw(img, _disc(150, 50, 20), "black")
    _draw(img, _disc(100, 150, 20), "black")
    _draw(img, _square(100, 20, 4), "black")  # 16 px speck
    img[180:182, :] = PALETTE["black"]  # a 2-pixel line: large but without interior
    dets = analyse(img)
    assert [d.shape for d in dets] == ["circle", "circle", "circle"]
    assert [round(d.cy * SIZE) for d in dets] == [50, 50, 150]  # top to bottom


def test_colours_far_from_the_palette_are_not_objects():
    img = _canvas()
    img[_disc(100, 100, 40)] = (0, 255, 255)  # cyan: no palette colour nearby
    assert analyse(img) == []


def test_robust_to_noise_and_blur():
    img = _canvas()
    _draw(img, _square(20, 30, 50), "orange")
    _draw(img, _disc(140, 60, 28), "green")
    _draw(img, _star(100, 145, 40, 15.3, turn=-np.pi / 2), "white")
    blurred = np.asarray(Image.fromarray(img).filter(ImageFilter.GaussianBlur(1.5))).astype(float)
    noisy = blurred + np.random.default_rng(0).normal(0, 20, blurred.shape)
    dets = analyse(np.clip(noisy, 0, 255).astype(np.uint8))
    assert sorted((d.colour, d.shape) for d in dets) == [
        ("green", "circle"),
        ("orange", "square"),
        ("white", "star"),
    ]


def test_large_images_are_downsampled_to_the_same_answer():
    img = _canvas()
    _draw(img, _disc(100, 100, 40), "red")
    big = np.asarray(Image.fromarray(img).resize((800, 800), Image.Resampling.NEAREST))
    (small,) = analyse(img)
    (large,) = analyse(big)
    assert (large.shape, large.colour) == (small.shape, small.colour)
    assert large.cx == pytest.approx(small.cx, abs=0.01)


def test_bad_input():
    with pytest.raises(ValueError, match="H×W×3 uint8"):
        analyse(np.zeros((10, 10), np.uint8))
    with pytest.raises(TypeError, match="PIL image or a numpy array"):
        analyse("image.png")
    with pytest.raises(ValueError, match="min_area"):
        AnalyserConfig(min_area=2.0)
