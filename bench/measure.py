"""How things are measured: wall time (interleaved), peak memory, FLOPs, the GEMM peak, and
the machine they were measured on."""

from __future__ import annotations

import contextlib
import ctypes
import os
import platform
import statistics
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone

import torch
from torch.utils.flop_counter import FlopCounterMode

PAGE = os.sysconf("SC_PAGE_SIZE")


# ------------------------------------------------------------------------------ memory


def current_rss() -> int:
    """Resident set size of this process in bytes (now, not the process maximum)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE


def release_free_memory() -> None:
    """Give freed heap memory back to the OS (glibc keeps it otherwise), so that the RSS before
    a call is its live memory and the increase during the call is what the call needs."""
    with contextlib.suppress(OSError, AttributeError):  # not glibc: keep the RSS as it is
        ctypes.CDLL("libc.so.6").malloc_trim(0)


class PeakRSS:
    """Samples RSS every ``interval`` s in a thread while the block runs; ``peak_delta`` is the
    largest increase over the RSS at entry. (``ru_maxrss`` cannot do this: it is the maximum
    over the whole process life.) torch ops release the GIL, so the thread keeps sampling."""

    def __init__(self, interval: float = 0.002) -> None:
        self.interval = interval
        self.start = self.peak = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, current_rss())
            time.sleep(self.interval)

    def __enter__(self) -> PeakRSS:
        release_free_memory()
        self.start = self.peak = current_rss()
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        assert self._thread is not None
        self._thread.join()
        self.peak = max(self.peak, current_rss())

    @property
    def peak_delta(self) -> int:
        return self.peak - self.start


def max_rss() -> int:
    """The process's lifetime peak RSS in bytes (Linux reports ru_maxrss in KiB)."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


# ------------------------------------------------------------------------------ timing


@dataclass
class Timing:
    times: list[float] = field(default_factory=list)  # seconds, one per repeat
    peak_delta: int = 0  # bytes above the RSS before the call, max over repeats

    @property
    def median(self) -> float:
        return statistics.median(self.times)


def synchronize(device: torch.device | str) -> None:
    """Wait for queued device work (CUDA runs asynchronously; CPU work is done on return)."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


class PeakCUDA:
    """Peak CUDA memory allocated while the block runs, above what was allocated at entry
    (the caching allocator's own count: tensors, not the driver's reserved pool)."""

    def __init__(self, device: torch.device | str) -> None:
        self.device = torch.device(device)
        self.start = self.peak = 0

    def __enter__(self) -> PeakCUDA:
        torch.cuda.synchronize(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)
        self.start = torch.cuda.memory_allocated(self.device)
        return self

    def __exit__(self, *exc: object) -> None:
        torch.cuda.synchronize(self.device)
        self.peak = torch.cuda.max_memory_allocated(self.device)

    @property
    def peak_delta(self) -> int:
        return self.peak - self.start


def peak_memory(device: torch.device | str) -> PeakRSS | PeakCUDA:
    """The peak-memory probe for ``device``: RSS on the CPU, the allocator's peak on CUDA."""
    return PeakCUDA(device) if torch.device(device).type == "cuda" else PeakRSS()


def interleaved(
    fns: dict[str, Callable[[], object]],
    repeats: int,
    warmup: int = 1,
    device: torch.device | str = "cpu",
) -> dict[str, Timing]:
    """Time each callable ``repeats`` times, alternating between them (A B, B A, A B …) so a
    drift in machine load hits all of them alike. Warm-up calls are not timed. On CUDA each
    call is timed from an idle device until its work has finished."""
    names = list(fns)
    for _ in range(warmup):
        for name in names:
            fns[name]()
    result = {name: Timing() for name in names}
    for i in range(repeats):
        for name in names if i % 2 == 0 else reversed(names):
            with peak_memory(device) as mem:
                t0 = time.perf_counter()
                fns[name]()
                synchronize(device)
                elapsed = time.perf_counter() - t0
            result[name].times.append(elapsed)
            result[name].peak_delta = max(result[name].peak_delta, mem.peak_delta)
    return result


# ------------------------------------------------------------------------------- FLOPs


