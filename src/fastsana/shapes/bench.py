"""ShapesBench: a GenEval-style text–image alignment benchmark scored exactly by the analyser.

Categories, each prompt scored on every image by ``score_prompt``:

- ``single_object``  "a blue circle": at least one circle (colour not checked).
- ``colours``        "a blue circle": at least one blue circle (same prompts as single_object).
- ``two_object``     "a red square and a green star": at least one square and one star.
- ``colour_attribution`` same prompts: at least one red square and one green star.
- ``counting``       "three yellow triangles": exactly three triangles (colour not checked;
                     other shapes ignored), as GenEval counts one class exactly.
- ``position``       "a red circle to the left of a blue square": at least one circle and one
                     square, and every circle stands in that relation to every square
                     (``world.relations``, loose rule: offset ≥ 5% of the side, within 60°).

A category's score is the mean over its prompts of the fraction of correct images (every prompt
has the same number of images, so it is also the fraction of correct images); the overall score
is the mean of the six category scores, as in GenEval. Prompts with a held-out colour/shape pair
form a separate set with the same categories, reported on its own.
"""

from __future__ import annotations

import itertools
import math
import os
import re
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from fastsana.checkpoints.common import atomic_write, atomic_write_bytes, atomic_write_json
from fastsana.shapes.analyser import AnalyserConfig, Detection, analyse
from fastsana.shapes.grammar import Caption, Mention, parse_caption, scene_for_caption
from fastsana.shapes.world import (
    HELD_OUT_PAIRS,
    RELATIONS,
    SHAPES,
    allowed_pairs,
    relations,
    render_scene,
)

CATEGORIES: tuple[str, ...] = (
    "single_object",
    "two_object",
    "counting",
    "colours",
    "position",
    "colour_attribution",
)
PROMPT_SEED = 2024  # fixes the colour choices of the prompt set

# A generator maps prompts and one seed per prompt to one image per prompt.
Generate = Callable[[list[str], list[int]], list[Image.Image]]


@dataclass(frozen=True)
class PromptSpec:
    """One benchmark prompt: its text, the category it is scored in, and its meaning."""

    category: str
    text: str
    held_out: bool = False
    caption: Caption = field(init=False, compare=False, repr=False)

    def __post_init__(self) -> None:
        if self.category not in CATEGORIES:
            raise ValueError(
                f"PromptSpec.category must be one of {CATEGORIES}, got {self.category!r}"
            )
        caption = parse_caption(self.text)
        object.__setattr__(self, "caption", caption)
        mentions = caption.mentions
        if any(m.colour is None or m.shape is None for m in mentions):
            raise ValueError(f"{self.text!r}: benchmark prompts name a colour and a shape")
        shape = {
            "single_object": len(mentions) == 1 and mentions[0].count == 1,
            "colours": len(mentions) == 1 and mentions[0].count == 1,
            "counting": len(mentions) == 1,
            "two_object": len(mentions) == 2 and caption.relation is None,
            "colour_attribution": len(mentions) == 2 and caption.relation is None,
            "position": caption.relation is not None,
        }[self.category]
        if not shape:
            raise ValueError(f"{self.text!r} is not a {self.category} prompt")
        if len(mentions) == 2 and mentions[0].shape == mentions[1].shape:
            raise ValueError(f"{self.text!r}: the two objects of a prompt must differ in shape")


def _shapes_only(detections: Sequence[Detection], shape: str | None) -> list[Detection]:
    return [d for d in detections if d.shape == shape]


def score_prompt(spec: PromptSpec, detections: Sequence[Detection]) -> bool:
    """Whether an image with ``detections`` is correct for ``spec`` (rules in the module doc)."""
    mentions = spec.caption.mentions

    def present(m: Mention, with_colour: bool) -> bool:
        return any(
            d.shape == m.shape and (not with_colour or d.colour == m.colour) for d in detections
        )

    if spec.category in ("single_object", "two_object"):
        return all(present(m, with_colour=False) for m in mentions)
    if spec.category in ("colours", "colour_attribution"):
        return all(present(m, with_colour=True) for m in mentions)
    if spec.category == "counting":
        return len(_shapes_only(detections, mentions[0].shape)) == mentions[0].count
    subjects = _shapes_only(detections, mentions[0].shape)
    objects = _shapes_only(detections, mentions[1].shape)
    return bool(subjects and objects) and all(
        spec.caption.relation in relations(a, b) for a in subjects for b in objects
    )


