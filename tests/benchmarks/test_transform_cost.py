"""The transform-cost benchmark runs end to end on the smoke models and reports every mode."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

BENCHMARK = Path(__file__).resolve().parents[2] / "benchmarks" / "transform_cost.py"


@pytest.mark.slow
def test_transform_cost_reports_every_mode(tmp_path, smoke_models, monkeypatch):
    spec = importlib.util.spec_from_file_location("transform_cost", BENCHMARK)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    monkeypatch.setattr(module, "SIZE", 64)
    monkeypatch.setattr(sys, "argv", ["transform_cost.py", "--model", str(smoke_models), "--out", str(tmp_path),
                                      "--samples", "3", "--steps", "2", "--batch-size", "2", "--bank-size", "3",
                                      "--synth-count", "2"])
    module.main()
    report = json.loads((tmp_path / "transform_cost.json").read_text())
    for mode in ("live", "batch", "bank"):
        assert report[mode]["samples"] == 3 and report[mode]["seconds_per_sample"] > 0
        assert 0 < report[mode]["changed_share"]["mean"] <= report[mode]["changed_share"]["max"] < 0.2
    assert [r["batch_size"] for r in report["synthesize"]] == [1, 2]
    assert all(r["cases_per_minute"] > 0 for r in report["synthesize"])
    assert "| bank (Poisson placement) | 3 |" in (tmp_path / "transform_cost.md").read_text()
