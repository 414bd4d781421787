"""Benchmark the DC-AE (not a test): speed and memory, ours vs diffusers, and tiling quality.

    .venv/bin/python bench/dcae.py                      # decode + tiled + diff (see --parts)
    .venv/bin/python bench/dcae.py --parts decode --sizes 512 --repeats 1

Parts:
  decode  decode time and peak RSS of the full dc-ae-f32c32 config (random weights), ours and
          diffusers' AutoencoderDC side by side, repeats interleaved (ours, diffusers, ours, …).
          Every measurement runs in its own subprocess so peak RSS is per configuration; the
          peak is reset (/proc/self/clear_refs) after building the model and a small warm-up,
          so it covers the decode (weights included). bf16 is skipped on CPUs without native
          bf16 (no avx512_bf16 / amx_bf16 flag), where PyTorch falls back to a reference path
          hundreds of times slower; --force-bf16 runs it anyway.
  tiled   peak RSS of tiled decodes (ours, default 1024/896 tiles; diffusers' own 512/448
          tiling) of the reduced-width dc-ae-f32-small config at 2048² and 4096², and of an
          untiled decode for comparison.
  diff    tiled vs untiled difference on dc-ae-f32-small (random weights) at 2048²: RMS and max
          difference and a seam score (mean |step| across tile starts over that across other
          columns/rows at the same position modulo 32; ≈1 means no visible seam).
  full4k  (opt-in) the full config decoding 4096² tiled: time and peak RSS.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

RESULT_PREFIX = "RESULT "
DTYPES = ("fp32", "bf16")


# --- worker (runs in a subprocess) ----------------------------------------------------------


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _reset_peak_rss() -> bool:
    """Linux resets VmHWM (peak RSS) when 5 is written to clear_refs."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _build(impl: str, preset: str, dtype_name: str):
    import torch

    from fastsana.checkpoints.autoencoder import config_to_diffusers
    from fastsana.configs import ae_preset
    from fastsana.models.dcae import DCAE

    cfg = ae_preset(preset)
    torch.manual_seed(0)
    if impl == "ours":
        model = DCAE(cfg)
    else:
        from diffusers import AutoencoderDC

        kwargs = {k: v for k, v in config_to_diffusers(cfg).items() if not k.startswith("_")}
        model = AutoencoderDC(**kwargs)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype_name]
    return model.to(dtype).eval(), cfg, dtype


def _decoder(impl: str, model, tiled: bool):
    if impl == "ours":  # tile progress goes to stderr, shown if the worker fails
        return lambda z: model.decode(z, tiled=tiled, progress=tiled)
    if tiled:
        model.enable_tiling()  # diffusers' defaults: 512-px tiles, stride 448
    return lambda z: model.decode(z).sample


def worker(spec: dict) -> dict:
    import torch

    model, cfg, dtype = _build(spec["impl"], spec["preset"], spec["dtype"])
    f = cfg.spatial_compression
    decode = _decoder(spec["impl"], model, spec["tiled"])
    g = torch.Generator().manual_seed(1)
    side = spec["size"] // f
    latent = torch.randn(1, cfg.latent_channels, side, side, generator=g).to(dtype)
    with torch.no_grad():
        decode(latent[..., :2, :2])  # warm-up: allocator, oneDNN primitives
        model_gb = _status_kib("VmRSS") / 2**20
        reset = _reset_peak_rss()
        start = time.perf_counter()
        out = decode(latent)
        seconds = time.perf_counter() - start
    peak_gb = _status_kib("VmHWM") / 2**20
    assert out.shape[-1] == spec["size"] and torch.isfinite(out).all()
    return {
        **spec,
        "seconds": seconds,
        "peak_gb": peak_gb,
        "model_gb": model_gb,
        "peak_is_decode_only": reset,
    }


def run_worker(spec: dict) -> dict:
    """One measurement in a fresh interpreter (peak RSS of this configuration only)."""
    cmd = [sys.executable, __file__, "--worker", json.dumps(spec)]
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    for line in done.stdout.splitlines():
        if line.startswith(RESULT_PREFIX):
            return json.loads(line[len(RESULT_PREFIX) :])
    raise RuntimeError(
        f"worker {spec} failed (exit status {done.returncode}):\n"
        f"{done.stdout[-2000:]}\n{done.stderr[-4000:]}"
    )


