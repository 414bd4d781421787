"""bench/relation_classifier.py: its false captions, and its control on the embedded model."""

from __future__ import annotations

import pytest
import torch

from bench.relation_classifier import (
    SWAPS,
    encode_captions,
    encode_scenes,
    false_caption,
    loss_gaps,
    relation_scenes,
)
from fastsana.pipeline import SanaPipeline, default_model_path
from fastsana.shapes.grammar import parse_caption


def test_false_captions_change_one_thing() -> None:
    true = parse_caption("a red circle to the left of a blue square")
    relation = parse_caption(false_caption(true, "relation").text())
    assert relation.mentions == true.mentions and relation.relation == "right of"
    order = parse_caption(false_caption(true, "order").text())
    assert order.mentions == true.mentions[::-1] and order.relation == "left of"
    colour = parse_caption(false_caption(true, "colour").text())
    assert colour.relation == true.relation and colour.mentions[1] == true.mentions[1]
    assert colour.mentions[0].shape == "circle"
    assert colour.mentions[0].colour not in ("red", "blue")
    assert set(SWAPS) == {"relation", "order", "colour"}
    with pytest.raises(ValueError, match="swap must be one of"):
        false_caption(true, "shape")


def test_scenes_are_two_object_relation_scenes() -> None:
    images, captions = relation_scenes(4, 128, seed=0)
    assert len(images) == len(captions) == 4
    assert all(c.relation is not None and len(c.mentions) == 2 for c in captions)
    assert all(im.size == (128, 128) for im in images)


def test_control_prefers_the_true_colour() -> None:
    """The embedded model draws the colours it is asked for (ShapesBench colours ≈ 1.0), so
    its loss must be lower with the true caption than with a wrong colour on most scenes (the
    script's full run: 0.93). Were the two captions' losses swapped, or mismatched with their
    scenes, the fraction would be near or below 0.5."""
    pipe = SanaPipeline.from_pretrained(default_model_path(), dtype=torch.float32)
    images, captions = relation_scenes(12, pipe.native_size, seed=5)
    x0 = encode_scenes(pipe, images)
    true = encode_captions(pipe, captions)
    wrong = encode_captions(pipe, [false_caption(c, "colour") for c in captions])
    gaps = loss_gaps(pipe.transformer, x0, true, wrong, sigmas=[0.7], noises=2)  # (1, 12)
    assert gaps.shape == (1, 12)
    # At σ = 0.7 the gap is small but steady; at 0.85 it is larger and noisier per draw.
    assert (gaps.sum(dim=0) > 0).float().mean() >= 0.75, gaps
