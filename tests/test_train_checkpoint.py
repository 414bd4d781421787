"""Checkpoints: atomic layout, validity, pruning, exact optimizer/EMA/RNG round trips, and a
real SIGKILL in the middle of a run followed by ``--resume auto``."""

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from torch import nn
from train_helpers import (
    captions_of,
    dit_config,
    make_cache,
    make_components,
    make_shapes,
    one_thread,  # noqa: F401 (autouse fixture)
)

from fastsana.checkpoints.common import CheckpointError
from fastsana.cli import main as fastsana_main
from fastsana.training import checkpointing as ckpt
from fastsana.training.config import EMAConfig, OptimizerConfig, load_config
from fastsana.training.distributed import DistEnv
from fastsana.training.metrics import read_log
from fastsana.training.parts import Part
from fastsana.training.trainer import train

ENV = DistEnv(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
FASTSANA = [sys.executable, "-c", "import sys; from fastsana.cli import main; sys.exit(main())"]


def small_part(optimizer: str) -> Part:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.GELU(), nn.Linear(8, 3))
    return Part(
        "model", model, model, OptimizerConfig(name=optimizer, lr=1e-2), EMAConfig(decay=0.9)
    )


def steps(part: Part, start: int, stop: int) -> None:
    from fastsana.training.config import ScheduleConfig

    for step in range(start, stop):
        g = torch.Generator().manual_seed(step)
        x = torch.randn(16, 4, generator=g)
        part.model(x).pow(2).mean().backward()
        part.step(step, ScheduleConfig(max_steps=100, warmup_steps=3))


@pytest.mark.parametrize("optimizer", ["adamw", "came"])
def test_round_trip_continues_bit_for_bit(tmp_path, optimizer):
    part = small_part(optimizer)
    steps(part, 0, 4)
    ckpt.save_checkpoint(tmp_path, 4, [part.trained_part()], {"data": {}}, ENV, keep_last=2)
    steps(part, 4, 8)

    fresh = small_part(optimizer)
    random.seed(123)  # disturbed, then restored from the checkpoint
    state = ckpt.load_checkpoint(
        tmp_path / "checkpoints/step-00000004", [fresh.trained_part()], ENV
    )
    assert state["step"] == 4
    steps(fresh, 4, 8)
    for name, p in part.params.items():
        assert torch.equal(p, fresh.params[name]), name
        assert torch.equal(part.ema.shadow[name], fresh.ema.shadow[name]), name
    assert_same(part.optimizer.state_dict(), fresh.optimizer.state_dict())


