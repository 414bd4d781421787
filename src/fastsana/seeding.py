"""Random generators keyed by names and numbers, so a draw does not depend on its batch.

The trainer draws each sample's noise from ``(seed, step, batch_index, file name)`` and
ShapesBench each image's noise from ``(seed, prompt)``: the same sample or image gets the same
numbers whatever else shares its batch, process or run.
"""

from __future__ import annotations

import hashlib

import numpy as np
import torch


def keyed_generator(key: str, *numbers: int) -> torch.Generator:
    """A CPU generator that depends only on ``numbers`` and the string ``key``.

    The key is hashed (BLAKE2b, 64 bits) and mixed with the numbers by NumPy's SeedSequence,
    which spreads nearby inputs (seed 0 and 1, step 5 and 6) over unrelated streams."""
    key_id = int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "little")
    state = np.random.SeedSequence([*numbers, key_id]).generate_state(2, np.uint32)
    return torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))
