"""Captions of the Shapes world: their meaning, how they are written, parsed and checked.

A caption means a list of mentions ``(count, colour, shape)`` — colour or shape may be left
open (``None``, written "shape") — optionally with a spatial relation between two single
objects::

    caption  := mention ("," mention)* ("and" mention)?   two red circles and a blue star
              | mention RELATION mention                  a red circle to the left of a blue square
    mention  := COUNT COLOUR? NOUN                        three green stars, a circle, a red shape
    COUNT    := a | an | one | two | three | four
    RELATION := to the left of | to the right of | above | below

A caption is true of a set of objects when every mention's count is exact (the number of
objects with that colour and shape) and the relation, if any, holds (``world.relations``,
loose rule). Training images get a complete caption, a partial one (true but leaving things out)
and a wrong one (one colour, shape, count or relation changed so that it is false), each with
a stand-in for a CLIP score.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from fastsana.shapes.world import (
    COLOURS,
    MAX_OBJECTS,
    PALETTE,
    RELATIONS,
    SHAPES,
    SceneObject,
    place_objects,
    relations,
)

COUNT_WORDS: dict[int, str] = {1: "a", 2: "two", 3: "three", 4: "four"}
RELATION_PHRASES: dict[str, str] = {
    "left of": "to the left of",
    "right of": "to the right of",
    "above": "above",
    "below": "below",
}
WILDCARD_NOUN = "shape"

# Stand-ins for CLIP scores: (low, high) of a uniform draw per caption kind. Complete captions
# score highest, a complete caption that leaves out a clear relation a little lower, partial
# captions above the trainer's 25 cut-off, wrong captions below it.
CAPTION_SCORES: dict[str, tuple[float, float]] = {
    "complete": (31.0, 33.0),
    "complete_no_relation": (30.0, 31.0),
    "partial": (26.0, 28.0),
    "wrong": (15.0, 20.0),
}
ONE_WORD_PROBABILITY = 0.1  # how often a count of one is written "one" instead of "a"/"an"


class CaptionParseError(ValueError):
    """A caption does not follow the Shapes grammar."""


class Described(Protocol):
    """Anything with a shape, a colour and a centroid (scene objects and detections)."""

    shape: str
    colour: str
    cx: float
    cy: float


@dataclass(frozen=True)
class Mention:
    """``count`` objects of ``colour`` and ``shape``; ``None`` leaves that attribute open."""

    count: int
    colour: str | None
    shape: str | None

    def __post_init__(self) -> None:
        if self.count not in COUNT_WORDS:
            raise ValueError(f"Mention.count must be in 1..{MAX_OBJECTS}, got {self.count}")
        if self.colour is not None and self.colour not in PALETTE:
            raise ValueError(
                f"Mention.colour must be one of {COLOURS} or None, got {self.colour!r}"
            )
        if self.shape is not None and self.shape not in SHAPES:
            raise ValueError(f"Mention.shape must be one of {SHAPES} or None, got {self.shape!r}")

    def matches(self, obj: Described) -> bool:
        return (self.colour is None or obj.colour == self.colour) and (
            self.shape is None or obj.shape == self.shape
        )


@dataclass(frozen=True)
class Caption:
    """The meaning of a caption: mentions, and the relation of mention 0 to mention 1."""

    mentions: tuple[Mention, ...]
    relation: str | None = None

    def __post_init__(self) -> None:
        if not self.mentions:
            raise ValueError("Caption.mentions must not be empty")
        if self.relation is not None:
            if self.relation not in RELATIONS:
                raise ValueError(
                    f"Caption.relation must be one of {RELATIONS}, got {self.relation!r}"
                )
            if len(self.mentions) != 2 or any(m.count != 1 for m in self.mentions):
                raise ValueError("a relation links exactly two mentions of one object each")

    def text(self, *, one: str = "a") -> str:
        """The caption in words; ``one="one"`` writes a count of one as "one"."""
        words = [_mention_text(m, one) for m in self.mentions]
        if self.relation is not None:
            return f"{words[0]} {RELATION_PHRASES[self.relation]} {words[1]}"
        if len(words) == 1:
            return words[0]
        return ", ".join(words[:-1]) + " and " + words[-1]


def _mention_text(m: Mention, one: str) -> str:
    if one not in ("a", "one"):
        raise ValueError(f"one must be 'a' or 'one', got {one!r}")
    noun = m.shape or WILDCARD_NOUN
    words = ([m.colour] if m.colour else []) + [noun if m.count == 1 else noun + "s"]
    if m.count == 1:
        count = "one" if one == "one" else ("an" if words[0][0] in "aeiou" else "a")
    else:
        count = COUNT_WORDS[m.count]
    return " ".join([count, *words])


_NUMBERS = {"a": 1, "an": 1, "one": 1, "two": 2, "three": 3, "four": 4}
_RELATION_TOKENS = {tuple(phrase.split()): rel for rel, phrase in RELATION_PHRASES.items()}
_RELATION_TOKENS.update({("left", "of"): "left of", ("right", "of"): "right of"})


def parse_caption(text: str) -> Caption:
    """The meaning of ``text``; raises CaptionParseError if it is not in the grammar."""
    tokens = re.findall(r"[a-z]+|,", text.lower().strip().rstrip("."))
    if not tokens or re.sub(r"[a-z,\s.]", "", text.lower()):
        raise CaptionParseError(f"not a Shapes caption (letters, commas and spaces only): {text!r}")
    pos = 0

    def mention() -> Mention:
        nonlocal pos
        if pos >= len(tokens) or tokens[pos] not in _NUMBERS:
            found = tokens[pos] if pos < len(tokens) else "the end"
            raise CaptionParseError(
                f"{text!r}: expected a count word (a, one, two…), got {found!r}"
            )
        count = _NUMBERS[tokens[pos]]
        pos += 1
        colour = None
        if pos < len(tokens) and tokens[pos] in PALETTE:
            colour = tokens[pos]
            pos += 1
        if pos >= len(tokens):
            raise CaptionParseError(f"{text!r}: a mention ends without a shape noun")
        noun = tokens[pos]
        pos += 1
        singular = noun[:-1] if noun.endswith("s") else noun
        if singular not in (*SHAPES, WILDCARD_NOUN):
            raise CaptionParseError(f"{text!r}: unknown shape noun {noun!r}")
        if (noun == singular) != (count == 1):
            raise CaptionParseError(f"{text!r}: {noun!r} does not agree with the count {count}")
        return Mention(count, colour, None if singular == WILDCARD_NOUN else singular)

    def relation() -> str | None:
        nonlocal pos
        for phrase, rel in _RELATION_TOKENS.items():
            if tuple(tokens[pos : pos + len(phrase)]) == phrase:
                pos += len(phrase)
                return rel
        return None

    mentions = [mention()]
    rel = relation()
    if rel is not None:
        mentions.append(mention())
    else:
        while pos < len(tokens):
            if tokens[pos] not in (",", "and"):
                raise CaptionParseError(f"{text!r}: expected ',' or 'and', got {tokens[pos]!r}")
            while pos < len(tokens) and tokens[pos] in (",", "and"):
                pos += 1
            mentions.append(mention())
    if pos != len(tokens):
        raise CaptionParseError(f"{text!r}: unexpected words after the caption: {tokens[pos:]}")
    try:
        return Caption(tuple(mentions), rel)
    except ValueError as e:
        raise CaptionParseError(f"{text!r}: {e}") from e


def count_matching(objects: Sequence[Described], mention: Mention) -> int:
    return sum(mention.matches(o) for o in objects)


def caption_holds(caption: Caption, objects: Sequence[Described]) -> bool:
    """Exact truth: every count is exact and the relation (if any) holds."""
    if any(count_matching(objects, m) != m.count for m in caption.mentions):
        return False
    if caption.relation is None:
        return True
    (a,) = [o for o in objects if caption.mentions[0].matches(o)]
    (b,) = [o for o in objects if caption.mentions[1].matches(o)]
    return caption.relation in relations(a, b)


@dataclass(frozen=True)
class CaptionRecord:
    """A caption as stored in the dataset; ``kind`` is complete / partial / wrong."""

    text: str
    clip_score: float
    kind: str

    def to_dict(self) -> dict:
        return {"text": self.text, "clip_score": self.clip_score, "kind": self.kind}


def _groups(objects: Sequence[SceneObject], key: Callable[[SceneObject], object]) -> dict:
    """Counts per ``key(obj)``, in order of first appearance."""
    counts: dict = {}
    for o in objects:
        counts[key(o)] = counts.get(key(o), 0) + 1
    return counts


def _complete(objects: Sequence[SceneObject], rng: np.random.Generator) -> tuple[Caption, Caption]:
    """(complete caption, the same without relation) for a scene in random mention order."""
    order = [objects[i] for i in rng.permutation(len(objects))]
    groups = _groups(order, lambda o: (o.colour, o.shape))
    listed = Caption(tuple(Mention(n, c, s) for (c, s), n in groups.items()))
    if len(order) == 2 and len(groups) == 2:
        clear = relations(order[0], order[1], clear=True)
        if clear:
            return Caption(listed.mentions, min(clear)), listed
    return listed, listed


def _partials(complete: Caption, objects: Sequence[SceneObject]) -> list[Caption]:
    """Captions that are true of ``objects`` but leave part of ``complete`` out."""
    candidates = []
    mentions = complete.mentions
    if len(mentions) >= 2:
        candidates += [Caption((m,)) for m in mentions]
        if len(mentions) >= 3:
            candidates += [
                Caption(tuple(m for j, m in enumerate(mentions) if j != i))
                for i in range(len(mentions))
            ]
    by_shape = _groups(objects, lambda o: o.shape)
    by_colour = _groups(objects, lambda o: o.colour)
    no_colour = tuple(Mention(n, None, s) for s, n in by_shape.items())
    no_shape = tuple(Mention(n, c, None) for c, n in by_colour.items())
    for mentions_left in (no_colour, no_shape):
        candidates.append(Caption(mentions_left))
        if complete.relation is not None and len(mentions_left) == 2:
            # Keep the relation, with the mention of the related object first.
            first = next(m for m in mentions_left if m.matches(_only(objects, mentions[0])))
            second = next(m for m in mentions_left if m is not first)
            candidates.append(Caption((first, second), complete.relation))
    return [c for c in candidates if c != complete and caption_holds(c, objects)]


def _only(objects: Sequence[SceneObject], mention: Mention) -> SceneObject:
    (obj,) = [o for o in objects if mention.matches(o)]
    return obj


def _wrongs(
    complete: Caption, objects: Sequence[SceneObject], pairs: Sequence[tuple[str, str]]
) -> list[Caption]:
    """Captions made false by changing one colour, shape, count or the relation."""
    present = {(o.colour, o.shape) for o in objects}
    allowed = set(pairs)
    candidates = []
    for i, m in enumerate(complete.mentions):

        def replaced(new: Mention, i: int = i) -> Caption:
            mentions = list(complete.mentions)
            mentions[i] = new
            return Caption(tuple(mentions), complete.relation)

        # Only absent classes, so the change cannot accidentally describe another object;
        # only allowed classes, so held-out pairs never appear in training text.
        for c in COLOURS:
            if c != m.colour and (c, m.shape) in allowed and (c, m.shape) not in present:
                candidates.append(replaced(Mention(m.count, c, m.shape)))
        for s in SHAPES:
            if s != m.shape and (m.colour, s) in allowed and (m.colour, s) not in present:
                candidates.append(replaced(Mention(m.count, m.colour, s)))
        if complete.relation is None:
            for n in COUNT_WORDS:
                if n != m.count:
                    candidates.append(replaced(Mention(n, m.colour, m.shape)))
    if complete.relation is not None:
        a, b = (_only(objects, m) for m in complete.mentions)
        for rel in RELATIONS:
            if rel not in relations(a, b):
                candidates.append(Caption(complete.mentions, rel))
    return [c for c in candidates if not caption_holds(c, objects)]


def scene_captions(
    objects: Sequence[SceneObject],
    rng: np.random.Generator,
    pairs: Sequence[tuple[str, str]],
) -> list[CaptionRecord]:
    """Complete (one or two), partial and wrong captions for a scene, with scores.

    ``pairs`` are the (colour, shape) pairs wrong captions may name (the training set's).
    """
    complete, listed = _complete(objects, rng)

    def record(caption: Caption, kind: str, score_kind: str) -> CaptionRecord:
        one = "one" if rng.random() < ONE_WORD_PROBABILITY else "a"
        low, high = CAPTION_SCORES[score_kind]
        return CaptionRecord(caption.text(one=one), round(float(rng.uniform(low, high)), 2), kind)

    records = [record(complete, "complete", "complete")]
    if listed != complete:
        records.append(record(listed, "complete", "complete_no_relation"))
    for kind, candidates in (
        ("partial", _partials(complete, objects)),
        ("wrong", _wrongs(complete, objects, pairs)),
    ):
        if candidates:
            records.append(record(candidates[rng.integers(len(candidates))], kind, kind))
    return records


def scene_for_caption(caption: Caption, rng: np.random.Generator) -> list[SceneObject]:
    """A random scene of which ``caption`` is exactly true (open attributes filled at random)."""
    classes = []
    for i, m in enumerate(caption.mentions):
        others = [o for j, o in enumerate(caption.mentions) if j != i]
        options = [
            (c, s)
            for c in COLOURS
            for s in SHAPES
            if m.matches(_Probe(c, s)) and not any(o.matches(_Probe(c, s)) for o in others)
        ]
        if not options:
            raise ValueError(
                f"{caption.text()!r}: mention {i} cannot be drawn apart from the others"
            )
        classes += [options[rng.integers(len(options))] for _ in range(m.count)]
    if len(classes) > MAX_OBJECTS:
        raise ValueError(
            f"{caption.text()!r} asks for {len(classes)} objects; at most {MAX_OBJECTS} fit a scene"
        )
    return place_objects(classes, rng, relation=caption.relation)


@dataclass(frozen=True)
class _Probe:
    """A colour/shape pair seen through ``Mention.matches``."""

    colour: str
    shape: str
    cx: float = 0.0
    cy: float = 0.0
