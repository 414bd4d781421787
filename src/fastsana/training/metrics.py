"""Training metrics on rank 0: a CSV file, TensorBoard when installed, and a loss plot.

``train_log.csv`` has one row per logging interval: ``step`` (optimizer steps done), ``loss``
(mean over the interval and over ranks), ``lr``, ``grad_norm`` and any task metric. Columns are
fixed by the first row. On resume, rows past the resumed step (written by the interrupted
run after its last checkpoint) are dropped, so the file reads as one run.
"""

from __future__ import annotations

import csv
import io
import logging
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from fastsana.checkpoints.common import atomic_write, atomic_write_bytes

logger = logging.getLogger(__name__)

LOG_FILE = "train_log.csv"
PLOT_FILE = "loss.png"


class MetricsLog:
    """Appends rows to ``run_dir/train_log.csv`` and, optionally, TensorBoard."""

    def __init__(self, run_dir: Path, start_step: int, tensorboard: bool) -> None:
        self.path = Path(run_dir) / LOG_FILE
        self.columns: list[str] | None = None
        if self.path.is_file():
            self._truncate_after(start_step)
        self.writer = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                logger.info("tensorboard is not installed: logging to %s only", self.path)
            else:
                self.writer = SummaryWriter(
                    str(Path(run_dir) / "tensorboard"), purge_step=start_step
                )

    def _truncate_after(self, step: int) -> None:
        with open(self.path, newline="") as f:
            rows = list(csv.DictReader(f))
            columns = list(rows[0].keys()) if rows else None
        kept = [r for r in rows if int(r["step"]) <= step]
        if columns is None:
            return
        self.columns = columns
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=columns, lineterminator="\n")
        writer.writeheader()
        writer.writerows(kept)
        atomic_write_bytes(self.path, buffer.getvalue().encode())

    def log(self, step: int, values: Mapping[str, float]) -> None:
        row = {"step": step, **{k: _fmt(v) for k, v in values.items()}}
        new_file = self.columns is None
        if new_file:
            self.columns = list(row)
        extra = sorted(set(row) - set(self.columns))
        if extra:
            logger.warning(
                "metrics %s not in %s's columns; not written to the CSV", extra, self.path
            )
        with open(self.path, "a", newline="") as f:
            writer = csv.DictWriter(
                f, fieldnames=self.columns, extrasaction="ignore", lineterminator="\n"
            )
            if new_file:
                writer.writeheader()
            writer.writerow(row)
        if self.writer is not None:
            for key, value in values.items():
                self.writer.add_scalar(f"train/{key}", value, step)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def _fmt(value: float) -> str:
    return repr(float(value)) if math.isfinite(value) else str(value)


def read_log(path: Path) -> list[dict[str, Any]]:
    """Rows of a ``train_log.csv`` as dicts of floats (``step`` as int)."""
    with open(path, newline="") as f:
        return [
            {k: int(v) if k == "step" else float(v) for k, v in row.items() if v != ""}
            for row in csv.DictReader(f)
        ]


def plot_loss(run_dir: Path) -> Path | None:
    """Write ``run_dir/loss.png`` from the CSV; None (with a log line) without matplotlib."""
    run_dir = Path(run_dir)
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        logger.info("matplotlib is not installed: loss plot skipped (the data is in %s)", LOG_FILE)
        return None
    rows = read_log(run_dir / LOG_FILE)
    if not rows:
        return None
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot([r["step"] for r in rows], [r["loss"] for r in rows], label="loss")
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    ax.set_yscale("log")
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    path = run_dir / PLOT_FILE
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=100))
    plt.close(fig)
    return path
