"""``python -m bench scaling``: DiT forward time against resolution, linear vs softmax attention.

A reduced-depth model of the Sana-0.6B width (the blocks are identical, so time per block is
what scales) runs at 256 → 4096 px (latent 8² → 128², 64 → 16,384 tokens). Softmax stops
when the next size is predicted (×16 per doubling) to exceed the time budget.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import torch

from bench import measure, models

SIZES = (256, 512, 1024, 2048, 4096)
PLOT_PATH = Path(__file__).resolve().parents[1] / "docs" / "img" / "dit_scaling.png"
LINEAR_LIMIT = 4.8  # t(4N)/t(N) allowed for "within 1.2× of linear growth"


def time_forward(fn: Callable[[], object], budget_s: float) -> tuple[float, int, int]:
    """(median seconds, repeats, peak RSS increase in bytes): 3 calls after a warm-up, or
    the first call alone when it took over a quarter of the budget."""
    with torch.no_grad():
        with measure.PeakRSS() as mem:
            t0 = time.perf_counter()
            fn()
            first = time.perf_counter() - t0
        if first > budget_s / 4:  # slow: one-time costs are negligible, keep the first call
            return first, 1, mem.peak_delta
        repeats = 3
        times, peak = [], 0
        for _ in range(repeats):
            with measure.PeakRSS() as mem:
                t0 = time.perf_counter()
                fn()
                times.append(time.perf_counter() - t0)
            peak = max(peak, mem.peak_delta)
    return sorted(times)[len(times) // 2], repeats, peak


def run_scaling(
    depth: int, dtype_name: str, budget_s: float, log: Callable[[str], None] = print
) -> dict[str, list[dict]]:
    dtype = models.DTYPES[dtype_name]
    results: dict[str, list[dict]] = {}
    for attention in ("linear", "softmax"):
        config = models.dit_config("sana-0.6b", depth=depth, attention=attention)
        net = models.build_dit(config, "ours", dtype)
        rows: list[dict] = []
        for pixels in SIZES:
            stop = rows and (rows[-1].get("skipped") or rows[-1]["seconds"] * 16 > budget_s)
            if attention == "softmax" and stop:
                rows.append({"pixels": pixels, "tokens": (pixels // 32) ** 2, "skipped": True})
                log(f"{attention} {pixels}px: skipped (predicted > {budget_s:.0f} s)")
                continue
            inputs = models.dit_inputs(config, pixels)
            call = models.dit_call(net, "ours", inputs, dtype)
            seconds, repeats, peak = time_forward(call, budget_s)
            row = {"pixels": pixels, "tokens": (pixels // 32) ** 2, "seconds": round(seconds, 4),
                   "repeats": repeats, "peak_mib": round(peak / 2**20, 1),
                   "load": measure.load_average()}  # fmt: skip
            prev = rows[-1] if rows and not rows[-1].get("skipped") else None
            row["ratio"] = round(seconds / prev["seconds"], 2) if prev else None
            rows.append(row)
            log(f"{attention} {pixels}px: {seconds:.3f}s (×{row['ratio']}) load {row['load']}")
        results[attention] = rows
        del net
    return results


def table(results: dict[str, list[dict]]) -> str:
    lin, soft = results["linear"], results["softmax"]
    out = (
        "| px | latent | tokens N | linear s | linear t(4N)/t(N) | linear RSS Δ MiB | "
        "softmax s | softmax t(4N)/t(N) |\n|---|---|---|---|---|---|---|---|\n"
    )
    for a, b in zip(lin, soft, strict=True):
        side = a["pixels"] // 32

        def cell(r: dict) -> tuple[str, str]:
            if r.get("skipped"):
                return "not run", "–"
            ratio = "–" if r["ratio"] is None else f"{r['ratio']:.2f}"
            return f"{r['seconds']:.3f}", ratio

        (ls, lr), (ss, sr) = cell(a), cell(b)
        mem = f"{a['peak_mib']:.0f}" if not a.get("skipped") else "–"
        out += f"| {a['pixels']} | {side}² | {a['tokens']} | {ls} | {lr} | {mem} | {ss} | {sr} |\n"
    return out


def plot(results: dict[str, list[dict]], path: Path = PLOT_PATH) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from fastsana.checkpoints.common import atomic_write

    fig, ax = plt.subplots(figsize=(6, 4.2))
    for name, marker in (("linear", "o"), ("softmax", "s")):
        done = [r for r in results[name] if not r.get("skipped")]
        ax.loglog([r["tokens"] for r in done], [r["seconds"] for r in done], marker=marker,
                  label=f"{name} attention")  # fmt: skip
    # Reference slopes through each curve's largest measured point.
    lin = [r for r in results["linear"] if not r.get("skipped")]
    soft = [r for r in results["softmax"] if not r.get("skipped")]
    ns = [r["tokens"] for r in lin]
    for curve, power, style, label in ((lin, 1, "k:", "∝ N"), (soft, 2, "k--", "∝ N²")):
        top = curve[-1]
        ax.loglog(ns, [top["seconds"] * (n / top["tokens"]) ** power for n in ns], style,
                  lw=1, label=label)  # fmt: skip
    ax.set_ylim(min(r["seconds"] for r in lin + soft) / 3, None)
    ax.set_xlabel("image tokens N (256 px → 4096 px)")
    ax.set_ylabel("forward time, s")
    ax.set_title("DiT forward time vs resolution (ours, reduced depth)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=120, format="png"))
    plt.close(fig)
    return path
