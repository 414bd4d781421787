"""scripts/interpolate_weights.py: the weight-space blend of two pipelines (a "model soup")."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from script_helpers import SCRIPTS, load_script

SCRIPT = SCRIPTS / "interpolate_weights.py"


interp = load_script("interpolate_weights")


def _pipeline(root: Path, value: float, tag: str) -> Path:
    (root / "transformer").mkdir(parents=True)
    (root / "vae").mkdir()
    weights = {"w": torch.full((3, 2), value, dtype=torch.float16), "b": torch.full((2,), value)}
    save_file(weights, str(root / "transformer" / "diffusion_pytorch_model.safetensors"))
    (root / "transformer" / "config.json").write_text(json.dumps({"tag": tag}))
    (root / "vae" / "config.json").write_text(json.dumps({"tag": tag}))
    return root


def test_blend_is_the_weighted_mean_in_b_dtypes() -> None:
    a = {"w": torch.tensor([0.0, 4.0], dtype=torch.float16), "b": torch.tensor([2.0])}
    b = {"w": torch.tensor([2.0, 0.0], dtype=torch.float16), "b": torch.tensor([6.0])}
    for alpha in (0.0, 0.25, 1.0):
        out = interp.blend(a, b, alpha)
        assert out["w"].dtype == torch.float16 and out["b"].dtype == torch.float32
        expected_w = [(1 - alpha) * 0.0 + alpha * 2.0, (1 - alpha) * 4.0 + alpha * 0.0]
        assert out["w"].float().tolist() == pytest.approx(expected_w)
        assert out["b"].tolist() == pytest.approx([(1 - alpha) * 2.0 + alpha * 6.0])


def test_blend_refuses_unrelated_transformers() -> None:
    a = {"w": torch.zeros(2)}
    with pytest.raises(ValueError, match="parameter names"):
        interp.blend(a, {"v": torch.zeros(2)}, 0.5)
    with pytest.raises(ValueError, match="shape"):
        interp.blend(a, {"w": torch.zeros(3)}, 0.5)


def test_cli_writes_a_whole_pipeline_with_b_parts(tmp_path: Path) -> None:
    a = _pipeline(tmp_path / "a", 1.0, "a")
    b = _pipeline(tmp_path / "b", 3.0, "b")
    out = tmp_path / "soup"
    run = [sys.executable, str(SCRIPT), str(a), str(b), str(out)]
    done = subprocess.run([*run, "--alpha", "0.25"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    weights = load_file(out / "transformer" / "diffusion_pytorch_model.safetensors")
    assert weights["w"].float().unique().tolist() == [1.5]  # 0.75 * 1 + 0.25 * 3
    assert json.loads((out / "vae" / "config.json").read_text()) == {"tag": "b"}
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temp left

    again = subprocess.run([*run, "--alpha", "0.5"], capture_output=True, text=True)
    assert again.returncode != 0 and "exists" in again.stderr
    outside = subprocess.run(
        [sys.executable, str(SCRIPT), str(a), str(b), str(tmp_path / "new"), "--alpha", "1.5"],
        capture_output=True,
        text=True,
    )
    assert outside.returncode != 0 and "--alpha must be in [0, 1]" in outside.stderr
