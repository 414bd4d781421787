"""Captions: parsing, and truth against what the analyser sees in the rendered image."""

import numpy as np
import pytest

from fastsana.shapes.analyser import analyse
from fastsana.shapes.grammar import (
    Caption,
    CaptionParseError,
    Mention,
    caption_holds,
    parse_caption,
    scene_captions,
    scene_for_caption,
)
from fastsana.shapes.world import HELD_OUT_PAIRS, allowed_pairs, render_scene, sample_scene

PAIRS = allowed_pairs(include_held_out=False)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("a red circle", Caption((Mention(1, "red", "circle"),))),
        ("one red circle", Caption((Mention(1, "red", "circle"),))),
        ("three green stars", Caption((Mention(3, "green", "star"),))),
        ("an orange square.", Caption((Mention(1, "orange", "square"),))),
        (
            "a red circle to the left of a blue square",
            Caption((Mention(1, "red", "circle"), Mention(1, "blue", "square")), "left of"),
        ),
        (
            "a yellow triangle above a purple circle",
            Caption((Mention(1, "yellow", "triangle"), Mention(1, "purple", "circle")), "above"),
        ),
        (
            "two red circles, a blue square and a star",
            Caption(
                (
                    Mention(2, "red", "circle"),
                    Mention(1, "blue", "square"),
                    Mention(1, None, "star"),
                )
            ),
        ),
        ("two white shapes", Caption((Mention(2, "white", None),))),
    ],
)
def test_parse(text, expected):
    assert parse_caption(text) == expected


@pytest.mark.parametrize(
    "text",
    [
        "",
        "red circle",  # no count
        "a red circles",  # agreement
        "two red circle",
        "a pink circle",
        "a red hexagon",
        "a red circle next to a blue square",
        "two red circles to the left of a blue square",  # relations link single objects
        "a red circle and",
    ],
)
def test_parse_rejects(text):
    with pytest.raises(CaptionParseError):
        parse_caption(text)


def test_text_round_trips():
    caption = Caption((Mention(4, "black", "triangle"), Mention(1, "orange", None)))
    assert caption.text() == "four black triangles and an orange shape"
    assert parse_caption(caption.text()) == caption
    assert parse_caption(caption.text(one="one")) == caption


def test_captions_are_true_or_false_of_the_image_as_the_analyser_sees_it():
    kinds_seen = set()
    for i in range(60):
        rng = np.random.default_rng([5, i])
        objects = sample_scene(rng, PAIRS)
        records = scene_captions(objects, rng, PAIRS)
        detections = analyse(render_scene(objects, 256))
        assert sorted((d.colour, d.shape) for d in detections) == sorted(
            (o.colour, o.shape) for o in objects
        )
        kinds = [r.kind for r in records]
        assert kinds[0] == "complete" and "wrong" in kinds
        for r in records:
            caption = parse_caption(r.text)
            kinds_seen.add((r.kind, caption.relation is not None))
            truth = caption_holds(caption, detections)
            assert truth == (r.kind != "wrong"), f"scene {i}: {r}"
            assert caption_holds(caption, objects) == truth
            # No caption, wrong ones included, names a held-out pair.
            assert not {(m.colour, m.shape) for m in caption.mentions} & HELD_OUT_PAIRS
            low, high = {"complete": (30, 33), "partial": (26, 28), "wrong": (15, 20)}[r.kind]
            assert low <= r.clip_score <= high
        # The complete caption mentions every object.
        complete = parse_caption(records[0].text)
        assert sum(m.count for m in complete.mentions) == len(objects)
    assert {("complete", True), ("partial", False), ("wrong", True)} <= kinds_seen


def test_scene_for_caption_makes_the_caption_true():
    rng = np.random.default_rng(3)
    for text in (
        "three green stars",
        "a red circle to the right of a blue square",
        "a circle and two white shapes",
    ):
        caption = parse_caption(text)
        for _ in range(5):
            assert caption_holds(caption, scene_for_caption(caption, rng))
    with pytest.raises(ValueError, match="at most 4"):
        scene_for_caption(parse_caption("three red stars and two blue circles"), rng)
