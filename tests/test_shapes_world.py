"""The Shapes world: determinism, exact palette, sizes, layout, relations."""

import math

import numpy as np
import pytest

from fastsana.shapes.world import (
    BACKGROUND,
    HELD_OUT_PAIRS,
    MAX_SIZE,
    MIN_SIZE,
    PALETTE,
    SceneMix,
    SceneObject,
    allowed_pairs,
    place_objects,
    relations,
    render_scene,
    sample_scene,
)

PAIRS = allowed_pairs(include_held_out=False)


def _scene(i: int) -> list[SceneObject]:
    return sample_scene(np.random.default_rng([11, i]), PAIRS)


def test_palette_is_the_specified_one():
    assert BACKGROUND == (128, 128, 128)
    assert PALETTE == {
        "red": (220, 40, 40),
        "green": (40, 170, 60),
        "blue": (40, 80, 220),
        "yellow": (240, 210, 40),
        "purple": (140, 60, 180),
        "orange": (245, 140, 30),
        "white": (245, 245, 245),
        "black": (20, 20, 20),
    }
    assert len(allowed_pairs(include_held_out=True)) == 32
    assert len(PAIRS) == 32 - len(HELD_OUT_PAIRS)
    assert 4 <= len(HELD_OUT_PAIRS) <= 6 and not HELD_OUT_PAIRS & set(PAIRS)


def test_scenes_and_renders_are_deterministic():
    for i in range(5):
        a, b = _scene(i), _scene(i)
        assert a == b
        assert np.array_equal(np.asarray(render_scene(a, 128)), np.asarray(render_scene(b, 128)))
    assert [_scene(i) for i in range(5)] != [
        sample_scene(np.random.default_rng([12, i]), PAIRS) for i in range(5)
    ]


def test_every_pixel_is_background_an_object_colour_or_a_mix_of_the_two():
    background = np.array(BACKGROUND, float)
    for i in range(12):
        objects = _scene(i)
        img = np.asarray(render_scene(objects, 128)).reshape(-1, 3).astype(float)
        # Distance of each pixel to the segment background→colour, for each colour present.
        best = np.full(len(img), np.inf)
        for colour in {o.colour for o in objects}:
            direction = np.array(PALETTE[colour], float) - background
            t = np.clip((img - background) @ direction / (direction @ direction), 0, 1)
            dist = np.linalg.norm(img - (background + t[:, None] * direction), axis=1)
            best = np.minimum(best, dist)
        assert best.max() <= 1.5, f"scene {i}: a pixel is no mix of background and one colour"


def test_object_interiors_are_exact_palette_colours():
    size = 256
    for i in range(12):
        objects = _scene(i)
        img = np.asarray(render_scene(objects, size))
        for o in objects:
            # A disc well inside every shape: around the centroid (the incircle centre of the
            # triangle lies lower, s/3 - 0.309 s below it), radius 8% of the size.
            cy = o.cy + (o.size / 3 - 0.309 * o.size if o.shape == "triangle" else 0)
            r = 0.08 * o.size * size
            yy, xx = np.mgrid[0:size, 0:size]
            inside = (xx + 0.5 - o.cx * size) ** 2 + (yy + 0.5 - cy * size) ** 2 <= r**2
            assert inside.sum() > 3
            assert (img[inside] == PALETTE[o.colour]).all(), f"scene {i}: {o}"


def test_sizes_inside_the_image_and_no_overlaps():
    size = 256
    for i in range(30):
        objects = _scene(i)
        assert 1 <= len(objects) <= 4
        masks = []
        for o in objects:
            assert MIN_SIZE <= o.size <= MAX_SIZE
            alone = np.asarray(render_scene([o], size)).astype(int)
            mask = (np.abs(alone - BACKGROUND).sum(-1) > 0).astype(bool)
            ys, xs = np.nonzero(mask)
            width = max(xs.max() - xs.min() + 1, ys.max() - ys.min() + 1) / size
            assert abs(width - o.size) <= 2 / size, f"scene {i}: {o} drawn {width:.3f} wide"
            # Fully inside, with a border: no object pixel on the outermost pixels.
            assert xs.min() > 0 and ys.min() > 0 and xs.max() < size - 1 and ys.max() < size - 1
            masks.append(mask)
        for a in range(len(masks)):
            for b in range(a + 1, len(masks)):
                assert not (masks[a] & masks[b]).any(), f"scene {i}: objects {a}, {b} overlap"
                # and a margin: dilating one mask by 4 pixels still does not touch the other
                grown = masks[a].copy()
                for dy in range(-4, 5):
                    for dx in range(-4, 5):
                        grown |= np.roll(np.roll(masks[a], dy, 0), dx, 1)
                assert not (grown & masks[b]).any()


