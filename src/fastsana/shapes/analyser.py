"""Deterministic detection of Shapes-world objects in an image (numpy only).

1. Each pixel gets the nearest reference colour (background or palette) if it lies within
   ``max_colour_distance`` of it (RGB Euclidean), else no label; a 3×3 majority filter then
   removes isolated noisy pixels, as a generative model produces.
2. Connected components (4-connectivity) per colour, found on horizontal runs of equal labels
   linked across rows and merged by vectorised union-find (hooking + pointer jumping).
3. Components smaller than ``min_area`` of the image, or without enough interior pixels (all four
   neighbours of the same colour), are dropped: specks, and thin fringes of a third colour that a
   blurry edge between an object and the background can produce.
4. Shape from two rotation-invariant features: solidity = area / convex-hull area (stars ≈ 0.47,
   convex shapes ≈ 1) and compactness = area / (π r_max²), r_max the largest centroid-to-hull
   distance (circle ≈ 1, square ≈ 0.64, triangle ≈ 0.36).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np
from PIL import Image

from fastsana.shapes.world import BACKGROUND, COLOURS, PALETTE

UNKNOWN_SHAPE = "unknown"


@dataclass(frozen=True)
class AnalyserConfig:
    """Thresholds of the analyser; the defaults are tuned on ground-truth renders (docs)."""

    work_size: int = 256  # larger images are box-downsampled to this longer side first
    max_colour_distance: float = 64.0  # RGB distance beyond which a pixel has no colour
    mode_filter: bool = True  # 3×3 majority filter on the colour labels
    min_area: float = 0.002  # smallest object, as a fraction of the image area
    min_interior: float = 0.5  # interior pixels needed, as a fraction of min_area
    min_solidity: float = 0.3  # below this a component is no shape ("unknown")
    star_max_solidity: float = 0.75
    circle_min_compactness: float = 0.78
    square_min_compactness: float = 0.55

    def __post_init__(self) -> None:
        if self.work_size < 32:
            raise ValueError(f"work_size must be at least 32 pixels, got {self.work_size}")
        if self.max_colour_distance <= 0:
            raise ValueError(f"max_colour_distance must be > 0, got {self.max_colour_distance}")
        if not 0 < self.min_area < 1:
            raise ValueError(f"min_area is a fraction of the image area, got {self.min_area}")
        if not 0 <= self.min_interior <= 1:
            raise ValueError(f"min_interior must be in [0, 1], got {self.min_interior}")
        if not 0 <= self.min_solidity < self.star_max_solidity <= 1:
            raise ValueError("need 0 <= min_solidity < star_max_solidity <= 1")
        if not 0 < self.square_min_compactness < self.circle_min_compactness <= 1:
            raise ValueError("need 0 < square_min_compactness < circle_min_compactness <= 1")


@dataclass(frozen=True)
class Detection:
    """One detected object; positions and sizes are fractions of the image width/height."""

    shape: str  # one of SHAPES, or "unknown"
    colour: str
    cx: float
    cy: float
    size: float  # larger bounding-box side / image width
    area: float  # fraction of the image area
    bbox: tuple[float, float, float, float]
    solidity: float
    compactness: float

    def to_dict(self) -> dict:
        return {
            "shape": self.shape,
            "colour": self.colour,
            "cx": round(self.cx, 4),
            "cy": round(self.cy, 4),
            "size": round(self.size, 4),
            "area": round(self.area, 5),
            "bbox": [round(v, 4) for v in self.bbox],
            "solidity": round(self.solidity, 3),
            "compactness": round(self.compactness, 3),
        }


_REFERENCES = np.array([BACKGROUND, *PALETTE.values()], dtype=np.float32)  # label k ↔ row k
_NO_LABEL = -1
_KEEP_BITS = 6  # bits per channel of the colour lookup table
_DROP_BITS = 8 - _KEEP_BITS
_BACKGROUND_LABEL = 0


def analyse(
    image: Image.Image | np.ndarray, config: AnalyserConfig | None = None
) -> list[Detection]:
    """The objects in ``image`` (PIL image or H×W×3 uint8 array), top to bottom."""
    config = config or AnalyserConfig()
    rgb = _as_rgb(image, config.work_size)
    labels = _classify_pixels(rgb, config.max_colour_distance)
    if config.mode_filter:
        labels = _mode_filter(labels)
    return _detect(labels, config)


def _as_rgb(image: Image.Image | np.ndarray, work_size: int) -> np.ndarray:
    if isinstance(image, np.ndarray):
        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            raise ValueError(
                f"image array must be H×W×3 uint8, got shape {image.shape} dtype {image.dtype}"
            )
        image = Image.fromarray(image)
    elif not isinstance(image, Image.Image):
        raise TypeError(f"image must be a PIL image or a numpy array, got {type(image).__name__}")
    image = image.convert("RGB")
    w, h = image.size
    if max(w, h) > work_size:
        scale = work_size / max(w, h)
        image = image.resize(
            (max(1, round(w * scale)), max(1, round(h * scale))), Image.Resampling.BOX
        )
    return np.asarray(image)


def _classify_pixels(rgb: np.ndarray, max_distance: float) -> np.ndarray:
    """(H, W) int8 labels: 0 background, 1..8 palette colours in ``COLOURS`` order, -1 none."""
    q = (rgb >> _DROP_BITS).astype(np.int32)  # quantised colour, an index into the lookup table
    index = (q[..., 0] << (2 * _KEEP_BITS)) | (q[..., 1] << _KEEP_BITS) | q[..., 2]
    return _label_table(float(max_distance))[index]


@functools.lru_cache(maxsize=4)
def _label_table(max_distance: float) -> np.ndarray:
    """Label of every quantised colour (64 levels per channel), measured at the bin centre.

    A table lookup is ~20× faster than measuring nine distances per pixel; the quantisation
    error (at most 2 levels per channel) is far below the distances between palette colours.
    """
    levels = (np.arange(2**_KEEP_BITS, dtype=np.float32) + 0.5) * 2**_DROP_BITS
    grid = np.stack(np.meshgrid(levels, levels, levels, indexing="ij"), -1).reshape(-1, 3)
    dist2 = ((grid[:, None, :] - _REFERENCES[None]) ** 2).sum(-1)
    table = dist2.argmin(1).astype(np.int8)
    table[dist2.min(1) > max_distance**2] = _NO_LABEL
    return table


def _mode_filter(labels: np.ndarray) -> np.ndarray:
    """3×3 majority vote; a tie keeps the centre's label (its own vote counts one half more)."""
    h, w = labels.shape
    n_classes = len(_REFERENCES) + 1  # labels shifted by one so that "none" is class 0
    shifted = labels.astype(np.int16) + 1
    onehot = (shifted[None] == np.arange(n_classes, dtype=np.int16)[:, None, None]).astype(np.int16)
    padded = np.pad(onehot, ((0, 0), (1, 1), (1, 1)), mode="edge")
    window = sum(padded[:, dy : dy + h, dx : dx + w] for dy in range(3) for dx in range(3))
    votes = 2 * window + onehot  # the extra half vote of the centre breaks ties
    return (votes.argmax(0) - 1).astype(np.int8)