# --- parts ----------------------------------------------------------------------------------


def has_native_bf16() -> bool:
    flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    return "avx512_bf16" in flags or "amx_bf16" in flags


def part_decode(sizes: list[int], dtypes: list[str], repeats: int) -> str:
    results: dict[tuple, list[dict]] = {}
    for rep in range(repeats):
        for size in sizes:
            for dtype in dtypes:
                order = ("ours", "diffusers") if rep % 2 == 0 else ("diffusers", "ours")
                for impl in order:
                    spec = dict(
                        impl=impl,
                        preset="dc-ae-f32c32-sana-1.0",
                        dtype=dtype,
                        size=size,
                        tiled=False,
                    )
                    r = run_worker(spec)
                    print(
                        f"  {impl:9s} {size:5d}px {dtype} {r['seconds']:7.2f}s "
                        f"peak {r['peak_gb']:.2f} GB",
                        flush=True,
                    )
                    results.setdefault((size, dtype, impl), []).append(r)
    lines = [
        "| size | dtype | ours s | diffusers s | ours / diffusers | ours peak RSS GB | "
        "diffusers peak RSS GB |",
        "|---|---|---|---|---|---|---|",
    ]
    for size in sizes:
        for dtype in dtypes:
            ours, ref = results[(size, dtype, "ours")], results[(size, dtype, "diffusers")]
            t_ours = [r["seconds"] for r in ours]
            t_ref = [r["seconds"] for r in ref]
            lines.append(
                f"| {size} | {dtype} | {_fmt(t_ours)} | {_fmt(t_ref)} | "
                f"{statistics.median(t_ours) / statistics.median(t_ref):.2f} | "
                f"{max(r['peak_gb'] for r in ours):.2f} | {max(r['peak_gb'] for r in ref):.2f} |"
            )
    return "\n".join(lines)


def _fmt(times: list[float]) -> str:
    return " / ".join(f"{t:.1f}" for t in times)


def part_tiled() -> str:
    rows = []
    for impl, size, tiled in (
        ("ours", 2048, True),
        ("ours", 4096, True),
        ("diffusers", 4096, True),
        ("ours", 4096, False),
    ):
        spec = dict(impl=impl, preset="dc-ae-f32-small", dtype="fp32", size=size, tiled=tiled)
        r = run_worker(spec)
        print(
            f"  {impl} {size} tiled={tiled}: {r['seconds']:.1f}s peak {r['peak_gb']:.2f} GB",
            flush=True,
        )
        what = ("ours 1024/896" if impl == "ours" else "diffusers 512/448") if tiled else "ours"
        rows.append(
            f"| {size}² | {'tiled ' + what if tiled else 'untiled (' + what + ')'} | "
            f"{r['seconds']:.1f} | {r['peak_gb']:.2f} | {r['model_gb']:.2f} |"
        )
    head = ["| image | decode | s | peak RSS GB | RSS before decode GB |", "|---|---|---|---|---|"]
    return "\n".join(head + rows)


def seam_score(image, starts: list[int], period: int) -> float:
    """Mean |step| into the tile-start columns and rows over that into all other columns/rows
    at the same offset modulo ``period`` (NaN when no tile starts inside the image)."""
    if not starts:
        return float("nan")
    scores = []
    for dim in (-1, -2):
        step = image.narrow(dim, 1, image.shape[dim] - 1) - image.narrow(
            dim, 0, image.shape[dim] - 1
        )
        step = step.abs().mean(dim=[d for d in range(step.ndim) if d != step.ndim + dim])
        seams = [step[x - 1] for x in starts]
        others = [step[x - 1] for x in range(period, image.shape[dim], period) if x not in starts]
        scores.append((sum(seams) / len(seams)) / (sum(others) / len(others)))
    return float(max(scores))


