"""``python -m bench profile``: where a DiT forward spends its time, by kind of op.

Self CPU time from ``torch.profiler`` is grouped into matmul / conv / attention kernels /
elementwise+norm / copies; the top individual ops follow.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch.profiler import ProfilerActivity, profile

from bench import models

CATEGORIES = {
    "matmul (linear layers, attention reductions)": ("addmm", "mm", "bmm", "matmul", "linear"),
    "depthwise/patch conv": ("convolution", "conv"),
    "softmax attention kernel (cross-attention)": ("scaled_dot_product", "flash_attention"),
    "copies / dtype casts": ("copy_", "to_copy", "clone", "contiguous", "cat"),
}


def categorise(name: str) -> str:
    op = name.removeprefix("aten::")
    for category, keys in CATEGORIES.items():
        if any(op == k or op.startswith(k) or k in op for k in keys):
            return category
    return "elementwise, norms, reductions, other"


def profile_forward(fn: Callable[[], object]) -> tuple[dict[str, float], list[tuple[str, float]]]:
    """(seconds per category, top ops by self time) for one call after a warm-up."""
    with torch.no_grad():
        fn()
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            fn()
    events = [e for e in prof.key_averages() if e.self_cpu_time_total > 0]
    by_category: dict[str, float] = {}
    for e in events:
        cat = categorise(e.key)
        by_category[cat] = by_category.get(cat, 0.0) + e.self_cpu_time_total / 1e6
    top = sorted(((e.key, e.self_cpu_time_total / 1e6) for e in events), key=lambda kv: -kv[1])
    return by_category, top[:12]


def run_profile(
    model: str, dtype_name: str, pixels: int, depth: int | None, impls: tuple[str, ...]
) -> dict[str, dict]:
    dtype = models.DTYPES[dtype_name]
    config = models.dit_config(model, depth=depth)
    inputs = models.dit_inputs(config, pixels)
    out = {}
    for which in impls:
        net = models.build_dit(config, which, dtype)
        by_category, top = profile_forward(models.dit_call(net, which, inputs, dtype))
        out[which] = {"by_category": by_category, "top_ops": top}
        del net
    return out


def table(result: dict[str, dict]) -> str:
    impls = list(result)
    cats = sorted({c for r in result.values() for c in r["by_category"]})
    totals = {w: sum(result[w]["by_category"].values()) for w in impls}
    out = "| op kind | " + " | ".join(f"{w} s (share)" for w in impls) + " |\n"
    out += "|---|" + "---|" * len(impls) + "\n"
    for c in cats:
        cells = [
            f"{result[w]['by_category'].get(c, 0):.3f} "
            f"({100 * result[w]['by_category'].get(c, 0) / totals[w]:.0f}%)"
            for w in impls
        ]
        out += f"| {c} | " + " | ".join(cells) + " |\n"
    out += (
        "| **total (profiled self time)** | "
        + " | ".join(f"{totals[w]:.3f}" for w in impls)
        + " |\n"
    )
    for w in impls:
        ops = ", ".join(f"`{k}` {v:.3f}" for k, v in result[w]["top_ops"][:8])
        out += f"\nTop ops, {w} (self s): {ops}\n"
    return out