def _detect(labels: np.ndarray, config: AnalyserConfig) -> list[Detection]:
    h, w = labels.shape
    # Horizontal runs of equal labels, numbered in row-major order.
    starts = np.ones((h, w), dtype=bool)
    starts[:, 1:] = labels[:, 1:] != labels[:, :-1]
    run_of_pixel = np.cumsum(starts.ravel()).reshape(h, w) - 1
    run_rows, run_starts = np.nonzero(starts)
    run_ends = np.append(run_starts[1:], w)
    run_ends[np.append(run_rows[1:] != run_rows[:-1], True)] = w  # a run ends at its row's end
    run_labels = labels[run_rows, run_starts]
    n_runs = len(run_rows)

    # Runs in consecutive rows that touch vertically and share a palette label are one object.
    linked = (labels[1:] == labels[:-1]) & (labels[1:] > _BACKGROUND_LABEL)
    edges = np.unique(run_of_pixel[:-1][linked] * np.int64(n_runs) + run_of_pixel[1:][linked])
    comp = _union_find(n_runs, edges // n_runs, edges % n_runs)

    is_object = run_labels > _BACKGROUND_LABEL
    lengths = run_ends - run_starts
    area = np.bincount(comp[is_object], weights=lengths[is_object], minlength=n_runs)
    interior_count = np.bincount(comp[run_of_pixel[_interior(labels)]], minlength=n_runs)
    min_pixels = config.min_area * h * w
    big_enough = (area >= min_pixels) & (interior_count >= config.min_interior * min_pixels)

    detections = []
    for root in np.nonzero(big_enough)[0]:  # a root is its component's first run: top to bottom
        runs = np.nonzero(comp == root)[0]
        label = int(run_labels[root])
        detections.append(
            _describe(run_rows[runs], run_starts[runs], run_ends[runs], label, w, h, config)
        )
    return detections


def _union_find(n: int, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Component root (smallest member) of each of ``n`` nodes linked by edges ``a``–``b``."""
    comp = np.arange(n)
    while True:
        ca, cb = comp[a], comp[b]
        if np.array_equal(ca, cb):
            return comp
        low = np.minimum(ca, cb)
        np.minimum.at(comp, ca, low)  # hook each root under the smaller root it touches
        np.minimum.at(comp, cb, low)
        while True:  # pointer jumping until every node points at its root
            nxt = comp[comp]
            if np.array_equal(nxt, comp):
                break
            comp = nxt


def _interior(labels: np.ndarray) -> np.ndarray:
    """Pixels whose four neighbours (inside the image) all carry their own palette label."""
    same = labels > _BACKGROUND_LABEL
    same = same.copy()
    same[1:] &= labels[1:] == labels[:-1]
    same[:-1] &= labels[:-1] == labels[1:]
    same[:, 1:] &= labels[:, 1:] == labels[:, :-1]
    same[:, :-1] &= labels[:, :-1] == labels[:, 1:]
    return same


def _describe(
    rows: np.ndarray,
    starts: np.ndarray,
    ends: np.ndarray,
    label: int,
    width: int,
    height: int,
    config: AnalyserConfig,
) -> Detection:
    """Features and class of one component given by its runs ``[start, end)`` on ``rows``."""
    lengths = (ends - starts).astype(np.float64)
    area = lengths.sum()
    # Pixel (x, y) covers [x, x+1) × [y, y+1); sums of x over a run in closed form.
    cx = ((starts + ends) / 2 * lengths).sum() / area
    cy = ((rows + 0.5) * lengths).sum() / area
    row_values, first = np.unique(rows, return_index=True)
    left = np.minimum.reduceat(starts, first)
    right = np.maximum.reduceat(ends, first)
    corners = np.concatenate(
        [
            np.stack([left, row_values], 1),
            np.stack([left, row_values + 1], 1),
            np.stack([right, row_values], 1),
            np.stack([right, row_values + 1], 1),
        ]
    ).astype(np.float64)
    hull = _convex_hull(corners)
    hx, hy = hull[:, 0], hull[:, 1]
    hull_area = 0.5 * abs(np.dot(hx, np.roll(hy, -1)) - np.dot(hy, np.roll(hx, -1)))
    r_max = np.sqrt(((hull - [cx, cy]) ** 2).sum(1)).max()
    solidity = float(area / hull_area)
    compactness = float(area / (math.pi * r_max**2))
    x0, x1 = float(left.min()), float(right.max())
    y0, y1 = float(row_values.min()), float(row_values.max() + 1)
    return Detection(
        shape=_classify_shape(solidity, compactness, config),
        colour=COLOURS[label - 1],
        cx=float(cx / width),
        cy=float(cy / height),
        size=max(x1 - x0, y1 - y0) / width,
        area=float(area / (width * height)),
        bbox=(x0 / width, y0 / height, x1 / width, y1 / height),
        solidity=solidity,
        compactness=compactness,
    )


def _classify_shape(solidity: float, compactness: float, config: AnalyserConfig) -> str:
    if solidity < config.min_solidity:
        return UNKNOWN_SHAPE
    if solidity < config.star_max_solidity:
        return "star"
    if compactness >= config.circle_min_compactness:
        return "circle"
    if compactness >= config.square_min_compactness:
        return "square"
    return "triangle"


def _convex_hull(points: np.ndarray) -> np.ndarray:
    """Counter-clockwise hull of 2-D points (Andrew's monotone chain)."""
    pts = np.unique(points, axis=0)  # sorted by x, then y
    if len(pts) < 3:
        return pts

    def half(seq: np.ndarray) -> list:
        chain: list = []
        for p in seq:
            while len(chain) >= 2:
                (ox, oy), (ax, ay) = chain[-2], chain[-1]
                if (ax - ox) * (p[1] - oy) - (ay - oy) * (p[0] - ox) > 0:
                    break
                chain.pop()
            chain.append((p[0], p[1]))
        return chain

    lower = half(pts)
    upper = half(pts[::-1])
    return np.array(lower[:-1] + upper[:-1])
