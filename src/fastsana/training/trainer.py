"""The training loop: steps, logging, checkpoints, validation, export.

``train(config, resume)`` is what ``fastsana train`` runs, in every process ``torchrun``
starts. A step draws ``optimizer.grad_accumulation`` micro-batches from this rank's share of
the data, lets the task (DiT/LoRA or autoencoder) run the forward and backward passes and the
optimizer step, and then, by the step count:

- every ``logging.every`` steps, rank 0 appends the interval's means (over steps and ranks)
  to ``train_log.csv`` (and TensorBoard);
- every ``checkpointing.every`` steps and at the end, a checkpoint (see
  :mod:`fastsana.training.checkpointing`);
- every ``validation.every`` steps and at the end, a validation grid.

At the end the EMA weights are exported (a pipeline folder for the DiT, an autoencoder folder
for task ae) and the loss is plotted.

Resuming restores parameters, EMA, optimizer, RNG states, the data position and the step; the
schedule is a function of the step and the per-sample noise of (seed, step, sample), so the
resumed run continues bit for bit where the checkpoint was taken.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from fastsana.checkpoints.common import atomic_write_bytes
from fastsana.training import checkpointing, distributed
from fastsana.training.ae_task import AETask
from fastsana.training.config import TrainConfig, config_to_dict, dump_config
from fastsana.training.config_parse import ConfigError
from fastsana.training.data import ImageFolderDataset
from fastsana.training.distributed import DistEnv
from fastsana.training.dit_task import DiTTask
from fastsana.training.metrics import MetricsLog, plot_loss

logger = logging.getLogger(__name__)

CONFIG_FILE = "config.yaml"


@dataclass(frozen=True)
class TrainSummary:
    """What a run did (rank 0's view)."""

    start_step: int
    end_step: int
    last_loss: float | None
    checkpoint: Path | None
    export_dir: Path | None
    skipped_images: int


def build_task(config: TrainConfig, env: DistEnv) -> DiTTask | AETask:
    return AETask(config, env) if config.task == "ae" else DiTTask(config, env)


def train(config: TrainConfig, resume: str | None = None) -> TrainSummary:
    """Run (or resume) training as configured; see the module docstring."""
    env = distributed.setup(config.distributed, config.device)
    finished = False
    try:
        summary = Trainer(config, env).run(resume)
        finished = True
        return summary
    finally:
        distributed.teardown(env, clean=finished)


class Trainer:
    def __init__(self, config: TrainConfig, env: DistEnv) -> None:
        self.config = config
        self.env = env
        self.run_dir = config.run_dir

    def _checkpoint_to_resume(self, resume: str | None) -> Path | None:
        """Rank 0 decides (the file system may not be shared for reading), others follow."""
        found: Path | None = None
        error: str | None = None
        if self.env.is_main:
            try:
                if resume is not None:
                    found = checkpointing.resolve_checkpoint(resume, self.run_dir)
                    if found is None:
                        logger.info(
                            "--resume auto: no checkpoint in %s, starting fresh", self.run_dir
                        )
                elif checkpointing.list_checkpoints(self.run_dir):
                    raise ConfigError(
                        f"{self.run_dir} already holds checkpoints; continue it with --resume "
                        "auto, or choose another output_dir"
                    )
            except (ValueError, OSError) as e:
                error = str(e)
        found, error = self.env.broadcast_object((found, error))
        if error is not None:
            raise ConfigError(error)
        return found

    def run(self, resume: str | None) -> TrainSummary:
        config, env = self.config, self.env
        checkpoint = self._checkpoint_to_resume(resume)
        if env.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            atomic_write_bytes(self.run_dir / CONFIG_FILE, dump_config(config).encode())
        task = build_task(config, env)
        start_step, skipped_before = 0, 0
        if checkpoint is not None:
            state = checkpointing.load_checkpoint(
                checkpoint, [p.trained_part() for p in task.parts], env
            )
            start_step = int(state["step"])
            skipped_before = int(state.get("skipped_images", 0))
            task.batches.restore(state["data"], start_step, int(state["world_size"]))
            logger.info("resumed from %s (step %d)", checkpoint, start_step)
        log = (
            MetricsLog(self.run_dir, start_step, config.logging.tensorboard)
            if env.is_main
            else None
        )
        try:
            last_loss, skipped, last_checkpoint = self._loop(task, start_step, skipped_before, log)
            if config.validation.prompts or config.task == "ae":
                task.validate(config.schedule.max_steps, self.run_dir)
            export_dir = None
            if config.export.on_finish:
                export_dir = config.export_dir
                task.export(export_dir, config.export.weights, config.export.dtype)
        finally:
            if log is not None:
                log.close()
        if env.is_main and config.logging.plot and (self.run_dir / "train_log.csv").is_file():
            plot_loss(self.run_dir)
        return TrainSummary(
            start_step=start_step,
            end_step=config.schedule.max_steps,
            last_loss=last_loss,
            checkpoint=last_checkpoint,
            export_dir=export_dir,
            skipped_images=skipped,
        )

    def _loop(
        self, task: DiTTask | AETask, start_step: int, skipped_before: int, log: MetricsLog | None
    ) -> tuple[float | None, int, Path | None]:
        """Steps from ``start_step`` on; returns the last logged loss, the number of unreadable
        images skipped (all ranks, whole run) and the last checkpoint written."""
        config, env = self.config, self.env

        # Images left out when the dataset was built (headers unreadable, files missing): the
        # same on every rank, counted once; not saved, as a resumed run finds them again.
        dataset = getattr(task.batches, "dataset", None)
        at_build = dataset.num_skipped if isinstance(dataset, ImageFolderDataset) else 0

        def total_skipped() -> int:  # a collective
            return skipped_before + round(env.mean(float(skipped)) * env.world_size)

        skipped = 0  # this rank's, since the start of this process
        max_steps = config.schedule.max_steps
        accumulation = config.optimizer.grad_accumulation
        batches: Iterator[dict[str, Any]] = iter(task.batches)
        window: dict[str, float] = {}
        window_steps, window_samples, window_start = 0, 0, time.perf_counter()
        last_loss, last_checkpoint = None, None
        bar = tqdm(
            total=max_steps,
            initial=start_step,
            desc=f"train {config.task}",
            unit="step",
            disable=not (env.is_main and config.logging.progress),
        )
        for step in range(start_step, max_steps):
            micro = [next(batches) for _ in range(accumulation)]
            metrics = task.train_step(micro, step)
            for key, value in metrics.items():
                window[key] = window.get(key, 0.0) + value
            window_steps += 1
            window_samples += sum(len(b["keys"]) for b in micro)
            skipped += int(sum(b.get("num_skipped", 0) for b in micro))
            done = step + 1
            bar.update(1)
            if done % config.logging.every == 0 or done == max_steps:
                row = {k: env.mean(v / window_steps) for k, v in window.items()}
                elapsed = time.perf_counter() - window_start
                row["lr"] = task.part.lr_at(step, config.schedule)
                row["samples_per_s"] = env.mean(window_samples / elapsed) * env.world_size
                row["skipped_images"] = float(at_build + total_skipped())
                last_loss = row["loss"]
                if log is not None:
                    log.log(done, row)
                bar.set_postfix(loss=f"{row['loss']:.4g}", lr=f"{row['lr']:.3g}")
                window, window_steps, window_samples = {}, 0, 0
                window_start = time.perf_counter()
            if done % config.checkpointing.every == 0 or done == max_steps:
                last_checkpoint = self._save(task, done, total_skipped())
            every = config.validation.every
            if every and done % every == 0 and done != max_steps:
                task.validate(done, self.run_dir)
        bar.close()
        if last_checkpoint is None and start_step == max_steps:
            last_checkpoint = checkpointing.latest_checkpoint(self.run_dir)
        return last_loss, at_build + total_skipped(), last_checkpoint

    def _save(self, task: DiTTask | AETask, step: int, skipped: int) -> Path:
        state = {
            "task": self.config.task,
            "config": config_to_dict(self.config),
            "arch": task.arch(),
            "data": task.batches.position(),
            "skipped_images": skipped,
        }
        return checkpointing.save_checkpoint(
            self.run_dir,
            step,
            [p.trained_part() for p in task.parts],
            state,
            self.env,
            self.config.checkpointing.keep_last,
        )