def bench_prompts() -> list[PromptSpec]:
    """The fixed prompt set: 100 texts (152 scored prompts) plus 28 held-out texts (40)."""
    rng = np.random.default_rng(PROMPT_SEED)
    seen = allowed_pairs(include_held_out=False)
    specs: list[PromptSpec] = []
    used: set[str] = set()

    def add(categories: Sequence[str], draw: Callable[[], Caption], held_out: bool) -> None:
        """Add the first caption ``draw`` makes whose text is not in the set yet."""
        while True:
            caption = draw()
            text = caption.text(one="one" if "counting" in categories else "a")
            if text not in used:
                break
        used.add(text)
        specs.extend(PromptSpec(c, text, held_out) for c in categories)

    def colour_for(shape: str, not_colour: str | None = None) -> str:
        options = [c for c, s in seen if s == shape and c != not_colour]
        return options[rng.integers(len(options))]

    def two(s1: str, s2: str, relation: str | None = None) -> Caption:
        """Two single objects of seen pairs, different colours, in random order."""
        c1 = colour_for(s1)
        pair = [Mention(1, c1, s1), Mention(1, colour_for(s2, not_colour=c1), s2)]
        if rng.random() < 0.5:
            pair.reverse()
        return Caption(tuple(pair), relation)

    def with_partner(colour: str, shape: str, relation: str | None = None) -> Caption:
        """A held-out object and a seen one that differs from it in colour and shape."""
        options = [(c, s) for c, s in seen if c != colour and s != shape]
        pair = [Mention(1, colour, shape), Mention(1, *options[rng.integers(len(options))])]
        if rng.random() < 0.5:
            pair.reverse()
        return Caption(tuple(pair), relation)

    def counted(count: int, shape: str, colour: str | None = None) -> Caption:
        """``count`` objects of ``shape`` in ``colour`` (a random seen colour if None)."""
        return Caption((Mention(count, colour or colour_for(shape), shape),))

    # Main set: only pairs that training images contain.
    for colour, shape in seen:
        add(("single_object", "colours"), partial(counted, 1, shape, colour), False)
    shape_pairs = list(itertools.combinations(SHAPES, 2))
    for (s1, s2), _ in itertools.product(shape_pairs, range(4)):
        add(("two_object", "colour_attribution"), partial(two, s1, s2), False)
    for count, k in itertools.product(range(1, 5), range(6)):
        add(("counting",), partial(counted, count, SHAPES[(k + count) % len(SHAPES)]), False)
    for (s1, s2), relation in itertools.product(shape_pairs, RELATIONS):
        add(("position",), partial(two, s1, s2, relation), False)

    # Held-out set: every prompt binds a held-out colour to its held-out shape.
    for colour, shape in sorted(HELD_OUT_PAIRS):
        add(("single_object", "colours"), partial(counted, 1, shape, colour), True)
        for count in (2, 3):
            add(("counting",), partial(counted, count, shape, colour), True)
        for _ in range(2):
            add(("two_object", "colour_attribution"), partial(with_partner, colour, shape), True)
        for _ in range(2):
            relation = RELATIONS[rng.integers(len(RELATIONS))]
            add(("position",), partial(with_partner, colour, shape, relation), True)
    return specs


def prompts_per_category(specs: Sequence[PromptSpec], n: int) -> list[PromptSpec]:
    """The first ``n`` prompts of every category, main and held-out sets apart: a smaller,
    still balanced benchmark for sweeps whose full cost is too high (report it as such)."""
    if n < 1:
        raise ValueError(f"prompts per category must be >= 1, got {n}")
    seen: dict[tuple[str, bool], int] = {}
    kept = []
    for spec in specs:
        key = (spec.category, spec.held_out)
        if seen.get(key, 0) < n:
            seen[key] = seen.get(key, 0) + 1
            kept.append(spec)
    return kept


def select_categories(specs: Sequence[PromptSpec], categories: Sequence[str]) -> list[PromptSpec]:
    """The prompts of the named categories only (main and held-out sets), in their order: a
    cheaper check of the categories a change is aimed at (report it as such)."""
    unknown = [c for c in categories if c not in CATEGORIES]
    if unknown or not categories:
        raise ValueError(
            f"categories must be a non-empty selection of {', '.join(CATEGORIES)}; "
            f"got {', '.join(categories) or 'none'}"
        )
    return [s for s in specs if s.category in categories]


def ground_truth_generator(size: int = 256) -> Generate:
    """A "generator" that renders exactly what each prompt asks for (a sanity check)."""

    def generate(prompts: list[str], seeds: list[int]) -> list[Image.Image]:
        images = []
        for prompt, seed in zip(prompts, seeds, strict=True):
            rng = np.random.default_rng([seed, zlib.crc32(prompt.encode())])
            images.append(render_scene(scene_for_caption(parse_caption(prompt), rng), size))
        return images

    return generate


@dataclass
class PromptResult:
    """The verdicts on one prompt's images, and what the analyser saw in each."""

    category: str
    text: str
    held_out: bool
    correct: list[bool]
    detections: list[list[dict]]

    @property
    def score(self) -> float:
        return sum(self.correct) / len(self.correct)


