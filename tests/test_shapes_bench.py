"""ShapesBench: the prompt set, scoring rules, ground truth ≥ 0.99, wrong images score 0."""

import argparse
import collections
import dataclasses
import json

import numpy as np
import pytest

from fastsana.shapes.analyser import Detection
from fastsana.shapes.bench import (
    CATEGORIES,
    PromptSpec,
    bench_prompts,
    ground_truth_generator,
    prompts_per_category,
    run_bench,
    score_prompt,
    select_categories,
)
from fastsana.shapes.cli import add_shapes_commands
from fastsana.shapes.grammar import Caption, Mention, parse_caption, scene_for_caption
from fastsana.shapes.world import COLOURS, HELD_OUT_PAIRS, OPPOSITE, SHAPES, render_scene


def _det(shape, colour, cx=0.5, cy=0.5):
    return Detection(shape, colour, cx, cy, 0.2, 0.02, (0, 0, 1, 1), 1.0, 1.0)


def test_prompt_set_is_fixed_and_balanced():
    specs = bench_prompts()
    assert specs == bench_prompts()
    assert len({(s.category, s.text) for s in specs}) == len(specs)
    main = collections.Counter(s.category for s in specs if not s.held_out)
    held = collections.Counter(s.category for s in specs if s.held_out)
    assert set(main) == set(held) == set(CATEGORIES)
    assert main["counting"] == 24 and main["position"] == 24
    for spec in specs:
        named = {(m.colour, m.shape) for m in spec.caption.mentions}
        assert bool(named & HELD_OUT_PAIRS) == spec.held_out, spec
    counts = {s.caption.mentions[0].count for s in specs if s.category == "counting"}
    assert counts == {1, 2, 3, 4}


def test_score_rules_on_hand_made_detections():
    def score(category, text, dets):
        return score_prompt(PromptSpec(category, text), dets)

    red_circle, blue_circle = _det("circle", "red"), _det("circle", "blue")
    assert score("single_object", "a red circle", [blue_circle])  # shape only
    assert not score("colours", "a red circle", [blue_circle])
    assert score("colours", "a red circle", [blue_circle, red_circle])
    assert not score("single_object", "a red circle", [_det("square", "red")])

    two = "a red circle and a green star"
    assert score("two_object", two, [blue_circle, _det("star", "blue")])
    assert not score("colour_attribution", two, [_det("circle", "green"), _det("star", "red")])
    assert score("colour_attribution", two, [red_circle, _det("star", "green")])

    stars = [_det("star", "green")] * 3
    assert score("counting", "three green stars", [*stars, red_circle])
    assert not score("counting", "three green stars", stars[:2])
    assert not score("counting", "three green stars", stars * 2)

    left, right = _det("circle", "red", cx=0.2), _det("square", "blue", cx=0.8)
    assert score("position", "a red circle to the left of a blue square", [left, right])
    assert not score("position", "a red circle to the right of a blue square", [left, right])
    extra = _det("circle", "red", cx=0.95)  # a second circle on the wrong side
    assert not score("position", "a red circle to the left of a blue square", [left, right, extra])
    assert not score("position", "a red circle to the left of a blue square", [left])

    with pytest.raises(ValueError, match="not a counting prompt"):
        PromptSpec("counting", "a red circle and a blue star")
    with pytest.raises(ValueError, match="category"):
        PromptSpec("style", "a red circle")


@pytest.mark.parametrize(("size", "seed"), [(256, 0), (256, 3), (512, 7)])
def test_ground_truth_scores_at_least_0_99(size, seed, tmp_path):
    result = run_bench(
        ground_truth_generator(size),
        images_per_prompt=1,
        seed=seed,
        out_dir=tmp_path,
        progress=False,
    )
    assert result.overall >= 0.99 and result.held_out_overall >= 0.99
    assert min(result.categories.values()) >= 0.97
    assert min(result.held_out_categories.values()) >= 0.97
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["overall"] == result.overall
    assert len(saved["prompts"]) == len(bench_prompts())
    assert "| **overall** |" in (tmp_path / "results.md").read_text()


def _altered(change):
    """A generator that renders ``change(caption)`` instead of the prompt's caption."""

    def generate(prompts, seeds):
        return [
            render_scene(
                scene_for_caption(change(parse_caption(p)), np.random.default_rng([s, 99])), 256
            )
            for p, s in zip(prompts, seeds, strict=True)
        ]

    return generate


def _map_mentions(caption, fn):
    return Caption(tuple(fn(m) for m in caption.mentions), caption.relation)


def _next(values, value):
    return values[(values.index(value) + 1) % len(values)]


def test_wrong_colours_fail_only_the_colour_categories():
    recolour = _altered(
        lambda c: _map_mentions(
            c, lambda m: dataclasses.replace(m, colour=_next(COLOURS, m.colour))
        )
    )
    result = run_bench(recolour, images_per_prompt=1, progress=False)
    for category in ("colours", "colour_attribution"):
        assert result.categories[category] == 0.0
        assert result.held_out_categories[category] == 0.0
    for category in ("single_object", "two_object", "counting", "position"):
        assert result.categories[category] >= 0.97


def test_wrong_shapes_fail_everything():
    reshape = _altered(
        lambda c: _map_mentions(c, lambda m: dataclasses.replace(m, shape=_next(SHAPES, m.shape)))
    )
    result = run_bench(reshape, images_per_prompt=1, progress=False)
    assert result.overall == 0.0 and result.held_out_overall == 0.0


