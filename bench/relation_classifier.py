"""Does the DiT read the relation of a caption? A diffusion-classifier test on known scenes.

ShapesBench scores images the model draws, so a position score mixes whether the model reads
"to the left of" with whether it draws the right number of objects, and one seed's score
moves by ±0.1. This script asks the question directly and with little noise. It renders
scenes of two objects in a clear relation and, for each, compares the flow-matching loss of
the true caption with that of a false one that differs in one respect:

    loss(c) = mean over noises ε and levels σ of |model(x_σ, σ, c) − (ε − x0)|²,
    x_σ = (1 − σ)·x0 + σ·ε, the same ε for both captions.

The model "prefers" the true caption of a scene when its loss is lower. The accuracy is the
fraction of scenes where it does (0.5: the difference is ignored; 1.0: always read). Three
false captions, each for every scene:

- ``relation``: the opposite relation word, same word order ("… to the right of …");
- ``order``: the two objects swapped, same relation word ("B to the left of A"). A model
  that treats the caption as a bag of objects cannot tell it from the truth;
- ``colour``: the first object in another colour. The control: a model that draws the right
  colours must score near 1, or the test itself is broken.

Scenes come from a seed the training data never used, drawn from the training pairs
(held-out colour–shape pairs excluded) at the model's native size unless ``--size``.

    .venv/bin/python bench/relation_classifier.py --model src/fastsana/assets/sana-shapes \
        --model OTHER_PIPELINE_OR_TRANSFORMER_FOLDER [--size 256] [--out result.json]
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from fastsana.checkpoints.common import atomic_write_json
from fastsana.checkpoints.transformer import load_transformer
from fastsana.pipeline import SanaPipeline, default_model_path
from fastsana.runtime import configure_threads
from fastsana.shapes.grammar import Caption, Mention
from fastsana.shapes.world import COLOURS, RELATIONS, allowed_pairs, place_objects, render_scene
from fastsana.training.buckets import to_unit_range

OPPOSITE = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}
SWAPS = ("relation", "order", "colour")


def false_caption(caption: Caption, swap: str) -> Caption:
    """``caption`` made false in one respect (see the module doc); ``swap`` is one of SWAPS."""
    first, second = caption.mentions
    if swap == "relation":
        return dataclasses.replace(caption, relation=OPPOSITE[caption.relation])
    if swap == "order":
        return dataclasses.replace(caption, mentions=(second, first))
    if swap == "colour":
        # The next palette colour that neither object has: a change of colour only.
        taken = {first.colour, second.colour}
        start = COLOURS.index(first.colour)
        other = next(
            c
            for k in range(1, len(COLOURS))
            if (c := COLOURS[(start + k) % len(COLOURS)]) not in taken
        )
        return dataclasses.replace(
            caption, mentions=(dataclasses.replace(first, colour=other), second)
        )
    raise ValueError(f"swap must be one of {SWAPS}, got {swap!r}")


def relation_scenes(n: int, size: int, seed: int) -> tuple[list, list[Caption]]:
    """``n`` scenes of two different training (colour, shape) pairs in a clear relation."""
    rng = np.random.default_rng(seed)
    pairs = allowed_pairs()
    images, captions = [], []
    for _ in range(n):
        i, j = rng.choice(len(pairs), size=2, replace=False)
        relation = RELATIONS[rng.integers(len(RELATIONS))]
        objects = place_objects([pairs[i], pairs[j]], rng, relation=relation)
        images.append(render_scene(objects, size))
        mentions = tuple(Mention(1, o.colour, o.shape) for o in objects)
        captions.append(Caption(mentions, relation))
    return images, captions


def encode_scenes(pipe: SanaPipeline, images: list, batch_size: int = 16) -> Tensor:
    """Scene images as the DiT's (scaled) latents x0, (n, C, h, w) float32."""
    pixels = torch.from_numpy(np.stack([np.asarray(im) for im in images]))  # (n, H, W, 3)
    x = to_unit_range(pixels.permute(0, 3, 1, 2))  # (n, 3, H, W) in [-1, 1]
    with torch.no_grad():
        x0 = torch.cat(
            [pipe.vae.encode(x[i : i + batch_size]) for i in range(0, len(x), batch_size)]
        )
    return x0.float() * pipe.vae.scaling_factor


def encode_captions(pipe: SanaPipeline, captions: list[Caption]) -> tuple[Tensor, Tensor]:
    """Caption features (n, L, D) float32 and mask (n, L) from the pipeline's text encoder."""
    cond, _ = pipe.encode_prompt([c.text() for c in captions], guidance=False)
    return cond.text.float(), cond.mask