def part_diff(size: int) -> str:
    import torch
    import torch.nn.functional as F

    from fastsana.models.dcae import TilingConfig, _tile_starts

    model, cfg, _ = _build("ours", "dc-ae-f32-small", "fp32")
    f = cfg.spatial_compression
    g = torch.Generator().manual_seed(2)
    side = size // f
    smooth = F.interpolate(
        torch.randn(1, cfg.latent_channels, side // 8, side // 8, generator=g),
        size=(side, side),
        mode="bilinear",
        align_corners=False,
    )
    rows = [
        "| tiles (px) | stride | RMS diff / RMS image | max abs diff | seam score |",
        "|---|---|---|---|---|",
    ]
    with torch.no_grad():
        full = model.decode(smooth, tiled=False)
        rms = full.square().mean().sqrt()
        default = [s * f for s in _tile_starts(side, 1024 // f, 896 // f)[1:]]
        rows.append(f"| untiled | — | 0 | 0 | {seam_score(full, default, f):.2f} |")
        for tile, stride in ((512, 448), (1024, 896), (1024, 1024)):
            model.tiling = TilingConfig(tile=tile, stride=stride)
            out = model.decode(smooth, tiled=True)
            starts = [s * f for s in _tile_starts(side, tile // f, stride // f)[1:]]
            diff = out - full
            rows.append(
                f"| {tile} | {stride}{' (no overlap)' if tile == stride else ''} | "
                f"{(diff.square().mean().sqrt() / rms).item():.3f} | {diff.abs().max().item():.3f} "
                f"| {seam_score(out, starts, f):.2f} |"
            )
            print("  " + rows[-1], flush=True)
    return "\n".join(rows)


def part_full4k() -> str:
    r = run_worker(
        dict(impl="ours", preset="dc-ae-f32c32-sana-1.0", dtype="fp32", size=4096, tiled=True)
    )
    return (
        f"full dc-ae-f32c32, 4096² tiled (1024/896, 25 tiles), fp32: {r['seconds']:.0f} s, "
        f"peak RSS {r['peak_gb']:.2f} GB (model {r['model_gb']:.2f} GB)"
    )


def machine() -> str:
    cpu = "unknown CPU"
    info = Path("/proc/cpuinfo")
    if info.exists():
        for line in info.read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    import torch

    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return (
        f"{cpu}, {os.cpu_count()} cores, {mem:.0f} GiB, native bf16: {has_native_bf16()}, "
        f"torch {torch.__version__} ({torch.backends.cpu.get_cpu_capability()}), "
        f"{platform.python_implementation()} {platform.python_version()}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument(
        "--parts", default="decode,tiled,diff", help="comma-separated: decode, tiled, diff, full4k"
    )
    parser.add_argument("--sizes", type=int, nargs="+", default=[512, 1024])
    parser.add_argument("--dtypes", nargs="+", default=list(DTYPES), choices=DTYPES)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--diff-size", type=int, default=2048)
    parser.add_argument("--force-bf16", action="store_true")
    args = parser.parse_args()
    if args.worker:
        print(RESULT_PREFIX + json.dumps(worker(json.loads(args.worker))), flush=True)
        return
    dtypes = args.dtypes
    if "bf16" in dtypes and not has_native_bf16() and not args.force_bf16:
        print("skipping bf16: this CPU has no native bf16 (see --force-bf16)")
        dtypes = [d for d in dtypes if d != "bf16"]
    started = time.time()
    print(
        f"# DC-AE benchmark, {datetime.date.today()}\n{machine()}\n"
        f"load average at start: {os.getloadavg()}",
        flush=True,
    )
    parts = args.parts.split(",")
    sections = {
        "decode": lambda: part_decode(args.sizes, dtypes, args.repeats),
        "tiled": part_tiled,
        "diff": lambda: part_diff(args.diff_size),
        "full4k": part_full4k,
    }
    for name in parts:
        if name not in sections:
            parser.error(f"unknown part {name!r}; choose from {', '.join(sections)}")
    for name in parts:
        print(f"\n## {name}", flush=True)
        print(sections[name](), flush=True)
    print(f"\nload average at end: {os.getloadavg()}; total {time.time() - started:.0f} s")


if __name__ == "__main__":
    main()