@dataclass
class BenchResult:
    """Per-category and overall scores, for the main and the held-out prompt sets."""

    categories: dict[str, float]
    overall: float
    held_out_categories: dict[str, float]
    held_out_overall: float
    images_per_prompt: int
    seed: int
    prompts: list[PromptResult]

    def to_dict(self) -> dict:
        return {
            "overall": self.overall,
            "categories": self.categories,
            "held_out_overall": self.held_out_overall,
            "held_out_categories": self.held_out_categories,
            "images_per_prompt": self.images_per_prompt,
            "seed": self.seed,
            "scoring": "category = mean over prompts of the fraction of correct images; "
            "overall = mean of the category scores",
            "prompts": [vars(p) for p in self.prompts],
        }

    def to_markdown(self) -> str:
        def count(held_out: bool, category: str | None = None) -> int:
            return sum(
                p.held_out == held_out and category in (None, p.category) for p in self.prompts
            )

        lines = [
            f"ShapesBench: {self.images_per_prompt} images per prompt, seed {self.seed}",
            "",
            "| category | score | prompts | held-out score | held-out prompts |",
            "|---|---|---|---|---|",
        ]
        for c in CATEGORIES:
            if count(False, c) + count(True, c) == 0:
                continue  # not benchmarked (--categories)
            main = self.categories.get(c, math.nan)
            held = self.held_out_categories.get(c, math.nan)
            lines.append(
                f"| {c} | {main:.3f} | {count(False, c)} | {held:.3f} | {count(True, c)} |"
            )
        lines.append(
            f"| **overall** | **{self.overall:.3f}** | {count(False)} | "
            f"**{self.held_out_overall:.3f}** | {count(True)} |"
        )
        return "\n".join(lines) + "\n"


def _summarise(results: Sequence[PromptResult]) -> tuple[dict[str, float], float]:
    per_category = {}
    for c in CATEGORIES:
        scores = [r.score for r in results if r.category == c]
        if scores:
            per_category[c] = float(np.mean(scores))
    overall = float(np.mean(list(per_category.values()))) if per_category else math.nan
    return per_category, overall


def run_bench(
    generate: Generate,
    *,
    images_per_prompt: int = 4,
    seed: int = 0,
    out_dir: str | os.PathLike[str] | None = None,
    save_images: bool = False,
    batch_size: int = 8,
    prompts: Sequence[PromptSpec] | None = None,
    analyser_config: AnalyserConfig | None = None,
    progress: bool = True,
) -> BenchResult:
    """Generate ``images_per_prompt`` images per prompt text with ``generate`` and score them.

    Image ``k`` of every prompt uses seed ``seed + k``; calls to ``generate`` hold up to
    ``batch_size`` prompts that share a seed. With ``out_dir``, writes ``results.json`` and
    ``results.md`` there (and ``images/`` with ``save_images``). ``prompts`` defaults to
    ``bench_prompts()``; a subset is scored as given.
    """
    if images_per_prompt < 1:
        raise ValueError(f"images_per_prompt must be >= 1, got {images_per_prompt}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if seed < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")
    if save_images and out_dir is None:
        raise ValueError("save_images needs an out_dir to save into")
    specs = list(bench_prompts() if prompts is None else prompts)
    if not specs:
        raise ValueError("prompts must not be empty")
    texts = list(dict.fromkeys(s.text for s in specs))  # categories may share a text
    out = Path(out_dir) if out_dir is not None else None

    # Seed-major order, so a batch shares one seed (cheapest for a pipeline taking one seed).
    jobs = [(text, seed + k) for k in range(images_per_prompt) for text in texts]
    detections: dict[tuple[str, int], list[Detection]] = {}
    with tqdm(total=len(jobs), desc="ShapesBench", unit="img", disable=not progress) as bar:
        for start in range(0, len(jobs), batch_size):
            batch = jobs[start : start + batch_size]
            images = generate([t for t, _ in batch], [s for _, s in batch])
            if not isinstance(images, list | tuple) or len(images) != len(batch):
                got = len(images) if isinstance(images, list | tuple) else type(images).__name__
                raise ValueError(f"generate returned {got} images for {len(batch)} prompts")
            for (text, image_seed), image in zip(batch, images, strict=True):
                if not isinstance(image, Image.Image):
                    raise TypeError(f"generate must return PIL images, got {type(image).__name__}")
                detections[text, image_seed] = analyse(image, analyser_config)
                if save_images and out is not None:
                    name = f"{texts.index(text):03d}_{_slug(text)}_{image_seed - seed}.png"
                    atomic_write(out / "images" / name, lambda tmp, im=image: im.save(tmp, "PNG"))
            bar.update(len(batch))

    results = []
    for spec in specs:
        per_image = [detections[spec.text, seed + k] for k in range(images_per_prompt)]
        results.append(
            PromptResult(
                category=spec.category,
                text=spec.text,
                held_out=spec.held_out,
                correct=[score_prompt(spec, d) for d in per_image],
                detections=[[d.to_dict() for d in dets] for dets in per_image],
            )
        )
    categories, overall = _summarise([r for r in results if not r.held_out])
    held_categories, held_overall = _summarise([r for r in results if r.held_out])
    result = BenchResult(
        categories=categories,
        overall=overall,
        held_out_categories=held_categories,
        held_out_overall=held_overall,
        images_per_prompt=images_per_prompt,
        seed=seed,
        prompts=results,
    )
    if out is not None:
        atomic_write_json(out / "results.json", result.to_dict())
        atomic_write_bytes(out / "results.md", result.to_markdown().encode())
    return result


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", text.lower()).strip("_")[:60]
