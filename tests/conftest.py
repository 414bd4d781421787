"""Test-wide settings: never touch the network; deterministic, modest threading."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

# Without a GPU, Triton runs the kernels of fastsana.kernels in its CPU interpreter
# (tests/test_kernels.py). Triton reads this switch once, when it is first imported, and torch
# may import it from any test (torch.compile does), so it is set here, before every test.
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