class _P:
    def __init__(self, cx, cy):
        self.cx, self.cy = cx, cy


@pytest.mark.parametrize(
    ("a", "b", "expected"),
    [
        ((0.2, 0.5), (0.8, 0.5), {"left of"}),
        ((0.8, 0.5), (0.2, 0.5), {"right of"}),
        ((0.5, 0.1), (0.5, 0.9), {"above"}),
        ((0.5, 0.9), (0.5, 0.1), {"below"}),
        ((0.2, 0.2), (0.8, 0.8), {"left of", "above"}),  # diagonal: both, within 60°
        ((0.5, 0.5), (0.52, 0.5), set()),  # too close
    ],
)
def test_relations_loose(a, b, expected):
    assert relations(_P(*a), _P(*b)) == expected


def test_relations_clear_need_a_dominant_axis():
    assert relations(_P(0.2, 0.2), _P(0.8, 0.8), clear=True) == set()
    angle = math.radians(20)
    assert relations(
        _P(0.5, 0.5), _P(0.5 + 0.3 * math.cos(angle), 0.5 + 0.3 * math.sin(angle)), clear=True
    ) == {"left of"}


def test_place_objects_honours_relation_and_rejects_bad_input():
    rng = np.random.default_rng(0)
    for relation in ("left of", "right of", "above", "below"):
        a, b = place_objects([("red", "circle"), ("blue", "square")], rng, relation=relation)
        assert relation in relations(a, b, clear=True)
    with pytest.raises(ValueError, match="1–4 objects"):
        place_objects([("red", "circle")] * 5, rng)
    with pytest.raises(ValueError, match="relation"):
        place_objects([("red", "circle")], rng, relation="left of")
    with pytest.raises(ValueError, match="unknown colour"):
        SceneObject("circle", "pink", 0.5, 0.5, 0.2)


def test_scene_mix_shapes_the_scenes():
    rng = np.random.default_rng(3)
    # Only pairs, every one in a clear relation.
    related = SceneMix(single=0, count=0, pair=1, mixed=0, relation=1)
    for _ in range(40):
        a, b = sample_scene(rng, PAIRS, related)
        assert (a.colour, a.shape) != (b.colour, b.shape)
        assert relations(a, b, clear=True), (a, b)
    # Only counting scenes: 2-4 copies of one class.
    for _ in range(40):
        objects = sample_scene(rng, PAIRS, SceneMix(single=0, count=1, pair=0, mixed=0))
        assert 2 <= len(objects) <= 4
        assert len({(o.colour, o.shape) for o in objects}) == 1
    # The default mix is the default: the same draws as calling without one.
    for i in range(20):
        assert sample_scene(np.random.default_rng([5, i]), PAIRS) == sample_scene(
            np.random.default_rng([5, i]), PAIRS, SceneMix()
        )


def test_scene_mix_parse_and_validation():
    mix = SceneMix.parse("pair=0.55, mixed=0, relation=0.9")
    assert mix.as_dict() == {"single": 0.2, "count": 0.25, "pair": 0.55, "mixed": 0.0,
                             "relation": 0.9}  # fmt: skip
    assert SceneMix.parse("") == SceneMix()
    with pytest.raises(ValueError, match="sum to 1"):
        SceneMix.parse("pair=0.9")
    with pytest.raises(ValueError, match="NAME one of"):
        SceneMix.parse("pairs=0.35")
    with pytest.raises(ValueError, match="NAME one of"):
        SceneMix.parse("pair")
    with pytest.raises(ValueError, match="must be a number"):
        SceneMix.parse("relation=lots")
    with pytest.raises(ValueError, match=r"relation must be a number in \[0, 1\]"):
        SceneMix(relation=1.5)
