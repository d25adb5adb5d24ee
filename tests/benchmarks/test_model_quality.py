"""lsdm-aug benchmark model-quality measures every gate and writes its report (tiny smoke run)."""

from __future__ import annotations

import json

from lsdm_aug.benchmarks.model_quality import GuidanceSetting, QualitySettings, gates, run_model_quality


def test_model_quality_writes_every_gate(tmp_path, smoke_models, phantom_dataset):
    settings = QualitySettings(data=str(phantom_dataset), model=str(smoke_models), out=str(tmp_path / "q"), count=2,
                               steps=2, evaluator_steps=2, generated_slices=2, features=("malignancy",),
                               settings=(GuidanceSetting("none", 0.0, 0.0), GuidanceSetting("classifier s=1", 1.0, 0.0),
                                         GuidanceSetting("cfg w=2", 0.0, 2.0)),
                               other_spacings=((2.8, 128),))
    report = run_model_quality(settings, progress=False)
    saved = json.loads((tmp_path / "q" / "model_quality.json").read_text())
    assert saved["model"] == report["model"]
    names = [name for name, _, _ in gates(report)]
    assert any("SSIM" in n for n in names) and any("at 2.8 mm" in n for n in names)
    assert set(report["control"]["per_feature"]["malignancy"]) == {"none", "classifier s=1", "cfg w=2"}
    assert report["control"]["guidance_alone"][0]["frechet_vs_none"] == 1.0
    markdown = (tmp_path / "q" / "model_quality.md").read_text()
    assert "| gate | measured | met |" in markdown and "lsdm-aug benchmark model-quality" in markdown
