"""``lsdm-aug benchmark generation`` on the smoke models: every model and metric is reported."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch

from lsdm_aug.benchmarks.generation import (GenerationRecipe, _feature_extractor, _ms_ssim, load_generation_recipe,
                                            run_generation)


def test_shipped_recipe_loads_and_ms_ssim_fits_the_slice_size():
    recipe = load_generation_recipe("bench-generation")
    assert recipe.scales == (0, 0.5, 1, 2, 4, 8, 16, 32) and len(recipe.seeds) >= 3
    image = torch.rand(2, 1, 64, 64) * 2 - 1
    assert torch.allclose(_ms_ssim(64)(image, image), torch.ones(2, 1), atol=1e-5)
    with pytest.raises(ValueError, match="count and control_count must be >= 2"):
        GenerationRecipe(count=1).validate()
    with pytest.raises(ValueError, match="ldm_steps must be >= 1 or null"):
        GenerationRecipe(ldm_steps=0).validate()



def test_a_local_resnet_weight_file_gives_the_fid_features(tmp_path):
    from monai.networks.nets import resnet18
    from safetensors.torch import save_file

    weights = tmp_path / "radimagenet-like-resnet18.safetensors"
    save_file({k: v.contiguous() for k, v in resnet18(spatial_dims=2, n_input_channels=3).state_dict().items()},
              weights)
    recipe = GenerationRecipe(feature_extractor=str(weights), feature_extractor_depth=18).validate()
    assert _feature_extractor(recipe, tmp_path / "work").embed(torch.zeros(2, 1, 64, 64)).shape == (2, 512)
    assert not (tmp_path / "work").exists()  # nothing trained
    with pytest.raises(ValueError, match="feature_extractor_depth 18 needs a feature_extractor weight file"):
        GenerationRecipe(feature_extractor_depth=18).validate()


@pytest.mark.slow
def test_generation_benchmark_reports_every_model(tmp_path, smoke_models):
    from lsdm_aug.data.phantom import PhantomConfig, prepare_phantom

    data = tmp_path / "phantom"  # malignancy balanced, so that every evaluator has low and high nodules
    prepare_phantom(data, count=60, config=PhantomConfig(size=64, slices_per_patient=2, nodule_free_fraction=0.0,
                                                         balance=("malignancy",)), seed=1)
    recipe = GenerationRecipe(data=str(data), lsdm=str(smoke_models), model_recipe="phantom-smoke",
                              ldm=str(tmp_path / "ldm"), ldm_steps=3, spade_gan=str(tmp_path / "gan"),
                              spade_gan_steps=2, feature_steps=5, count=2,
                              seeds=(0, 1), steps=2, scales=(0.0, 1.0), control_count=2, evaluator_steps=3)
    report = run_generation(recipe, tmp_path / "work", tmp_path / "report")
    assert list(report["models"]) == ["spade-gan", "ldm", "lsdm", "lsdm+all", "lsdm+malignancy", "lsdm+lobulation",
                                      "lsdm+spiculation", "lsdm+texture"]
    for metrics in report["models"].values():
        assert set(metrics) == {"fid", "ssim", "ms_ssim", "perceptual", "crop_fid"}
        assert all(np.isfinite(v["mean"]) for v in metrics.values())
    assert report["models"]["spade-gan"]["ssim"]["std"] == 0  # deterministic given the map
    assert set(report["control"][0]["malignancy_curve"]) == {"0.0", "1.0"}
    assert all(0 <= v <= 1 for v in report["control"][0]["per_feature"].values())
    assert (tmp_path / "report" / "grid.png").stat().st_size > 1000
    assert json.loads((tmp_path / "report" / "generation.json").read_text())["crop_px"] == 16
    assert "| lsdm+texture |" in (tmp_path / "report" / "generation.md").read_text()
    assert report["training_steps"]["ldm"] == 3 and report["training_steps"]["spade-gan"] == 2

    # a rerun reuses each finished (model, seed) result instead of generating again
    cached = tmp_path / "work" / "results" / "ldm-seed1.json"
    stored = json.loads(cached.read_text())
    stored["result"] = dict.fromkeys(("fid", "ssim", "ms_ssim", "perceptual", "crop_fid"), 7.0)
    cached.write_text(json.dumps(stored))
    seed0 = json.loads((tmp_path / "work" / "results" / "ldm-seed0.json").read_text())["result"]["fid"]
    again = run_generation(recipe, tmp_path / "work", tmp_path / "report")
    assert again["models"]["ldm"]["fid"]["mean"] == pytest.approx((seed0 + 7.0) / 2)
    assert again["models"]["lsdm"] == report["models"]["lsdm"]
    # ... but not under other settings: another step count recomputes every result
    other = run_generation(dataclasses.replace(recipe, steps=3), tmp_path / "work", tmp_path / "report")
    assert other["models"]["ldm"]["fid"]["mean"] != pytest.approx((seed0 + 7.0) / 2)
