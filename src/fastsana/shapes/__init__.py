"""The Shapes world: a synthetic text-to-image domain where alignment can be scored exactly.

- ``world``: palette, shapes, held-out pairs, scene sampling, rendering.
- ``grammar``: captions (write, parse, check) and their stand-in CLIP scores.
- ``dataset``: ``make_dataset`` in the trainer's folder format or WebDataset shards.
- ``analyser``: ``analyse(image)``, deterministic object detection.
- ``bench``: ShapesBench prompts, scoring, ``run_bench``.
- ``cli``: ``add_shapes_commands`` for the ``fastsana`` command line.
"""

from fastsana.shapes.analyser import AnalyserConfig, Detection, analyse
from fastsana.shapes.bench import (
    CATEGORIES,
    BenchResult,
    PromptSpec,
    bench_prompts,
    ground_truth_generator,
    run_bench,
    score_prompt,
)
from fastsana.shapes.dataset import make_dataset
from fastsana.shapes.grammar import Caption, Mention, parse_caption
from fastsana.shapes.world import (
    BACKGROUND,
    COLOURS,
    HELD_OUT_PAIRS,
    PALETTE,
    SHAPES,
    SceneMix,
    SceneObject,
    render_scene,
)

__all__ = [
    "BACKGROUND",
    "CATEGORIES",
    "COLOURS",
    "HELD_OUT_PAIRS",
    "PALETTE",
    "SHAPES",
    "AnalyserConfig",
    "BenchResult",
    "Caption",
    "Detection",
    "Mention",
    "PromptSpec",
    "SceneMix",
    "SceneObject",
    "analyse",
    "bench_prompts",
    "ground_truth_generator",
    "make_dataset",
    "parse_caption",
    "render_scene",
    "run_bench",
    "score_prompt",
]
