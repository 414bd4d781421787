"""bench/layout_at_noise.py: its caption features, least-squares fit and attention oracle."""

from __future__ import annotations

import torch

from bench.layout_at_noise import (
    factor_features,
    factorised_fit,
    fit_oracle,
    oracle_losses,
    order_swapped,
)
from fastsana.shapes.grammar import parse_caption


def test_features_put_each_object_on_its_side() -> None:
    caption = parse_caption("a red circle to the left of a blue square")
    swapped = order_swapped(caption)
    assert swapped.text() == "a blue square to the left of a red circle"
    f, g = factor_features(caption), factor_features(swapped)
    assert f.sum() == g.sum() == 5  # constant + colour and shape of each object
    assert not torch.equal(f, g)  # the order moves each object to the other side
    # Without sides only the bag of objects is left, which the swap does not change.
    assert torch.equal(factor_features(caption, sides=False), factor_features(swapped, sides=False))
    above = factor_features(parse_caption("a red circle above a blue square"))
    assert not torch.equal(above, f)


def test_factorised_fit_finds_a_planted_layout_and_needs_the_sides() -> None:
    g = torch.Generator().manual_seed(0)
    colours = ["red", "green", "blue", "yellow"]
    relations = ["to the left of", "to the right of", "above", "below"]
    captions = []
    for _ in range(600):
        a, b = torch.randperm(4, generator=g)[:2].tolist()
        r = relations[int(torch.randint(4, (), generator=g))]
        captions.append(parse_caption(f"a {colours[a]} circle {r} a {colours[b]} square"))
    features = torch.stack([factor_features(c) for c in captions])  # (600, F)
    planted = torch.randn(features.shape[1], 12, generator=g)
    x0 = (features @ planted + 0.1 * torch.randn(600, 12, generator=g)).view(600, 3, 2, 2)
    _, loss = factorised_fit(features, x0, 500, ridge=1e-3)
    assert loss < 0.015  # the noise's 0.01 and little else
    no_sides = torch.stack([factor_features(c, sides=False) for c in captions])
    _, bag_loss = factorised_fit(no_sides, x0, 500, ridge=1e-3)
    assert bag_loss > 10 * loss


def test_oracle_learns_a_layout_its_features_carry_and_not_one_they_do_not() -> None:
    # Two tokens, each a colour value and a side (one-hot left/right); the image has two
    # positions and each shows the value of the token on its side.
    g = torch.Generator().manual_seed(0)
    n = 512
    values = torch.randn(n, 2, generator=g)
    left_first = torch.rand(n, generator=g) < 0.5
    side = torch.stack([left_first, ~left_first], dim=1).float()  # (n, 2): token 0 on the left?
    text = torch.stack([values, side, 1 - side], dim=-1)  # (n, 2 tokens, 3)
    left = torch.where(left_first, values[:, 0], values[:, 1])
    right = torch.where(left_first, values[:, 1], values[:, 0])
    x0 = torch.stack([left, right], dim=1).view(n, 1, 1, 2)
    mask = torch.ones(n, 2, dtype=torch.bool)
    oracle = fit_oracle(text, mask, x0, 448, steps=600, batch_size=64, seed=0)
    loss = oracle_losses(oracle, x0[448:], (text[448:], mask[448:])).mean()
    oracle = fit_oracle(text[..., :1], mask, x0, 448, steps=600, batch_size=64, seed=0)
    blind = oracle_losses(oracle, x0[448:], (text[448:, :, :1], mask[448:])).mean()
    assert loss < 0.1, loss  # the variance of a value is 1
    assert blind > 0.3, blind  # without the side only the mean of the two values is there
