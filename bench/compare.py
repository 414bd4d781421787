"""``python -m bench compare``: ours against diffusers, side by side, one component at a time.

DiT forward and DC-AE decode run both implementations in this process on the same inputs,
interleaved. The whole pipeline runs each implementation in its own subprocess (one after the
other), so each process's peak RSS is that pipeline's peak memory.
"""

from __future__ import annotations

import gc
import json
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from bench import measure, models

IMPLS = ("ours", "diffusers")
SLOW_S = 30.0  # a warm-up call slower than this: one timed repeat (keeps runs to minutes)


@dataclass
class Row:
    """One measured configuration: both implementations, same inputs."""

    component: str  # "dit" | "dcae" | "pipeline"
    model: str
    dtype: str
    pixels: int
    repeats: int
    seconds: dict[str, float]  # median per implementation
    all_seconds: dict[str, list[float]]
    peak_mib: dict[str, float]  # RSS increase during the call (DiT, DC-AE) or process peak
    flops: float | None  # per call, counted on our model (same maths as the reference)
    max_rel_diff: float | None  # max|ours − ref| / max|ref| on the timed inputs
    load_average: float
    notes: str = ""

    @property
    def speedup(self) -> float:
        return self.seconds["diffusers"] / self.seconds["ours"]


def _rel_diff(ours: torch.Tensor, ref: torch.Tensor) -> float:
    ours, ref = ours.float(), ref.float()
    return ((ours - ref).abs().max() / ref.abs().max().clamp_min(1e-30)).item()


def _run_pair(
    component: str,
    model: str,
    dtype_name: str,
    pixels: int,
    calls: dict[str, Callable[[], torch.Tensor]],
    repeats: int,
    flops: float | None,
    notes: str = "",
    device: str = "cpu",
) -> Row:
    """On CUDA the first call of each (kernel selection, compilation) is followed by a second
    untimed one: CUDA times are milliseconds, so a leftover first-call cost would dominate."""
    with torch.no_grad():
        outputs, warm = {}, {}
        for name, fn in calls.items():  # warm-up, also the parity check
            t0 = time.perf_counter()
            outputs[name] = fn()
            measure.synchronize(device)
            warm[name] = time.perf_counter() - t0
        diff = _rel_diff(outputs["ours"], outputs["diffusers"])
        del outputs
        if max(warm.values()) > SLOW_S and repeats > 1:
            notes = (notes + "; " if notes else "") + "slow case: 1 repeat"
            repeats = 1
        warmup = 1 if torch.device(device).type == "cuda" else 0
        timings = measure.interleaved(calls, repeats, warmup=warmup, device=device)
    return Row(
        component=component,
        model=model,
        dtype=dtype_name,
        pixels=pixels,
        repeats=repeats,
        seconds={k: t.median for k, t in timings.items()},
        all_seconds={k: [round(s, 4) for s in t.times] for k, t in timings.items()},
        peak_mib={k: round(t.peak_delta / 2**20, 1) for k, t in timings.items()},
        flops=flops,
        max_rel_diff=diff,
        load_average=measure.load_average(),
        notes=notes,
    )


def dit_flops(config, pixels: int) -> float:
    """FLOPs of our forward, counted on meta tensors (nothing is computed)."""
    with torch.device("meta"):
        model = models.SanaTransformer(config)
    inputs = models.dit_inputs(config, pixels, device="meta")
    return float(measure.count_flops(models.dit_call(model, "ours", inputs, torch.float32)))


def dcae_flops(config, latents: torch.Tensor) -> float:
    """Decoder FLOPs for ``latents``' size: counted on CPU for a 2×2 latent (the decoder uses
    autocast, which the meta device lacks) and scaled by area — every layer's cost (convs,
    linear attention) is proportional to the number of pixels."""
    ae = models.DCAE(config).eval()
    small = torch.zeros(1, config.latent_channels, 2, 2)
    counted = measure.count_flops(lambda: ae.decode(small, tiled=False))
    return float(counted) * latents.shape[-2] * latents.shape[-1] / 4


def compare_dit(
    model: str,
    dtype_name: str,
    sizes: list[int],
    repeats: int | Callable[[int], int],
    depth: int | None = None,
    log: Callable[[str], None] = print,
    compile_ours: bool = False,
    device: str = "cpu",
) -> list[Row]:
    """``compile_ours``: wrap our model in ``torch.compile`` (compilation happens in the
    untimed warm-up call)."""
    dtype = models.DTYPES[dtype_name]
    config = models.dit_config(model, depth=depth)
    label = model if depth is None else f"{model} (first {depth} blocks)"
    if compile_ours:
        label += ", ours torch.compile'd"
    nets = {which: models.build_dit(config, which, dtype, device) for which in IMPLS}
    if compile_ours:
        nets["ours"] = torch.compile(nets["ours"])
    rows = []
    for pixels in sizes:
        inputs = models.dit_inputs(config, pixels, device=device)
        calls = {w: models.dit_call(nets[w], w, inputs, dtype) for w in IMPLS}
        n = repeats(pixels) if callable(repeats) else repeats
        log(f"dit {label} {dtype_name} {pixels}px ×{n} on {device} …")
        flops = dit_flops(config, pixels)
        row = _run_pair("dit", label, dtype_name, pixels, calls, n, flops, device=device)
        log(_summary(row))
        rows.append(row)
    del nets
    gc.collect()
    return rows


