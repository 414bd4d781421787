"""Results → ``docs/benchmarks.md`` (generated blocks between markers) and
``docs/benchmarks.json``.

Only the text between ``<!-- bench:NAME -->`` and ``<!-- /bench:NAME -->`` is replaced, so the
hand-written parts of the page (and sections other people own, like ``## DC-AE``) stay as they
are; a block that does not exist yet is appended at the end. The file is re-read just before
writing and written atomically.
"""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

from bench.compare import Row
from fastsana.checkpoints.common import atomic_write_bytes, atomic_write_json

DOCS = Path(__file__).resolve().parents[1] / "docs"
MARKDOWN = DOCS / "benchmarks.md"
JSON_PATH = DOCS / "benchmarks.json"


def replace_block(text: str, name: str, body: str) -> str:
    start, end = f"<!-- bench:{name} -->", f"<!-- /bench:{name} -->"
    block = f"{start}\n{body.rstrip()}\n{end}"
    pattern = re.compile(re.escape(start) + r".*?" + re.escape(end), re.DOTALL)
    if pattern.search(text):
        return pattern.sub(lambda _: block, text, count=1)
    return text.rstrip() + "\n\n" + block + "\n"


def write_block(name: str, body: str, record: dict) -> None:
    """Put ``body`` into the markdown block ``name`` and ``record`` under ``name`` in the JSON."""
    text = MARKDOWN.read_text() if MARKDOWN.exists() else "# Benchmarks\n"
    atomic_write_bytes(MARKDOWN, replace_block(text, name, body).encode())
    data = json.loads(JSON_PATH.read_text()) if JSON_PATH.exists() else {}
    data[name] = record
    atomic_write_json(JSON_PATH, data)


def machine_line(machine: dict) -> str:
    gpu = ""
    if machine.get("gpu"):
        gpu = (
            f"{machine['gpu']} ({machine['gpu_memory_gib']} GiB, {machine['gpu_sms']} SMs, "
            f"CUDA {machine['cuda']}, Triton {machine['triton']}); host "
        )
    return gpu + (
        f"{machine['cpu']} ({machine['cpu_features']}; torch capability "
        f"{machine['torch_cpu_capability']}), {machine['logical_cpus']} CPUs, "
        f"{machine['torch_threads']} torch threads, {machine['memory_gib']} GiB, "
        f"torch {machine['torch']}, diffusers {machine['diffusers']}; {machine['date_utc']}; "
        f"load average at start {machine['load_average_at_start'][0]}"
    )


def peaks_line(peaks: dict) -> str:
    parts = [
        f"{name} {p['flops_per_s'] / 1e9:.1f} GFLOP/s ({p['size']}³ matmul)"
        for name, p in peaks.items()
    ]
    return "GEMM peak measured in the same run: " + ", ".join(parts)


def compare_table(rows: list[Row], peaks: dict) -> str:
    head = (
        "| component | model | dtype | px | ours s | diffusers s | speed-up | "
        "ours GFLOP/s | % fp32 peak | % bf16 peak | diffusers GFLOP/s | "
        "memory ours / diffusers MiB | max rel. diff | repeats | load |\n"
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|\n"
    )
    lines = []
    for r in rows:
        o, d = r.seconds["ours"], r.seconds["diffusers"]
        if r.flops:
            rate_o, rate_d = r.flops / o, r.flops / d
            pct = {k: f"{100 * rate_o / peaks[k]['flops_per_s']:.0f}%" for k in ("fp32", "bf16")}
            rates = f"{rate_o / 1e9:.1f} | {pct['fp32']} | {pct['bf16']} | {rate_d / 1e9:.1f}"
        else:
            rates = "– | – | – | –"
        diff = "–" if r.max_rel_diff is None else f"{r.max_rel_diff:.1e}"
        lines.append(
            f"| {r.component} | {r.model} | {r.dtype} | {r.pixels} | {_secs(o)} | {_secs(d)} | "
            f"**×{d / o:.2f}** | {rates} | {r.peak_mib['ours']:.0f} / "
            f"{r.peak_mib['diffusers']:.0f} | {diff} | {r.repeats} | {r.load_average} |"
        )
    return head + "\n".join(lines) + "\n"


def _secs(seconds: float) -> str:
    """Two decimals for seconds, three significant digits below one (GPU times)."""
    return f"{seconds:.2f}" if seconds >= 1 else f"{seconds:.3g}"


def rows_from_record(record: list[dict]) -> list[Row]:
    """The inverse of ``rows_record`` (to redraw a table from ``benchmarks.json``)."""
    names = {f.name for f in dataclasses.fields(Row)}
    return [Row(**{k: v for k, v in r.items() if k in names}) for r in record]


def rows_record(rows: list[Row]) -> list[dict]:
    return [{**dataclasses.asdict(r), "speedup": round(r.speedup, 3)} for r in rows]
