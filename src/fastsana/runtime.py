"""Runtime choices that depend on the machine: thread count and the dtype matmuls run in.

Nothing here runs at import time; callers ask when they need an answer.
"""

from __future__ import annotations

import functools
import os

import torch


def physical_cores() -> int:
    """Physical cores this process may run on (hyper-threads share one core's FMA units, so
    BLAS gains nothing from them). Falls back to the logical count when topology is unknown."""
    allowed = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None
    logical = allowed or os.cpu_count() or 1
    try:
        with open("/proc/cpuinfo") as f:
            text = f.read()
    except OSError:
        return logical
    cores: set[tuple[str, str]] = set()
    physical = core = ""
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key, value = key.strip(), value.strip()
        if key == "physical id":
            physical = value
        elif key == "core id":
            core = value
            cores.add((physical, core))
    if not cores:
        return logical
    # Logical CPUs per core on this machine, applied to the CPUs we are allowed to use.
    per_core = max(1, (os.cpu_count() or len(cores)) // len(cores))
    return max(1, logical // per_core)


def configure_threads(num_threads: int | None = None) -> int:
    """Set torch's intra-op threads (default: the physical cores) and return the number used."""
    n = physical_cores() if num_threads is None else num_threads
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"num_threads must be a positive int or None, got {num_threads!r}")
    torch.set_num_threads(n)
    return n


@functools.cache
def _cpu_has_fast_half(dtype: torch.dtype) -> bool:
    cpu = torch.cpu
    if dtype == torch.bfloat16:
        # oneDNN runs bf16 GEMMs natively with AMX or AVX512-BF16 and emulates them at about
        # fp32 speed on plain AVX-512; with AVX2 only, PyTorch falls back to a scalar path
        # that is 7-100× slower than fp32 (measured on this project's 2-core AVX2 machines).
        return cpu._is_amx_tile_supported() or cpu._is_avx512_supported()
    if dtype == torch.float16:
        return cpu._is_amx_fp16_supported()
    return True


def matmul_dtype(device: torch.device, dtype: torch.dtype) -> torch.dtype:
    """The dtype to run a ``dtype`` model's matmuls in on ``device``.

    Half precision is kept where the hardware multiplies it natively (GPUs, CPUs with AMX or
    AVX-512); elsewhere fp32 is both faster and more accurate, so weights stored in half
    precision are widened per layer and activations stay fp32.
    """
    if device.type != "cpu" or dtype not in (torch.bfloat16, torch.float16):
        return dtype
    return dtype if _cpu_has_fast_half(dtype) else torch.float32


@functools.cache
def _triton_installed() -> bool:
    import importlib.util

    return importlib.util.find_spec("triton") is not None


# Which Triton kernels run by default, from their timings against the PyTorch path on an H100
# (docs/benchmarks.md, "GPU kernels"): the linear attention is 1.7-4.1x faster; the fused
# depthwise conv + GLU 1.1-1.3x since its tiles were re-chosen (0.67-0.77x before, when it
# was opt-in); the W8A8 quantise + int8 GEMM pair makes a quantised layer 1.6-2.7x faster
# than its PyTorch path (torch._int_mm between elementwise kernels).
TRITON_KERNELS = {"linear_attention": True, "dwconv_glu": True, "w8a8": True}


def use_triton(device: torch.device, kernel: str = "linear_attention") -> bool:
    """Whether inference on ``device`` runs ``kernel`` from ``fastsana.kernels``.

    Only on CUDA devices with Triton installed, while autograd is off (the kernels have no
    backward) and outside ``torch.compile`` (which fuses the PyTorch path itself); then each
    kernel follows ``TRITON_KERNELS``, overridden by ``FASTSANA_TRITON_<KERNEL>=0/1`` (e.g.
    ``FASTSANA_TRITON_DWCONV_GLU=0``). ``FASTSANA_TRITON=0`` uses the PyTorch reference path
    everywhere.
    """
    if kernel not in TRITON_KERNELS:
        raise ValueError(f"kernel must be one of {sorted(TRITON_KERNELS)}, got {kernel!r}")
    if device.type != "cuda" or os.environ.get("FASTSANA_TRITON", "1") == "0":
        return False
    default = "1" if TRITON_KERNELS[kernel] else "0"
    if os.environ.get(f"FASTSANA_TRITON_{kernel.upper()}", default) != "1":
        return False
    if torch.is_grad_enabled() or torch.compiler.is_compiling():
        return False
    return _triton_installed()