def compare_dcae(
    dtype_name: str,
    sizes: list[int],
    repeats: int,
    log: Callable[[str], None] = print,
    device: str = "cpu",
) -> list[Row]:
    """DC-AE decode. On CPU through ``bench/dcae.py``'s worker (owned by the DC-AE work): each
    decode runs in a fresh subprocess, so its peak RSS is that configuration's (weights
    included). Repeats alternate the order of the implementations. The two models get
    different random weights there (torch default init), so no output comparison is made; the
    DC-AE parity tests cover it. On CUDA both run in this process with the same random weights
    (``_compare_dcae_here``): the allocator reports each call's peak, and outputs are compared."""
    if torch.device(device).type != "cpu":
        return _compare_dcae_here(dtype_name, sizes, repeats, log, device)
    from bench import dcae

    config = models.ae_config()
    rows = []
    for pixels in sizes:
        side = pixels // models.AE_FACTOR
        flops = dcae_flops(config, torch.zeros(1, config.latent_channels, side, side))
        runs: dict[str, list[dict]] = {w: [] for w in IMPLS}
        for i in range(repeats):
            for which in IMPLS if i % 2 == 0 else reversed(IMPLS):
                log(f"dcae {which} {dtype_name} {pixels}px (repeat {i + 1}/{repeats}) …")
                spec = {"impl": which, "preset": models.AE_MODEL, "dtype": dtype_name,
                        "size": pixels, "tiled": False}  # fmt: skip
                runs[which].append(dcae.run_worker(spec))
        row = Row(
            component="dcae",
            model=models.AE_MODEL,
            dtype=dtype_name,
            pixels=pixels,
            repeats=repeats,
            seconds={w: statistics.median(r["seconds"] for r in runs[w]) for w in IMPLS},
            all_seconds={w: [round(r["seconds"], 3) for r in runs[w]] for w in IMPLS},
            peak_mib={w: round(max(r["peak_gb"] for r in runs[w]) * 1024, 1) for w in IMPLS},
            flops=flops,
            max_rel_diff=None,
            load_average=measure.load_average(),
            notes="peak = process peak RSS during the decode, weights included (bench/dcae.py)",
        )
        log(_summary(row))
        rows.append(row)
    return rows


def _compare_dcae_here(
    dtype_name: str, sizes: list[int], repeats: int, log: Callable[[str], None], device: str
) -> list[Row]:
    dtype = models.DTYPES[dtype_name]
    config = models.ae_config()
    ours, theirs = (models.build_dcae(config, w, dtype, device) for w in IMPLS)
    rows = []
    for pixels in sizes:
        side = pixels // models.AE_FACTOR
        g = torch.Generator().manual_seed(1)
        z = torch.randn(1, config.latent_channels, side, side, generator=g).to(device, dtype)
        calls = {
            "ours": lambda z=z, ae=ours: ae.decode(z, tiled=False),
            "diffusers": lambda z=z, ae=theirs: ae.decode(z).sample,
        }
        log(f"dcae {dtype_name} {pixels}px ×{repeats} on {device} …")
        flops = dcae_flops(config, z)
        notes = "peak = CUDA allocator peak during the decode, above the weights"
        row = _run_pair("dcae", models.AE_MODEL, dtype_name, pixels, calls, repeats, flops,
                        notes, device)  # fmt: skip
        log(_summary(row))
        rows.append(row)
    del ours, theirs
    gc.collect()
    return rows


def compare_pipeline(
    model: str,
    dtype_name: str,
    pixels: int,
    steps: int,
    log: Callable[[str], None] = print,
    device: str = "cpu",
    batch: int = 1,
    repeats: int = 1,
    compile_mode: str = "none",
    vae_channels_last: bool = False,
) -> Row:
    """Each implementation in a fresh subprocess (``python -m bench.pipeline_run``), so each
    process's peak memory is that pipeline's. ``vae_channels_last``: both decoders in NHWC."""
    results = {}
    for which in IMPLS:
        log(f"pipeline {which} {model} {dtype_name} {pixels}px {steps} steps batch {batch} "
            f"compile={compile_mode} on {device} …")  # fmt: skip
        cmd = [sys.executable, "-m", "bench.pipeline_run", "--impl", which, "--model", model,
               "--dtype", dtype_name, "--px", str(pixels), "--steps", str(steps),
               "--device", device, "--batch", str(batch), "--repeats", str(repeats),
               "--compile", compile_mode, "--threads", str(torch.get_num_threads())]  # fmt: skip
        cmd += ["--vae-channels-last"] if vae_channels_last else []
        done = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed:\n{done.stderr[-3000:]}")
        results[which] = json.loads(done.stdout.strip().splitlines()[-1])
        log(f"  {which}: {results[which]}")
    label = f"{model} + {models.AE_MODEL}, batch {batch}"
    if compile_mode != "none":
        label += f", both compile={compile_mode}"
    if vae_channels_last:
        label += ", both decoders channels-last"
    row = Row(
        component="pipeline",
        model=label,
        dtype=dtype_name,
        pixels=pixels,
        repeats=repeats,
        seconds={w: r["total_s"] for w, r in results.items()},
        all_seconds={w: r["all_s"] for w, r in results.items()},
        peak_mib={w: round(r["peak_bytes"] / 2**20, 1) for w, r in results.items()},
        flops=None,
        max_rel_diff=None,
        load_average=measure.load_average(),
        notes=json.dumps({"steps": steps, "parts": results}),
    )
    log(_summary(row))
    return row


def _summary(row: Row) -> str:
    o, d = row.seconds["ours"], row.seconds["diffusers"]
    return (
        f"  ours {o:.3f}s  diffusers {d:.3f}s  ×{d / o:.2f}  "
        f"rel.diff {row.max_rel_diff if row.max_rel_diff is not None else '-'}  "
        f"load {row.load_average}"
    )