def loss_gaps(
    model: torch.nn.Module,
    x0: Tensor,
    true_text: tuple[Tensor, Tensor],
    false_text: tuple[Tensor, Tensor],
    sigmas: list[float],
    noises: int,
    batch_size: int = 16,
) -> Tensor:
    """loss(false) − loss(true) per σ and scene, (len(sigmas), n), summed over ``noises``
    draws of ε shared by both captions (positive: the true caption fits better)."""
    (t_text, t_mask), (f_text, f_mask) = true_text, false_text
    n = len(x0)
    gaps = torch.zeros(len(sigmas), n)
    for si, sigma in enumerate(sigmas):
        for k in range(noises):
            eps = torch.randn(x0.shape, generator=torch.Generator().manual_seed(1000 + k))
            x_t = (1 - sigma) * x0 + sigma * eps  # (n, C, h, w)
            target = eps - x0
            for lo in range(0, n, batch_size):
                hi = min(lo + batch_size, n)
                b = hi - lo
                t = torch.full((2 * b,), sigma * 1000.0)
                with torch.no_grad():
                    v = model(
                        torch.cat([x_t[lo:hi], x_t[lo:hi]]),  # (2b, C, h, w)
                        t,
                        torch.cat([t_text[lo:hi], f_text[lo:hi]]),  # (2b, L, D)
                        torch.cat([t_mask[lo:hi], f_mask[lo:hi]]),  # (2b, L)
                    )
                err = ((v - torch.cat([target[lo:hi]] * 2)) ** 2).mean(dim=(1, 2, 3))  # (2b,)
                gaps[si, lo:hi] += err[b:] - err[:b]
    return gaps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", type=Path, action="append", help="pipeline or transformer")
    parser.add_argument("--pipeline", type=Path, default=None, help="AE and text encoder")
    parser.add_argument("--size", type=int, default=None, help="scene side (default: native)")
    parser.add_argument("--scenes", type=int, default=96)
    parser.add_argument("--sigmas", default="0.5,0.7,0.85,1.0")
    parser.add_argument("--noises", type=int, default=4, help="noise draws per σ")
    parser.add_argument("--seed", type=int, default=777)
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON")
    args = parser.parse_args()
    configure_threads()
    sigmas = [float(s) for s in args.sigmas.split(",")]
    if not all(0.0 < s <= 1.0 for s in sigmas):
        parser.error(f"--sigmas must lie in (0, 1], got {args.sigmas}")
    models = args.model or [default_model_path()]

    pipe = SanaPipeline.from_pretrained(args.pipeline or models[0], dtype=torch.float32)
    size = args.size or pipe.native_size
    f = pipe.vae.spatial_compression
    if size < f or size % f:
        parser.error(f"--size must be a positive multiple of {f} (the autoencoder's), got {size}")
    if args.scenes < 1 or args.noises < 1:
        parser.error("--scenes and --noises must be at least 1")
    images, captions = relation_scenes(args.scenes, size, args.seed)
    x0 = encode_scenes(pipe, images)  # (n, C, h, w)

    true_text = encode_captions(pipe, captions)
    false_texts = {s: encode_captions(pipe, [false_caption(c, s) for c in captions]) for s in SWAPS}
    print(
        f"{len(captions)} scenes at {size} px (seed {args.seed}), e.g. true "
        f"{captions[0].text()!r}, false "
        + ", ".join(repr(false_caption(captions[0], s).text()) for s in SWAPS)
    )
    print("| model | false caption | " + " | ".join(f"σ = {s:g}" for s in sigmas) + " | all σ |")
    print("|---|---|" + "---|" * (len(sigmas) + 1))
    results = []
    for path in models:
        folder = path / "transformer" if (path / "transformer").is_dir() else path
        model = load_transformer(folder, dtype=torch.float32).eval()
        for swap in SWAPS:
            gaps = loss_gaps(model, x0, true_text, false_texts[swap], sigmas, args.noises)
            per_sigma = (gaps > 0).float().mean(dim=1).tolist()
            overall = float((gaps.sum(dim=0) > 0).float().mean())
            results.append(
                {
                    "model": str(path),
                    "swap": swap,
                    "sigmas": sigmas,
                    "accuracy_per_sigma": per_sigma,
                    "accuracy": overall,
                    "mean_gap_per_sigma": (gaps.mean(dim=1) / args.noises).tolist(),
                }
            )
            cells = " | ".join(f"{a:.2f}" for a in per_sigma)
            print(f"| {path} | {swap} | {cells} | **{overall:.2f}** |", flush=True)
    if args.out:
        atomic_write_json(
            args.out,
            {
                "scenes": len(captions),
                "size": size,
                "seed": args.seed,
                "noises": args.noises,
                "results": results,
            },
        )


if __name__ == "__main__":
    main()