def test_wrong_counts_and_relations_fail_their_categories():
    specs = [s for s in bench_prompts() if s.category in ("counting", "position")]

    def recount(m: Mention) -> Mention:
        return dataclasses.replace(m, count=m.count + 1 if m.count < 4 else 3)

    def flip(c: Caption) -> Caption:
        if c.relation is None:
            return _map_mentions(c, recount)
        return Caption(c.mentions, OPPOSITE[c.relation])

    result = run_bench(_altered(flip), images_per_prompt=1, prompts=specs, progress=False)
    assert result.categories == {"counting": 0.0, "position": 0.0}
    assert result.held_out_categories == {"counting": 0.0, "position": 0.0}


def test_generate_must_return_one_image_per_prompt():
    with pytest.raises(ValueError, match="returned 0 images"):
        run_bench(lambda prompts, seeds: [], images_per_prompt=1, progress=False)


def test_cli_bench_ground_truth(tmp_path, capsys):
    parser = argparse.ArgumentParser()
    add_shapes_commands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["shapes", "bench", "--ground-truth"])
    assert args.images_per_prompt == 4 and args.steps == 20 and args.sampler == "flow_dpm"
    assert parser.parse_args(["shapes", "bench"]).model is None  # the embedded model
    with pytest.raises(SystemExit):
        parser.parse_args(["shapes", "bench", "--ground-truth", "--model", "m"])

    # A balanced subset (one prompt per category and set) keeps the test fast.
    argv = ["shapes", "bench", "--ground-truth", "--images-per-prompt", "2", "--out", str(tmp_path)]
    args = parser.parse_args([*argv, "--save-images", "--prompts-per-category", "1"])
    assert args.func(args) == 0
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["overall"] == 1.0 and results["held_out_overall"] == 1.0
    texts = {s.text for s in prompts_per_category(bench_prompts(), 1)}
    assert len(list((tmp_path / "images").glob("*.png"))) == 2 * len(texts)
    assert "ShapesBench" in capsys.readouterr().out


def test_prompts_per_category_keeps_a_balanced_prefix():
    specs = bench_prompts()
    subset = prompts_per_category(specs, 2)
    counts = collections.Counter((s.category, s.held_out) for s in subset)
    assert set(counts) == {(s.category, s.held_out) for s in specs}
    assert set(counts.values()) == {2}
    assert subset == [s for s in specs if s in subset]  # order kept
    assert prompts_per_category(specs, 1000) == specs
    with pytest.raises(ValueError, match="prompts per category must be >= 1"):
        prompts_per_category(specs, 0)


def test_select_categories_keeps_only_the_named_ones():
    specs = bench_prompts()
    subset = select_categories(specs, ["position", "counting"])
    assert {s.category for s in subset} == {"position", "counting"}
    assert {s.held_out for s in subset} == {False, True}  # both sets
    assert subset == [s for s in specs if s.category in ("position", "counting")]
    with pytest.raises(ValueError, match="got positions"):
        select_categories(specs, ["positions"])
    with pytest.raises(ValueError, match="non-empty"):
        select_categories(specs, [])


def test_cli_bench_categories(tmp_path, capsys):
    parser = argparse.ArgumentParser()
    add_shapes_commands(parser.add_subparsers(dest="command", required=True))
    argv = ["shapes", "bench", "--ground-truth", "--images-per-prompt", "1"]
    argv += ["--prompts-per-category", "1", "--out", str(tmp_path)]
    args = parser.parse_args([*argv, "--categories", "position, colours"])
    assert args.categories == ["position", "colours"]
    assert args.func(args) == 0
    results = json.loads((tmp_path / "results.json").read_text())
    assert set(results["categories"]) == {"position", "colours"}
    assert {p["category"] for p in results["prompts"]} == {"position", "colours"}
    table = capsys.readouterr().out
    assert "| position |" in table and "| counting |" not in table
    with pytest.raises(SystemExit):
        parser.parse_args([*argv, "--categories", "shapes"])
    assert "categories must be a non-empty selection" in capsys.readouterr().err


def test_cli_bench_through_an_autoencoder(tmp_path, capsys):
    """Renders pass through the autoencoder: an untrained one destroys them (the option is
    applied), and the option is refused without --ground-truth."""
    import torch

    from fastsana.checkpoints.autoencoder import save_autoencoder
    from fastsana.configs import ae_preset
    from fastsana.models.dcae import DCAE

    torch.manual_seed(0)
    save_autoencoder(DCAE(ae_preset("dc-ae-tiny")), tmp_path / "vae")
    parser = argparse.ArgumentParser()
    add_shapes_commands(parser.add_subparsers(dest="command", required=True))
    argv = ["shapes", "bench", "--ground-truth", "--size", "128", "--images-per-prompt", "1"]
    argv += ["--prompts-per-category", "1", "--out", str(tmp_path / "r")]
    args = parser.parse_args([*argv, "--through-autoencoder", str(tmp_path / "vae")])
    assert args.func(args) == 0
    assert json.loads((tmp_path / "r" / "results.json").read_text())["overall"] < 0.5
    args = parser.parse_args(["shapes", "bench", "--through-autoencoder", str(tmp_path / "vae")])
    with pytest.raises(SystemExit, match="needs --ground-truth"):
        args.func(args)
