"""Two processes on the CPU (gloo) under torchrun: DDP and FSDP2 training equal one process
training on the same global batch, and an FSDP run saved and resumed ends where an
uninterrupted one does."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from train_helpers import (
    captions_of,
    dit_config,
    make_cache,
    make_components,
    make_shapes,
    one_thread,  # noqa: F401 (autouse fixture)
)

from fastsana.checkpoints.transformer import load_transformer
from fastsana.training.checkpointing import TensorReader, read_trainer_state
from fastsana.training.config import load_config
from fastsana.training.trainer import train

WORKER = Path(__file__).parent / "train_dist_worker.py"
STEPS = 6


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tensors(run_dir: Path, stem: str, step: int = STEPS) -> dict[str, torch.Tensor]:
    reader = TensorReader(run_dir / "checkpoints" / f"step-{step:08d}", stem)
    return reader.read_all()


def assert_close(a: dict, b: dict, atol: float) -> None:
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=atol, msg=key)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """One process (2 accumulated micro-batches) in this process; then, in one torchrun
    launch of 2 processes (1 micro-batch each): DDP, FSDP (exported at the end), and FSDP
    resumed from the FSDP run's step-3 checkpoint."""
    root = tmp_path_factory.mktemp("dist")
    data = make_shapes(root / "data", n=8)
    paths = make_components(root / "components", captions_of(data))
    cache = make_cache(data, root / "cache", paths)

    def config(name, accumulation=1, **sections):
        return dit_config(
            root / name,
            paths,
            data={"cache_dir": str(cache), "batch_size": 2},
            schedule={"max_steps": STEPS, "warmup_steps": 2},
            checkpointing={"every": 3},
            optimizer={"lr": 1e-3, "grad_clip": 0.5, "grad_accumulation": accumulation},
            **sections,
        )

    train(load_config(data=config("single", accumulation=2)))
    fsdp = {"distributed": {"strategy": "fsdp"}}
    fsdp_step_3 = root / "fsdp/checkpoints/step-00000003"
    jobs = [
        {"config": config("ddp"), "resume": None},
        {"config": config("fsdp", export={"on_finish": True}, **fsdp), "resume": None},
        {"config": config("fsdp_resumed", **fsdp), "resume": str(fsdp_step_3)},
    ]
    (root / "jobs.json").write_text(json.dumps(jobs))
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node=2",
        f"--master_port={free_port()}",
        str(WORKER),
        str(root / "jobs.json"),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]
    # A single process resumes the sharded FSDP checkpoint too (shards re-assembled).
    train(load_config(data=config("single_from_fsdp", accumulation=2)), resume=str(fsdp_step_3))
    return root


def test_runs_were_distributed(runs):
    for name in ("ddp", "fsdp"):
        state = read_trainer_state(runs / name / "checkpoints" / f"step-{STEPS:08d}")
        assert state["world_size"] == 2
        # Each rank drew 1 batch per step, and an epoch gives each rank 2: 3 epochs done.
        assert state["data"] == {"epoch": 2, "batch": 2}
    fsdp_files = sorted(p.name for p in (runs / "fsdp/checkpoints/step-00000006").iterdir())
    assert "model-00000-of-00002.safetensors" in fsdp_files  # sharded: one file per rank
    assert "model-00001-of-00002.safetensors" in fsdp_files


@pytest.mark.parametrize("stem", ["model", "model-ema", "model-optimizer"])
def test_ddp_and_fsdp_match_one_process(runs, stem):
    single = tensors(runs / "single", stem)
    assert_close(tensors(runs / "ddp", stem), single, atol=1e-6)
    assert_close(tensors(runs / "fsdp", stem), single, atol=1e-6)


def test_training_moved_the_weights(runs):
    # So the comparisons above are not between copies of the initial model.
    before, after = tensors(runs / "single", "model", 3), tensors(runs / "single", "model")
    assert (before["proj_out.weight"] - after["proj_out.weight"]).abs().max() > 1e-4


def test_fsdp_resume_ends_where_the_uninterrupted_run_does(runs):
    for stem in ("model", "model-ema", "model-optimizer"):
        straight, resumed = tensors(runs / "fsdp", stem), tensors(runs / "fsdp_resumed", stem)
        assert straight.keys() == resumed.keys()
        for key in straight:
            assert torch.equal(straight[key], resumed[key]), (stem, key)
        assert_close(tensors(runs / "single_from_fsdp", stem), tensors(runs / "single", stem), 1e-6)


def test_fsdp_export_gathers_the_ema_weights(runs):
    exported = load_transformer(runs / "fsdp/export/transformer").state_dict()
    assert_close(exported, tensors(runs / "fsdp", "model-ema"), atol=0)