def count_flops(fn: Callable[[], object]) -> int:
    """FLOPs of one call (matmuls, convs, attention), counted by torch's FlopCounterMode.

    Run it on meta tensors to count without computing. Uses ``no_grad``: the counter fails
    under ``inference_mode``."""
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


# ------------------------------------------------------------------------------ peaks


def _fastest(fn: Callable[[], object], repeats: int, device: torch.device | str = "cpu") -> float:
    """The shortest wall time of ``repeats`` calls of ``fn``, in seconds."""
    best = float("inf")
    for _ in range(repeats):
        synchronize(device)
        t0 = time.perf_counter()
        fn()
        synchronize(device)
        best = min(best, time.perf_counter() - t0)
    return best


def gemm_peak(
    dtype: torch.dtype,
    size: int | None = None,
    budget_s: float = 10.0,
    device: torch.device | str = "cpu",
) -> dict[str, float]:
    """Best FLOP/s of a square ``size``³ matmul in ``dtype`` on random data (never zeros: some
    hardware multiplies zeros faster). ``size`` defaults to 2048 on CPU and 8192 on CUDA (a GPU
    needs the larger product to reach its peak); 3 timed repeats on CPU, 10 on CUDA.

    If a 512³ probe predicts one ``size``³ product takes longer than ``budget_s`` (half
    precision without hardware support), the size is halved until it fits, and reported."""
    cuda = torch.device(device).type == "cuda"
    size = size or (8192 if cuda else 2048)
    probe = torch.randn(512, 512, dtype=torch.float32).to(device, dtype)
    probe @ probe
    rate = 2 * 512**3 / max(_fastest(lambda: probe @ probe, 2, device), 1e-9)
    while size > 256 and 2 * size**3 / rate > budget_s:
        size //= 2
    a = torch.randn(size, size).to(device, dtype)
    b = torch.randn(size, size).to(device, dtype)
    for _ in range(3 if cuda else 1):  # warm-up (and the GPU's clocks up)
        a @ b
    best = _fastest(lambda: a @ b, 10 if cuda else 3, device)
    return {"size": size, "seconds": best, "flops_per_s": 2 * size**3 / best}


# ----------------------------------------------------------------------------- machine


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def cpu_features() -> str:
    """The SIMD features that decide matmul speed, as torch sees them."""
    cpu = torch.cpu
    flags = {
        "AVX2": cpu._is_avx2_supported(),
        "AVX-512": cpu._is_avx512_supported(),
        "AVX512-BF16": cpu._is_avx512_bf16_supported(),
        "AMX": cpu._is_amx_tile_supported(),
        "VNNI": cpu._is_vnni_supported(),
    }
    return ", ".join(name for name, present in flags.items() if present) or "none"


def gpu_description(device: torch.device | str = "cuda") -> dict[str, object]:
    """The CUDA device's name, memory, SM count and the CUDA/driver versions torch reports."""
    props = torch.cuda.get_device_properties(device)
    desc: dict[str, object] = {
        "gpu": props.name,
        "gpu_memory_gib": round(props.total_memory / 2**30, 1),
        "gpu_sms": props.multi_processor_count,
        "cuda": torch.version.cuda,
    }
    try:
        import triton

        desc["triton"] = triton.__version__
    except ImportError:
        desc["triton"] = None
    return desc


def machine_description(device: torch.device | str = "cpu") -> dict[str, object]:
    load1, load5, load15 = os.getloadavg()
    desc: dict[str, object] = {
        "date_utc": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "cpu": cpu_model(),
        "cpu_features": cpu_features(),
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "logical_cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "memory_gib": round(os.sysconf("SC_PHYS_PAGES") * PAGE / 2**30, 1),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "load_average_at_start": [round(load1, 2), round(load5, 2), round(load15, 2)],
    }
    try:
        import diffusers

        desc["diffusers"] = diffusers.__version__
    except ImportError:
        desc["diffusers"] = None
    if torch.device(device).type == "cuda":
        desc.update(gpu_description(device))
    return desc


def load_average() -> float:
    return round(os.getloadavg()[0], 2)
