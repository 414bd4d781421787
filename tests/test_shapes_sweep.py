"""bench/shapes_sweep.py: one folder per seed and setting, and rows that average the seeds."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

import bench.shapes_sweep as sweep
from fastsana.shapes.bench import CATEGORIES, Generate, ground_truth_generator


def _result(overall: float, held_out: float, score: float) -> dict:
    return {
        "categories": dict.fromkeys(CATEGORIES, score),
        "held_out_categories": dict.fromkeys(CATEGORIES, 1 - score),
        "overall": overall,
        "held_out_overall": held_out,
    }


def test_mean_over_seeds_averages_every_score_and_keeps_each_seed() -> None:
    mean = sweep.mean_over_seeds([_result(0.8, 0.6, 0.5), _result(0.6, 0.7, 0.75)])
    assert mean["overall"] == pytest.approx(0.7)
    assert mean["held_out_overall"] == pytest.approx(0.65)
    assert mean["categories"] == pytest.approx(dict.fromkeys(CATEGORIES, 0.625))
    assert mean["held_out_categories"] == pytest.approx(dict.fromkeys(CATEGORIES, 0.375))
    assert mean["overall_per_seed"] == [0.8, 0.6]
    with pytest.raises(ValueError, match="at least one"):
        sweep.mean_over_seeds([])


@pytest.mark.parametrize("text", ["0,0", "-1", "a", ""])
def test_seeds_argument_rejects_bad_lists(text: str) -> None:
    with pytest.raises(Exception, match="seeds"):
        sweep._seeds(text)


def test_sweep_scores_every_setting_per_seed_and_resumes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = []

    def fake_generator(
        model: Path, *, steps: int, sampler: str, guidance: float | None, size: int | None
    ) -> Generate:
        calls.append((sampler, steps, guidance))
        return ground_truth_generator()

    monkeypatch.setattr(sweep, "pipeline_generator", fake_generator)
    argv = ["shapes_sweep", "--out", str(tmp_path), "--seeds", "0,2", "--prompts-per-category", "1"]
    monkeypatch.setattr(sys, "argv", argv)
    sweep.main()

    assert len(calls) == 2 * 2 * len(sweep.SETTINGS)  # seeds × guidance × solver settings
    assert {guidance for _, _, guidance in calls} == {None, 1.0}
    for seed in (0, 2):
        result = json.loads((tmp_path / f"seed{seed}/flow_dpm-20-cfg/results.json").read_text())
        assert result["seed"] == seed
    summary = json.loads((tmp_path / "sweep.json").read_text())
    assert len(summary) == 2 * len(sweep.SETTINGS)
    # Ground-truth renders are what every prompt asks for: the analyser passes them all.
    assert all(row["overall"] == 1.0 for row in summary.values())
    assert all(len(row["overall_per_seed"]) == 2 for row in summary.values())
    assert "flow_euler 50 no-cfg" in (tmp_path / "sweep.md").read_text()

    calls.clear()
    sweep.main()  # every results.json is there: nothing is generated again
    assert calls == []
