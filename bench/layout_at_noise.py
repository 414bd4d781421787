"""How much does a relation caption say about the layout at σ = 1, and how much of it is learnt?

At σ = 1 the DiT sees pure noise, so the best velocity is ε − m(c) with m(c) = E[x0 | caption]:
everything a model can know about where the objects go comes from the caption. Where that
mean depends on the caption's word order ("A left of B" against "B left of A"), a model that
reads the relation must reproduce the dependence, and in sampling it is what places the
objects in the first steps. This script measures, on a relation-only cache
(``scripts/relation_only_cache.py``), fitted on the first 85 % of its scenes and scored on the
rest:

- **factorised**: m(c) fitted by least squares as a sum over the two objects of (colour, side)
  and (shape, side) terms, side being where the relation puts the object (left, right, top,
  bottom); and the same without the sides. The difference is what the order is worth.
- **oracle** (``--oracle-steps``): one cross-attention layer, a learnt query per latent
  position attending to the cached caption features, fitted to x0 with Adam. Can the caption
  features place the objects, and with how many samples?
- **models** (``--model``): each DiT's σ = 1 loss with the true caption, and its loss gap
  (order-swapped caption minus true caption; 0: the order is ignored).

The loss is the flow-matching loss at σ = 1, mean((v̂ − (ε − x0))²) = mean((m̂ − x0)²).

    python bench/layout_at_noise.py --cache cache/bind-256 --oracle-steps 2000 \
        --model runs/bind-top/export [--pipeline src/fastsana/assets/sana-shapes]
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

import torch
from torch import Tensor, nn

from fastsana.checkpoints.common import atomic_write_json
from fastsana.checkpoints.transformer import load_transformer
from fastsana.pipeline import SanaPipeline
from fastsana.runtime import configure_threads
from fastsana.shapes.grammar import Caption, parse_caption
from fastsana.shapes.world import COLOURS, SHAPES
from fastsana.training.cache import CachedLatentDataset

SIDES = ("left", "right", "top", "bottom")
# Where a relation puts (first object, second object).
RELATION_SIDES = {
    "left of": ("left", "right"),
    "right of": ("right", "left"),
    "above": ("top", "bottom"),
    "below": ("bottom", "top"),
}
FIT_FRACTION = 0.85


def load_scenes(cache: Path) -> tuple[Tensor, Tensor, Tensor, list[Caption]]:
    """Scaled latents (n, C, h, w), caption features (n, L, D), masks (n, L) and captions of a
    cache whose every scene has one relation caption."""
    data = CachedLatentDataset(cache)
    scale = float(data.info["info"]["scaling_factor"])
    latents, texts, masks, captions = [], [], [], []
    for i in range(len(data)):
        sample = data[i]
        caption = parse_caption(sample["caption"])
        if caption.relation is None:
            raise ValueError(
                f"{cache}: scene {sample['key']} has no relation caption "
                f"({sample['caption']!r}); make the cache with scripts/relation_only_cache.py"
            )
        latents.append(sample["latents"].float() * scale)
        texts.append(sample["text_embeds"].float())
        masks.append(sample["text_mask"])
        captions.append(caption)
    return torch.stack(latents), torch.stack(texts), torch.stack(masks), captions


def order_swapped(caption: Caption) -> Caption:
    """The same caption with its two objects exchanged ("B left of A")."""
    return dataclasses.replace(caption, mentions=caption.mentions[::-1])


def factor_features(caption: Caption, sides: bool = True) -> Tensor:
    """Indicator features of a relation caption: a constant, then per object its (colour,
    side) and (shape, side); with ``sides=False`` every object counts as on one side."""
    n_sides = len(SIDES) if sides else 1
    colours = torch.zeros(len(COLOURS), n_sides)
    shapes = torch.zeros(len(SHAPES), n_sides)
    for mention, side in zip(caption.mentions, RELATION_SIDES[caption.relation], strict=True):
        s = SIDES.index(side) if sides else 0
        colours[COLOURS.index(mention.colour), s] += 1
        shapes[SHAPES.index(mention.shape), s] += 1
    return torch.cat([torch.ones(1), colours.flatten(), shapes.flatten()])


def factorised_fit(
    features: Tensor, x0: Tensor, n_fit: int, ridge: float = 1.0
) -> tuple[Tensor, float]:
    """Ridge least-squares map features (n, F) → flattened x0 (n, ·) fitted on the first
    ``n_fit`` rows; returns the map (F, ·) and its held-out σ = 1 loss."""
    a, y = features[:n_fit].double(), x0[:n_fit].flatten(1).double()
    w = torch.linalg.solve(a.T @ a + ridge * torch.eye(a.shape[1], dtype=a.dtype), a.T @ y)
    held = ((features[n_fit:].double() @ w - x0[n_fit:].flatten(1).double()) ** 2).mean()
    return w, float(held)


class CrossAttentionOracle(nn.Module):
    """A learnt query per latent position attending to the caption features, then an MLP
    from (attention output, position) to the latent's channels."""

    def __init__(
        self, positions: int, text_dim: int, channels: int, dim: int = 128, heads: int = 4
    ):
        super().__init__()
        self.heads = heads
        self.position = nn.Parameter(torch.randn(positions, dim) * 0.5)
        self.text = nn.Sequential(nn.Linear(text_dim, dim), nn.GELU(), nn.Linear(dim, dim))
        self.attention = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.out = nn.Sequential(nn.Linear(2 * dim, dim), nn.GELU(), nn.Linear(dim, channels))

    def forward(self, text: Tensor, mask: Tensor) -> Tensor:
        y = self.text(text)  # (B, L, dim)
        query = self.position.expand(len(text), -1, -1)  # (B, P, dim)
        context, _ = self.attention(query, y, y, key_padding_mask=~mask.bool())  # (B, P, dim)
        return self.out(torch.cat([context, query], dim=-1))  # (B, P, C)


