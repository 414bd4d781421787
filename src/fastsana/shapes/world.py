"""The Shapes world: palette, shapes, geometry, scene sampling and rendering.

A scene is 1–4 flat-coloured shapes on a mid-grey background. Coordinates are fractions of the
image side (x to the right, y downwards), so one scene renders at any resolution. An object's
``(cx, cy)`` is the centroid of its area, which is what the analyser measures; its ``size`` is
the larger side of its bounding box.

Rendering draws at ``supersample``× the target size with PIL and box-averages down, so edge
pixels are exact mixtures of the object colour and the background and interiors are exact
palette colours.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np
from PIL import Image, ImageDraw

BACKGROUND: tuple[int, int, int] = (128, 128, 128)

PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (240, 210, 40),
    "purple": (140, 60, 180),
    "orange": (245, 140, 30),
    "white": (245, 245, 245),
    "black": (20, 20, 20),
}
COLOURS: tuple[str, ...] = tuple(PALETTE)
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star")

# (colour, shape) pairs never drawn in training images unless asked for, to measure
# compositional generalisation. A Latin-square choice: each held-out colour and shape is still
# seen with the three other shapes / seven other colours.
HELD_OUT_PAIRS: frozenset[tuple[str, str]] = frozenset(
    {("red", "star"), ("green", "square"), ("blue", "triangle"), ("yellow", "circle")}
)

MIN_SIZE = 0.15  # object size bounds, as fractions of the image width
MAX_SIZE = 0.35
# Crowded scenes get smaller objects so that rejection sampling finds a layout quickly.
MAX_SIZE_FOR_COUNT = {1: 0.35, 2: 0.35, 3: 0.30, 4: 0.26}
EDGE_MARGIN = 0.02  # free border between any object and the image edge
GAP = 0.04  # free space between the bounding boxes of two objects
MAX_OBJECTS = 4

# Regular pentagram outline: inner radius / outer radius = sin 18° / sin 54°.
STAR_INNER_RATIO = math.sin(math.radians(18)) / math.sin(math.radians(54))
_STAR_WIDTH = 2 * math.sin(math.radians(72))  # bounding-box width of a unit-radius star
_STAR_BOTTOM = math.cos(math.radians(36))  # lowest point below the centre, unit radius

RELATIONS: tuple[str, ...] = ("left of", "right of", "above", "below")
OPPOSITE: dict[str, str] = {
    "left of": "right of",
    "right of": "left of",
    "above": "below",
    "below": "above",
}
# (minimum offset along the relation's axis, minimum cosine between offset and axis).
# Scoring accepts anything within 60° of the axis (as GenEval does); captions and ground-truth
# renders use only layouts within 30° and well separated, so they are unambiguous to a reader.
LOOSE_RELATION = (0.05, 0.5)
CLEAR_RELATION = (0.15, math.cos(math.radians(30)))


class Located(Protocol):
    """Anything with a centroid in image fractions (scene objects and detections)."""

    cx: float
    cy: float


def _check_colour(colour: str, what: str) -> None:
    if colour not in PALETTE:
        raise ValueError(f"{what}: unknown colour {colour!r}; expected one of {COLOURS}")


def _check_shape(shape: str, what: str) -> None:
    if shape not in SHAPES:
        raise ValueError(f"{what}: unknown shape {shape!r}; expected one of {SHAPES}")


@dataclass(frozen=True)
class SceneObject:
    """One ground-truth object; positions and size are fractions of the image side."""

    shape: str
    colour: str
    cx: float
    cy: float
    size: float

    def __post_init__(self) -> None:
        _check_shape(self.shape, "SceneObject.shape")
        _check_colour(self.colour, "SceneObject.colour")
        if not 0.0 < self.size <= 1.0:
            raise ValueError(f"SceneObject.size must be in (0, 1], got {self.size}")
        if not (0.0 <= self.cx <= 1.0 and 0.0 <= self.cy <= 1.0):
            raise ValueError(f"SceneObject centre must lie in [0, 1]², got ({self.cx}, {self.cy})")

    def outline(self) -> list[tuple[float, float]]:
        """Polygon vertices in image fractions (a circle gives its bounding square)."""
        s, cx, cy = self.size, self.cx, self.cy
        if self.shape == "square":
            h = s / 2
            return [(cx - h, cy - h), (cx + h, cy - h), (cx + h, cy + h), (cx - h, cy + h)]
        if self.shape == "triangle":
            # Isosceles, base = height = s, apex up; the centroid sits 2/3 of the way down.
            return [(cx, cy - 2 * s / 3), (cx + s / 2, cy + s / 3), (cx - s / 2, cy + s / 3)]
        if self.shape == "star":
            outer = s / _STAR_WIDTH
            inner = outer * STAR_INNER_RATIO
            points = []
            for k in range(10):
                r = outer if k % 2 == 0 else inner
                angle = math.radians(-90 + 36 * k)  # first point straight up
                points.append((cx + r * math.cos(angle), cy + r * math.sin(angle)))
            return points
        h = s / 2  # circle: its bounding square, for callers that want corners
        return [(cx - h, cy - h), (cx + h, cy - h), (cx + h, cy + h), (cx - h, cy + h)]

    def bbox(self) -> tuple[float, float, float, float]:
        """(x0, y0, x1, y1) in image fractions."""
        s, cx, cy = self.size, self.cx, self.cy
        if self.shape == "triangle":
            return (cx - s / 2, cy - 2 * s / 3, cx + s / 2, cy + s / 3)
        if self.shape == "star":
            outer = s / _STAR_WIDTH
            return (cx - s / 2, cy - outer, cx + s / 2, cy + outer * _STAR_BOTTOM)
        return (cx - s / 2, cy - s / 2, cx + s / 2, cy + s / 2)

    def to_dict(self) -> dict:
        return {
            "shape": self.shape,
            "colour": self.colour,
            "cx": round(self.cx, 5),
            "cy": round(self.cy, 5),
            "size": round(self.size, 5),
            "bbox": [round(v, 5) for v in self.bbox()],
        }

    @classmethod
    def from_dict(cls, d: dict) -> SceneObject:
        return cls(d["shape"], d["colour"], float(d["cx"]), float(d["cy"]), float(d["size"]))


def allowed_pairs(include_held_out: bool = False) -> list[tuple[str, str]]:
    """Every (colour, shape) pair a training image may contain, in a fixed order."""
    return [
        (c, s) for c in COLOURS for s in SHAPES if include_held_out or (c, s) not in HELD_OUT_PAIRS
    ]


def offsets_along(dx: float, dy: float) -> dict[str, float]:
    """How far a point at offset (dx, dy) from another lies in each relation's direction
    (image coordinates: y grows downwards)."""
    return {"left of": -dx, "right of": dx, "above": -dy, "below": dy}


def relations(a: Located, b: Located, *, clear: bool = False) -> frozenset[str]:
    """The relations from ``RELATIONS`` that hold for ``a`` relative to ``b``."""
    min_offset, min_cos = CLEAR_RELATION if clear else LOOSE_RELATION
    dx, dy = a.cx - b.cx, a.cy - b.cy
    norm = math.hypot(dx, dy)
    along = offsets_along(dx, dy)
    return frozenset(r for r, s in along.items() if s >= min_offset and s >= min_cos * norm)


def _boxes_apart(a: SceneObject, b: SceneObject) -> bool:
    ax0, ay0, ax1, ay1 = a.bbox()
    bx0, by0, bx1, by1 = b.bbox()
    return ax1 + GAP <= bx0 or bx1 + GAP <= ax0 or ay1 + GAP <= by0 or by1 + GAP <= ay0


def _inside(obj: SceneObject) -> bool:
    x0, y0, x1, y1 = obj.bbox()
    return min(x0, y0) >= EDGE_MARGIN and max(x1, y1) <= 1.0 - EDGE_MARGIN


def place_objects(
    classes: Sequence[tuple[str, str]],
    rng: np.random.Generator,
    *,
    relation: str | None = None,
    max_tries: int = 2000,
) -> list[SceneObject]:
    """Random non-overlapping layout for ``classes`` (a list of (colour, shape)).

    With ``relation``, object 0 must stand clearly in that relation to object 1 (see
    ``CLEAR_RELATION``). Rejection sampling of whole layouts; raises RuntimeError if none is
    found in ``max_tries`` attempts (practically impossible within the world's limits).
    """
    n = len(classes)
    if not 1 <= n <= MAX_OBJECTS:
        raise ValueError(f"a scene holds 1–{MAX_OBJECTS} objects, got {n}")
    if relation is not None:
        if relation not in RELATIONS:
            raise ValueError(f"relation must be one of {RELATIONS}, got {relation!r}")
        if n != 2:
            raise ValueError(f"a relation needs exactly two objects, got {n}")
    max_size = MAX_SIZE_FOR_COUNT[n]
    for _ in range(max_tries):
        placed: list[SceneObject] = []
        for colour, shape in classes:
            size = float(rng.uniform(MIN_SIZE, max_size))
            cx, cy = rng.uniform(0.0, 1.0, size=2)
            obj = SceneObject(shape, colour, float(cx), float(cy), size)
            if not _inside(obj) or not all(_boxes_apart(obj, other) for other in placed):
                break
            placed.append(obj)
        else:
            if relation is None or relation in relations(placed[0], placed[1], clear=True):
                return placed
    raise RuntimeError(f"no layout found for {list(classes)} (relation={relation!r})")


@dataclass(frozen=True)
class SceneMix:
    """What training scenes are made of: the probability of each scene kind — one object
    (``single``); 2–4 copies of one class (``count``); two different classes (``pair``); 3–4
    objects of mixed classes (``mixed``) — and the share of pair scenes placed in a clear
    spatial relation (``relation``). The defaults are the shipped model's data."""

    single: float = 0.2
    count: float = 0.25
    pair: float = 0.35
    mixed: float = 0.2
    relation: float = 0.5

    def __post_init__(self) -> None:
        for name, value in self.as_dict().items():
            if not (isinstance(value, (int, float)) and 0.0 <= value <= 1.0):
                raise ValueError(f"SceneMix.{name} must be a number in [0, 1], got {value!r}")
        total = sum(self.kinds().values())
        if abs(total - 1.0) > 1e-6:
            raise ValueError(
                f"SceneMix kind probabilities single + count + pair + mixed must sum to 1, "
                f"got {total:g} ({self.kinds()})"
            )

    def kinds(self) -> dict[str, float]:
        return {"single": self.single, "count": self.count, "pair": self.pair, "mixed": self.mixed}

    def as_dict(self) -> dict[str, float]:
        return {**self.kinds(), "relation": self.relation}

    @classmethod
    def parse(cls, text: str) -> SceneMix:
        """``"pair=0.6,count=0.2,single=0.1,mixed=0.1,relation=0.9"``; fields not named keep
        their defaults (so the kinds named must leave the rest summing to 1)."""
        fields: dict[str, float] = {}
        for item in filter(None, (part.strip() for part in text.split(","))):
            key, sep, value = item.partition("=")
            key = key.strip()
            if not sep or key not in cls().as_dict():
                raise ValueError(
                    f"scene mix items are NAME=VALUE with NAME one of "
                    f"{', '.join(cls().as_dict())}, got {item!r}"
                )
            try:
                fields[key] = float(value)
            except ValueError:
                raise ValueError(f"scene mix {key} must be a number, got {value!r}") from None
        return cls(**fields)


DEFAULT_SCENE_MIX = SceneMix()


def sample_scene(
    rng: np.random.Generator,
    pairs: Sequence[tuple[str, str]],
    mix: SceneMix = DEFAULT_SCENE_MIX,
) -> list[SceneObject]:
    """A random training scene drawn from the (colour, shape) ``pairs`` allowed, its kind
    drawn from ``mix``."""
    if len(pairs) < 2:
        raise ValueError(f"sample_scene needs at least two allowed pairs, got {len(pairs)}")
    kinds = mix.kinds()
    kind = list(kinds)[rng.choice(len(kinds), p=list(kinds.values()))]

    def pick() -> tuple[str, str]:
        return pairs[rng.integers(len(pairs))]

    if kind == "single":
        return place_objects([pick()], rng)
    if kind == "count":
        return place_objects([pick()] * int(rng.integers(2, MAX_OBJECTS + 1)), rng)
    if kind == "pair":
        first = pick()
        second = pick()
        while second == first:
            second = pick()
        relation = RELATIONS[rng.integers(len(RELATIONS))] if rng.random() < mix.relation else None
        return place_objects([first, second], rng, relation=relation)
    n = int(rng.integers(3, MAX_OBJECTS + 1))
    classes = [pick() for _ in range(n)]
    while len(set(classes)) < 2:
        classes[-1] = pick()
    return place_objects(classes, rng)


def render_scene(
    objects: Sequence[SceneObject], size: int = 256, supersample: int = 4
) -> Image.Image:
    """Render ``objects`` on the background as a ``size``×``size`` RGB image."""
    if size < 16:
        raise ValueError(f"size must be at least 16 pixels, got {size}")
    if supersample < 1:
        raise ValueError(f"supersample must be >= 1, got {supersample}")
    big = size * supersample
    canvas = Image.new("RGB", (big, big), BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    for obj in objects:
        colour = PALETTE[obj.colour]
        if obj.shape == "circle":
            x0, y0, x1, y1 = (v * big for v in obj.bbox())
            # PIL's ellipse box is inclusive of its far edge: shrink by one (supersampled) pixel.
            draw.ellipse((x0, y0, x1 - 1, y1 - 1), fill=colour)
        else:
            draw.polygon([(x * big, y * big) for x, y in obj.outline()], fill=colour)
    return canvas.reduce(supersample) if supersample > 1 else canvas