def assert_same(a, b, where="optimizer"):
    """Equal nested optimizer states: tensors bitwise, everything else by value."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for key in a:
            assert_same(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_same(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


def test_rng_states_round_trip():
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    saved = json.loads(json.dumps(ckpt.rng_state()))  # through JSON, as on disk
    expected = (random.random(), np.random.rand(), torch.rand(1))
    random.seed(9), np.random.seed(9), torch.manual_seed(9)
    ckpt.set_rng_state(saved)
    assert (random.random(), np.random.rand(), torch.rand(1)) == expected


def test_layout_pruning_and_validity(tmp_path):
    part = small_part("adamw")
    for step in (2, 4, 6, 8):
        ckpt.save_checkpoint(tmp_path, step, [part.trained_part()], {"data": {}}, ENV, 3)
    names = [p.name for p in ckpt.list_checkpoints(tmp_path)]
    assert names == ["step-00000004", "step-00000006", "step-00000008"]
    files = sorted(p.name for p in (tmp_path / "checkpoints/step-00000008").iterdir())
    assert files == [
        "model-ema.safetensors",
        "model-optimizer.json",
        "model-optimizer.safetensors",
        "model.safetensors",
        "rng.json",
        "trainer_state.json",
    ]
    # A half-written save (a .tmp- folder) and a damaged newest checkpoint are passed over.
    (tmp_path / "checkpoints/.tmp-step-00000010").mkdir()
    damaged = tmp_path / "checkpoints/step-00000009"
    damaged.mkdir()
    (tmp_path / "checkpoints/step-00000008/model.safetensors").open("r+b").truncate(100)
    assert not ckpt.is_valid_checkpoint(damaged)
    assert not ckpt.is_valid_checkpoint(tmp_path / "checkpoints/step-00000008")
    assert ckpt.latest_checkpoint(tmp_path).name == "step-00000006"
    assert ckpt.resolve_checkpoint("auto", tmp_path).name == "step-00000006"
    assert ckpt.resolve_checkpoint(tmp_path, tmp_path).name == "step-00000006"
    with pytest.raises(CheckpointError, match="incomplete or damaged"):
        ckpt.resolve_checkpoint(tmp_path / "checkpoints/step-00000008", tmp_path)
    with pytest.raises(CheckpointError, match="not a checkpoint"):
        ckpt.resolve_checkpoint(tmp_path / "nowhere", tmp_path)
    assert ckpt.resolve_checkpoint("auto", tmp_path / "empty") is None


def test_loading_into_another_model_fails_clearly(tmp_path):
    part = small_part("adamw")
    ckpt.save_checkpoint(tmp_path, 1, [part.trained_part()], {"data": {}}, ENV, 1)
    other = nn.Linear(4, 3)
    wrong = Part("model", other, other, OptimizerConfig(), EMAConfig())
    with pytest.raises(CheckpointError, match="does not match the model"):
        ckpt.load_checkpoint(tmp_path / "checkpoints/step-00000001", [wrong.trained_part()], ENV)


# ------------------------------------------------------------------ whole runs


@pytest.fixture(scope="module")
def cached(tmp_path_factory):
    root = tmp_path_factory.mktemp("resume")
    data = make_shapes(root / "data", n=8)
    paths = make_components(root / "components", captions_of(data))
    return root, paths, make_cache(data, root / "cache", paths)


def run_config(root, paths, cache, name, max_steps=45):
    return dit_config(
        root / name,
        paths,
        data={"cache_dir": str(cache), "batch_size": 2},
        schedule={"max_steps": max_steps, "warmup_steps": 5},
        checkpointing={"every": 3, "keep_last": 2},
        optimizer={"lr": 1e-3, "grad_clip": 0.5, "grad_accumulation": 2},
    )


def final_tensors(run_dir: Path, step: int) -> dict[str, torch.Tensor]:
    folder = run_dir / "checkpoints" / f"step-{step:08d}"
    out = {}
    for stem in ("model", "model-ema", "model-optimizer"):
        reader = ckpt.TensorReader(folder, stem)
        out.update({f"{stem}:{k}": t for k, t in reader.read_all().items()})
    return out


def test_sigkill_then_resume_ends_bitwise_equal(cached):
    root, paths, cache = cached
    train(load_config(data=run_config(root, paths, cache, "straight")))

    config_path = root / "killed.yaml"
    config_path.write_text(yaml.safe_dump(run_config(root, paths, cache, "killed")))
    kill_after = random.choice(range(3, 40, 3))  # any checkpoint will do; see the message
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    process = subprocess.Popen(
        [*FASTSANA, "train", str(config_path)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    deadline = time.monotonic() + 120
    seen = None
    while time.monotonic() < deadline and process.poll() is None:
        newest = ckpt.latest_checkpoint(root / "killed")
        if newest is not None and int(newest.name[5:]) >= kill_after:
            os.kill(process.pid, signal.SIGKILL)
            seen = newest.name
            break
        time.sleep(0.002)
    process.wait()
    stderr = process.stderr.read().decode()
    assert process.returncode == -signal.SIGKILL, f"the run ended before the kill:\n{stderr}"
    last = ckpt.latest_checkpoint(root / "killed")
    assert last is not None and last.name != "step-00000045", (seen, last)

    assert fastsana_main(["train", str(config_path), "--resume"]) == 0
    expected = final_tensors(root / "straight", 45)
    resumed = final_tensors(root / "killed", 45)
    assert expected.keys() == resumed.keys()
    for key, tensor in expected.items():
        assert torch.equal(tensor, resumed[key]), f"{key} differs (killed after {last.name})"
    # The log reads as one run: each step once, the same losses as the uninterrupted run.
    straight_log, resumed_log = (
        read_log(root / "straight/train_log.csv"),
        read_log(root / "killed/train_log.csv"),
    )
    assert [r["step"] for r in resumed_log] == list(range(1, 46))
    assert [r["loss"] for r in resumed_log] == [r["loss"] for r in straight_log]


def test_fresh_start_refuses_a_run_with_checkpoints(cached, capsys):
    root, paths, cache = cached
    config = run_config(root, paths, cache, "twice", max_steps=3)
    path = root / "twice.yaml"
    path.write_text(yaml.safe_dump(config))
    assert fastsana_main(["train", str(path)]) == 0
    assert fastsana_main(["train", str(path)]) == 2
    assert "already holds checkpoints; continue it with --resume auto" in capsys.readouterr().err
    # Resuming a finished run does nothing more; a longer schedule continues it.
    assert fastsana_main(["train", str(path), "--resume", "auto"]) == 0
    assert "nothing to do" in capsys.readouterr().out
    assert fastsana_main(["train", str(path), "--resume", "--set", "schedule.max_steps=4"]) == 0
    assert ckpt.latest_checkpoint(root / "twice").name == "step-00000004"
