"""Captions of a training image and the CLIP-score-weighted choice of one per sample.

SANA trains on several captions per image (the original one and VLM captions), each scored
by CLIP. Every time an image is drawn, one caption is chosen:

1. Keep the captions with ``clip_score >= threshold`` (default 25). If none passes, keep only
   the best-scored one.
2. Draw one of the kept captions with probability

   - ``weighting="power"`` (the official code, default): ``p_i ∝ s_i ** (1 / τ)``
   - ``weighting="softmax"`` (the paper's formula): ``p_i ∝ exp(s_i / τ)``

   with ``τ = temperature`` (default 0.1). With τ = 0.1 the power rule gives a caption
   scoring 30 about 6x the probability of one scoring 25 (``(30/25) ** 10``); the softmax rule
   with the same τ all but always picks the best one (``exp(50)``), so use a larger τ with it.

Captions without scores are drawn uniformly. A record mixes neither: all its captions have a
score or none has.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

CaptionWeighting = Literal["power", "softmax"]


@dataclass(frozen=True)
class Caption:
    """One caption of an image; ``clip_score`` is None when the caption is unscored."""

    text: str
    clip_score: float | None = None


def parse_captions(record: Mapping[str, Any], where: str) -> tuple[Caption, ...]:
    """The captions of one metadata record; ``where`` names the record in error messages.

    Accepted forms, in this order of precedence (other keys are ignored):

    - ``"captions": [{"text": "...", "clip_score": 31.2}, ...]`` (``clip_score`` optional)
    - ``"captions": ["a", "b"]`` (unscored)
    - ``"text": "..."`` or ``"caption": "..."`` (a single unscored caption)
    """
    if "captions" in record:
        raw = record["captions"]
        if not isinstance(raw, list) or not raw:
            raise ValueError(f"{where}: 'captions' must be a non-empty list, got {raw!r}")
        captions = tuple(_parse_one(item, f"{where}, captions[{i}]") for i, item in enumerate(raw))
    elif "text" in record or "caption" in record:
        key = "text" if "text" in record else "caption"
        captions = (_parse_one(record[key], f"{where}, '{key}'"),)
    else:
        raise ValueError(f"{where}: no caption; expected a 'captions', 'text' or 'caption' key")
    scored = [c.clip_score is not None for c in captions]
    if any(scored) and not all(scored):
        raise ValueError(
            f"{where}: some captions have a clip_score and some do not; "
            "give every caption of a record a score, or none"
        )
    return captions


def _parse_one(item: Any, where: str) -> Caption:
    if isinstance(item, str):
        return Caption(item)
    if not isinstance(item, Mapping):
        raise ValueError(f"{where}: a caption must be a string or an object, got {item!r}")
    text = item.get("text")
    if not isinstance(text, str):
        raise ValueError(f"{where}: caption 'text' must be a string, got {text!r}")
    score = item.get("clip_score")
    if score is None:
        return Caption(text)
    if isinstance(score, bool) or not isinstance(score, int | float) or not math.isfinite(score):
        raise ValueError(f"{where}: 'clip_score' must be a finite number, got {score!r}")
    return Caption(text, float(score))


@dataclass(frozen=True)
class CaptionSelection:
    """How one caption is chosen among an image's scored captions (see the module docstring).

    ``threshold``: CLIP score a caption needs to be eligible (the best one is kept if none
    passes). ``temperature``: τ in the weighting. ``weighting``: ``"power"`` (s^(1/τ), the
    official code) or ``"softmax"`` (exp(s/τ), the paper).
    """

    threshold: float = 25.0
    temperature: float = 0.1
    weighting: CaptionWeighting = "power"

    def __post_init__(self) -> None:
        if self.weighting not in ("power", "softmax"):
            raise ValueError(f"weighting must be 'power' or 'softmax', got {self.weighting!r}")
        if not (math.isfinite(self.temperature) and self.temperature > 0):
            raise ValueError(f"temperature must be a positive number, got {self.temperature!r}")
        if not math.isfinite(self.threshold):
            raise ValueError(f"threshold must be a finite number, got {self.threshold!r}")
        # s ** (1/τ) is only a weight for s > 0, and the kept scores are >= threshold.
        if self.weighting == "power" and self.threshold <= 0:
            raise ValueError(
                f"weighting='power' needs threshold > 0 (scores are raised to 1/τ), "
                f"got threshold={self.threshold}"
            )

    def probabilities(self, captions: Sequence[Caption]) -> np.ndarray:
        """The probability of drawing each caption (zeros for those below the threshold)."""
        if not captions:
            raise ValueError("an image needs at least one caption")
        if captions[0].clip_score is None:
            return np.full(len(captions), 1.0 / len(captions))
        scores = np.array([c.clip_score for c in captions], dtype=np.float64)
        kept = scores >= self.threshold
        if not kept.any():
            kept = np.arange(len(scores)) == int(np.argmax(scores))
        if kept.sum() == 1:
            return kept.astype(np.float64)
        # Weights in log space: s ** 10 or exp(s / 0.1) overflow float64 for large scores.
        log_weights = np.log(scores[kept]) if self.weighting == "power" else scores[kept]
        log_weights = log_weights / self.temperature
        weights = np.exp(log_weights - log_weights.max())
        probs = np.zeros(len(scores))
        probs[kept] = weights / weights.sum()
        return probs

    def choose(self, captions: Sequence[Caption], rng: np.random.Generator) -> int:
        """The index of the caption drawn with ``rng`` (reproducible for a seeded ``rng``)."""
        if len(captions) == 1:
            return 0
        cdf = np.cumsum(self.probabilities(captions))
        # First index whose cumulative probability exceeds u: zero-probability captions are
        # never drawn.
        return int(np.searchsorted(cdf, rng.random() * cdf[-1], side="right"))