def fit_oracle(
    text: Tensor, mask: Tensor, x0: Tensor, n_fit: int, steps: int, batch_size: int, seed: int
) -> CrossAttentionOracle:
    """A CrossAttentionOracle fitted to x0 (n, C, h, w) on the first ``n_fit`` scenes."""
    torch.manual_seed(seed)
    target = x0.flatten(2).transpose(1, 2)  # (n, P, C)
    oracle = CrossAttentionOracle(target.shape[1], text.shape[-1], target.shape[2])
    optimizer = torch.optim.Adam(oracle.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        idx = torch.randint(0, n_fit, (batch_size,), generator=g)
        loss = ((oracle(text[idx], mask[idx]) - target[idx]) ** 2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return oracle.eval()


def oracle_losses(oracle: CrossAttentionOracle, x0: Tensor, text: tuple[Tensor, Tensor]) -> Tensor:
    """Per-scene σ = 1 loss (n,) of the oracle's prediction of x0 (n, C, h, w)."""
    with torch.no_grad():
        predicted = oracle(*text)  # (n, P, C)
    return ((predicted - x0.flatten(2).transpose(1, 2)) ** 2).mean(dim=(1, 2))


def sigma_one_losses(
    model: nn.Module, x0: Tensor, text: tuple[Tensor, Tensor], seed: int, batch_size: int = 64
) -> Tensor:
    """Per-scene σ = 1 flow-matching loss (n,) of ``model`` with caption features ``text``."""
    features, mask = text
    losses = []
    for lo in range(0, len(x0), batch_size):
        x = x0[lo : lo + batch_size]
        eps = torch.randn(x.shape, generator=torch.Generator().manual_seed(seed + lo))
        with torch.no_grad():
            v = model(
                eps,
                torch.full((len(x),), 1000.0),
                features[lo : lo + batch_size],
                mask[lo : lo + batch_size],
            )
        losses.append(((v.float() - (eps - x)) ** 2).mean(dim=(1, 2, 3)))
    return torch.cat(losses)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cache", type=Path, required=True, help="a relation-only cache")
    parser.add_argument(
        "--model", type=Path, action="append", default=[], help="pipeline or transformer"
    )
    parser.add_argument(
        "--pipeline",
        type=Path,
        default=None,
        help="the cache's text encoder, to encode the order-swapped captions (default for a "
        "model: its own)",
    )
    parser.add_argument("--oracle-steps", type=int, default=0)
    parser.add_argument("--oracle-batch", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON")
    args = parser.parse_args()
    if args.oracle_steps < 0 or args.oracle_batch < 1:
        parser.error("--oracle-steps must be >= 0 and --oracle-batch >= 1")
    configure_threads()
    x0, text, mask, captions = load_scenes(args.cache)
    n_fit = int(FIT_FRACTION * len(x0))
    if n_fit < 1 or n_fit == len(x0):
        parser.error(f"{args.cache} holds {len(x0)} scenes; at least 2 are needed")
    held = x0[n_fit:]
    results: dict = {"cache": str(args.cache), "scenes": len(x0), "held_out": len(held)}
    results["unconditional"] = float(((held - x0[:n_fit].mean(0)) ** 2).mean())
    for name, sides in (("factorised", True), ("factorised_no_sides", False)):
        features = torch.stack([factor_features(c, sides) for c in captions])
        w, loss = factorised_fit(features, x0, n_fit)
        results[name] = loss
        if sides:
            swapped = torch.stack([factor_features(order_swapped(c)) for c in captions[n_fit:]])
            true_err = ((features[n_fit:].double() @ w - held.flatten(1).double()) ** 2).mean(1)
            gap = ((swapped.double() @ w - held.flatten(1).double()) ** 2).mean(1) - true_err
            results["factorised_order_gap"] = float(gap.mean())
            results["factorised_order_accuracy"] = float((gap > 0).double().mean())
    pipelines: dict[Path, SanaPipeline] = {}

    def encoded(pipeline: Path) -> dict[str, tuple[Tensor, Tensor]]:
        """The held-out captions and their order swaps, encoded by ``pipeline``."""
        if pipeline not in pipelines:
            pipelines[pipeline] = SanaPipeline.from_pretrained(pipeline, dtype=torch.float32)
        out = {}
        for kind, caps in (("true", held_captions), ("order", swapped_captions)):
            cond, _ = pipelines[pipeline].encode_prompt([c.text() for c in caps], guidance=False)
            out[kind] = (cond.text.float(), cond.mask)
        return out

    held_captions = captions[n_fit:]
    swapped_captions = [order_swapped(c) for c in held_captions]
    if args.oracle_steps:
        oracle = fit_oracle(text, mask, x0, n_fit, args.oracle_steps, args.oracle_batch, args.seed)
        results["oracle_samples"] = args.oracle_steps * args.oracle_batch
        results["oracle"] = float(oracle_losses(oracle, held, (text[n_fit:], mask[n_fit:])).mean())
        if args.pipeline is not None:  # the swapped captions need the cache's text encoder
            texts = encoded(args.pipeline)
            gap = oracle_losses(oracle, held, texts["order"]) - oracle_losses(
                oracle, held, texts["true"]
            )
            results["oracle_order_gap"] = float(gap.mean())
            results["oracle_order_accuracy"] = float((gap > 0).float().mean())
    results["models"] = []
    for path in args.model:
        folder = path / "transformer" if (path / "transformer").is_dir() else path
        model = load_transformer(folder, dtype=torch.float32).eval()
        texts = encoded(args.pipeline or path)
        losses = {kind: sigma_one_losses(model, held, t, args.seed) for kind, t in texts.items()}
        gap = losses["order"] - losses["true"]
        results["models"].append(
            {
                "model": str(path),
                "loss": float(losses["true"].mean()),
                "order_gap": float(gap.mean()),
                "order_accuracy": float((gap > 0).float().mean()),
            }
        )
    print(f"{args.cache}: {len(x0)} scenes, {len(held)} held out; σ = 1 loss (order gap, accuracy)")
    print("| predictor | σ = 1 loss | order gap | order accuracy |\n|---|---|---|---|")
    print(f"| unconditional mean | {results['unconditional']:.4f} | | |")
    print(f"| factorised, no sides | {results['factorised_no_sides']:.4f} | 0 | |")
    print(
        f"| factorised | {results['factorised']:.4f} | {results['factorised_order_gap']:.4f} "
        f"| {results['factorised_order_accuracy']:.2f} |"
    )
    if "oracle" in results:
        gap = results.get("oracle_order_gap")
        cells = "| |" if gap is None else f"| {gap:.4f} | {results['oracle_order_accuracy']:.2f} |"
        print(f"| oracle, {results['oracle_samples']:,} samples | {results['oracle']:.4f} {cells}")
    for m in results["models"]:
        print(
            f"| {m['model']} | {m['loss']:.4f} | {m['order_gap']:.4f} | {m['order_accuracy']:.2f} |"
        )
    if args.out:
        atomic_write_json(args.out, results)


if __name__ == "__main__":
    main()
