"""Does the DiT know where a token is? A linear probe of absolute position per block.

ShapesBench's position category stays at chance for the default model (docs/shapes.md): it
draws both objects of "a red circle to the left of a blue square" but not in that order. To
place an object on the left, a token must know that it is on the left. Without a positional
embedding only the zero padding of Mix-FFN's 3×3 depthwise convolutions can tell it, one
token per convolution from the border.

This script runs each model on noised latents of random Shapes scenes with their captions,
records every block's output tokens, and fits a ridge regression from a token's features to
its column and row (normalised to [0, 1]) on some scenes, then reports R² on other scenes. The
scenes' objects are placed uniformly, so content alone predicts nothing (R² ≈ 0); an R² near
1 means the block's features carry the token's position. A model with a sin-cos positional
embedding is the positive control.

It also reads the caption features themselves: the relation at each noun of "a C1 S1
<relation> a C2 S2" (``text_probe``), and the side of the image each object is on, with the
prompt encoded once and with echo (``side_probe``).

``--results`` instead reads ShapesBench ``results.json`` files and counts, over the position
prompts, how often the relation holds between the mean centres of the objects matching each
mention (in images where both are drawn), and how often it is the main direction in images
with exactly one of each, in all and per axis (left/right, above/below). Unlike the position
score, this ignores how many objects were drawn, so it shows whether a model has learnt
relations at all.

    .venv/bin/python bench/position_probe.py --model src/fastsana/assets/sana-shapes \
        --model OTHER_PIPELINE_OR_TRANSFORMER_FOLDER --sigmas 1.0,0.7,0.4
    .venv/bin/python bench/position_probe.py --results runs/bench-a/results.json ...
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from fastsana.checkpoints.common import atomic_write_json
from fastsana.checkpoints.transformer import load_transformer
from fastsana.pipeline import SanaPipeline, default_model_path
from fastsana.runtime import configure_threads
from fastsana.shapes.grammar import RELATION_PHRASES, parse_caption, scene_captions
from fastsana.shapes.world import (
    COLOURS,
    DEFAULT_SCENE_MIX,
    SHAPES,
    allowed_pairs,
    offsets_along,
    render_scene,
    sample_scene,
)


def scenes(n: int, size: int, seed: int) -> tuple[list, list[str]]:
    """``n`` random training-distribution scenes as images and their complete captions."""
    rng = np.random.default_rng(seed)
    pairs = allowed_pairs()
    images, captions = [], []
    for _ in range(n):
        objects = sample_scene(rng, pairs, DEFAULT_SCENE_MIX)
        images.append(render_scene(objects, size))
        captions.append(scene_captions(objects, rng, pairs)[0].text)
    return images, captions


def block_features(model: torch.nn.Module, x: Tensor, t: Tensor, text, mask) -> list[np.ndarray]:
    """Tokens after the patch embedding and after every block, each (B·N, C) in float64."""
    grabbed: list[Tensor] = []
    hooks = [model.patch_embed.register_forward_hook(lambda m, i, o: grabbed.append(o))]
    hooks += [
        b.register_forward_hook(lambda m, i, o: grabbed.append(o)) for b in model.transformer_blocks
    ]
    try:
        with torch.no_grad():
            model(x, t, text, mask)
    finally:
        for h in hooks:
            h.remove()
    return [g.reshape(-1, g.shape[-1]).double().numpy() for g in grabbed]


def ridge_r2(train_x, train_y, test_x, test_y, alpha: float = 1e-2) -> float:
    """R² on the test rows of a ridge fit (features standardised on the train rows)."""
    mean, std = train_x.mean(0), train_x.std(0) + 1e-8
    a, b = (train_x - mean) / std, (test_x - mean) / std
    a = np.concatenate([a, np.ones((len(a), 1))], 1)
    b = np.concatenate([b, np.ones((len(b), 1))], 1)
    w = np.linalg.solve(a.T @ a + alpha * len(a) * np.eye(a.shape[1]), a.T @ train_y)
    residual = ((b @ w - test_y) ** 2).sum()
    return float(1 - residual / ((test_y - test_y.mean()) ** 2).sum())


def probe(folder: Path, pipe: SanaPipeline, args: argparse.Namespace) -> dict:
    model = load_transformer(folder, dtype=torch.float32).eval()
    images, captions = scenes(args.scenes, args.size, args.seed)
    with torch.no_grad():
        pixels = torch.stack(
            [torch.from_numpy(np.array(im)).permute(2, 0, 1).float() / 127.5 - 1 for im in images]
        )
        latents = pipe.vae.encode(pixels) * pipe.vae.scaling_factor  # (S, C, h, w)
    cond, _ = pipe.encode_prompt(captions, guidance=False)
    s, _, h, w = latents.shape
    rows, cols = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    where = torch.stack([cols, rows], -1).reshape(1, h * w, 2).expand(s, -1, -1) / (h - 1)
    split = (s * 3) // 4  # scenes [0, split) fit the probe, the rest score it
    generator = torch.Generator().manual_seed(args.seed)
    result = {}
    for sigma in args.sigmas:
        noise = torch.randn(latents.shape, generator=generator)
        x = (1 - sigma) * latents + sigma * noise  # (S, C, h, w)
        t = torch.full((s,), sigma * 1000.0)
        feats = block_features(model, x, t, cond.text, cond.mask)
        target = where.reshape(s, h * w, 2).double().numpy()
        train_y, test_y = target[:split].reshape(-1, 2), target[split:].reshape(-1, 2)
        per_layer = []
        for f in feats:
            f = f.reshape(s, h * w, -1)
            tr, te = f[:split].reshape(-1, f.shape[-1]), f[split:].reshape(-1, f.shape[-1])
            per_layer.append(
                [round(ridge_r2(tr, train_y[:, k], te, test_y[:, k]), 3) for k in (0, 1)]
            )
        result[str(sigma)] = per_layer
    return result


def probe_accuracy(features: np.ndarray, labels: np.ndarray, classes: int) -> float:
    """Held-out accuracy of a ridge read-out of ``labels`` from ``features`` (n, D), fitted
    on the first three quarters of the rows (features standardised on them)."""
    split = (len(labels) * 3) // 4
    target = np.eye(classes)[labels]
    mean, std = features[:split].mean(0), features[:split].std(0) + 1e-8
    a, b = (features[:split] - mean) / std, (features[split:] - mean) / std
    w = np.linalg.solve(a.T @ a + 1e-2 * split * np.eye(a.shape[1]), a.T @ target[:split])
    return float(((b @ w).argmax(1) == labels[split:]).mean())


def _two_object_captions(rng: np.random.Generator, phrases: list[str], labels) -> list[str]:
    captions = []
    for label in labels:
        s1, s2 = rng.choice(SHAPES, 2, replace=False)
        c1, c2 = rng.choice(COLOURS, 2)
        captions.append(f"a {c1} {s1} {phrases[label]} a {c2} {s2}")
    return captions


# Token positions in the encoder's output for "a C1 S1 ... a C2 S2": BOS, "a", colour, shape
# (one word each in the Shapes vocabulary); the second noun is the last token.
FIRST_NOUN = 3


def text_probe(pipe: SanaPipeline, n: int, seed: int) -> dict[str, float]:
    """Held-out accuracy of a linear read-out of the relation (four relations or "and") from
    the caption features of "a C1 S1 <relation> a C2 S2", at the first object's noun and at
    the last token (the second object's noun). A causal text encoder cannot put the relation
    into the first noun, which precedes it: chance there (0.2) is the expected control."""
    rng = np.random.default_rng(seed)
    phrases = [*RELATION_PHRASES.values(), "and"]
    labels = rng.integers(len(phrases), size=n)
    cond, _ = pipe.encode_prompt(_two_object_captions(rng, phrases, labels), guidance=False)
    text = cond.text.double().numpy()  # (n, L, D)
    last = cond.mask.sum(1).numpy() - 1
    return {
        "first noun": probe_accuracy(text[:, FIRST_NOUN], labels, len(phrases)),
        "last token": probe_accuracy(text[np.arange(n), last], labels, len(phrases)),
    }


# The side of the image each object of "A <relation> B" is on: 0 left, 1 right, 2 top, 3 bottom.
SIDE_OF_FIRST = {"left of": 0, "right of": 1, "above": 2, "below": 3}
OTHER_SIDE = np.array([1, 0, 3, 2])


def side_probe(pipe: SanaPipeline, n: int, seed: int) -> dict[str, float]:
    """Held-out accuracy of a linear read-out of the side of the image (four classes, chance
    0.25) each object of "a C1 S1 <relation> a C2 S2" is on, from its noun's features, with
    the prompt encoded once and with echo (``TextEncoder.encode``). What the DiT needs to
    place an object is exactly this, at that object's tokens."""
    rng = np.random.default_rng(seed)
    relations = list(RELATION_PHRASES)
    labels = rng.integers(len(relations), size=n)
    captions = _two_object_captions(rng, list(RELATION_PHRASES.values()), labels)
    first = np.array([SIDE_OF_FIRST[relations[k]] for k in labels])
    result = {}
    for name, echo in (("once", False), ("echo", True)):
        emb, mask = pipe.text_encoder.encode(
            captions, instruction=None, max_length=pipe.defaults.max_sequence_length, echo=echo
        )
        text = emb.double().numpy()  # (n, L, D)
        last = mask.sum(1).numpy() - 1
        result[f"{name}, first noun"] = probe_accuracy(text[:, FIRST_NOUN], first, 4)
        result[f"{name}, second noun"] = probe_accuracy(
            text[np.arange(n), last], OTHER_SIDE[first], 4
        )
    return result


def relation_agreement(results: dict, one_of_each: bool = False) -> dict[str, tuple[int, int]]:
    """Per relation, (images where it holds between the mean centres of the objects matching
    each mention, images with both drawn) over the position prompts of a ShapesBench
    ``results.json``. ``one_of_each`` counts only images with exactly one object matching each
    mention, and there the relation holds only if it is the pair's main direction (the
    largest of the four offsets), as the session-20 table of docs/shapes.md counts it."""
    counts = {relation: [0, 0] for relation in RELATION_PHRASES}
    for prompt in results["prompts"]:
        if prompt["category"] != "position":
            continue
        caption = parse_caption(prompt["text"])
        first, second = caption.mentions
        for detections in prompt["detections"]:
            a = [d for d in detections if d["colour"] == first.colour and d["shape"] == first.shape]
            b = [
                d for d in detections if d["colour"] == second.colour and d["shape"] == second.shape
            ]
            if not a or not b or (one_of_each and (len(a) != 1 or len(b) != 1)):
                continue
            dx = np.mean([d["cx"] for d in a]) - np.mean([d["cx"] for d in b])
            dy = np.mean([d["cy"] for d in a]) - np.mean([d["cy"] for d in b])
            counts[caption.relation][1] += 1
            offsets = offsets_along(dx, dy)
            if one_of_each:
                holds = max(offsets, key=offsets.__getitem__) == caption.relation
            else:
                holds = offsets[caption.relation] > 0
            counts[caption.relation][0] += bool(holds)
    return {relation: (right, total) for relation, (right, total) in counts.items()}


AXES = {"horizontal": ("left of", "right of"), "vertical": ("above", "below")}


def agreement_line(counts: dict[str, tuple[int, int]]) -> str:
    """The share of images where the relation holds ("R/N (P%)"), in all and per axis."""

    def share(relations: tuple[str, ...]) -> str:
        right = sum(counts[r][0] for r in relations)
        total = sum(counts[r][1] for r in relations)
        return f"{right}/{total} ({right / total:.0%})" if total else f"{right}/{total} (-)"

    parts = [f"all {share(tuple(counts))}"]
    parts += [f"{axis} {share(relations)}" for axis, relations in AXES.items()]
    return ", ".join(parts)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", type=Path, action="append", help="transformer or pipeline")
    parser.add_argument("--pipeline", type=Path, default=None, help="AE and text encoder")
    parser.add_argument("--sigmas", default="1.0,0.7,0.4")
    parser.add_argument("--scenes", type=int, default=64)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None, help="write the R² table as JSON")
    parser.add_argument(
        "--results", type=Path, nargs="+", help="ShapesBench results.json files (no probe)"
    )
    args = parser.parse_args()
    if args.results:
        missing = [str(path) for path in args.results if not path.is_file()]
        if missing:
            parser.error(f"--results: no such file: {', '.join(missing)}")
        for path in args.results:
            results = json.loads(path.read_text())
            print(f"{path}: relation holds in")
            print(f"  images with both drawn: {agreement_line(relation_agreement(results))}")
            one = relation_agreement(results, one_of_each=True)
            print(f"  images with one of each, as the main direction: {agreement_line(one)}")
        return
    args.sigmas = [float(v) for v in args.sigmas.split(",")]
    configure_threads()
    pipe = SanaPipeline.from_pretrained(args.pipeline or default_model_path())
    models = args.model or [default_model_path()]
    results = {str(m): probe(m, pipe, args) for m in models}
    relation = text_probe(pipe, 2000, args.seed)
    print("relation read out of the caption features (held-out accuracy, chance 0.2):", relation)
    side = side_probe(pipe, 2000, args.seed)
    print("each object's side read out of its noun (held-out accuracy, chance 0.25):", side)
    for name, by_sigma in results.items():
        depth = len(next(iter(by_sigma.values()))) - 1
        print(f"\n{name}: R² of (column, row) from the tokens, held-out scenes")
        print("| σ | " + " | ".join(["embed", *[f"block {i}" for i in range(depth)]]) + " |")
        for sigma, layers in by_sigma.items():
            print(f"| {sigma} | " + " | ".join(f"{c:.2f} / {r:.2f}" for c, r in layers) + " |")
    if args.out is not None:
        text = {"relation": relation, "side": side}
        atomic_write_json(args.out, {"blocks": results, "text": text})


if __name__ == "__main__":
    main()
