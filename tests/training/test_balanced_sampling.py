"""Classifier training draws nodules label-balanced, however unbalanced the ratings are."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from lsdm_aug.sampling.guidance import LatentBox
from lsdm_aug.training.classifiers import NoduleCrops, balanced_levels
from lsdm_aug.training.diffusion import LatentData

LOBULATION_COUNTS = {1: 60, 2: 25, 3: 10, 4: 4, 5: 1}


@pytest.fixture(scope="module")
def crops() -> NoduleCrops:
    count = sum(LOBULATION_COUNTS.values())
    lobulation = np.concatenate([[level] * n for level, n in LOBULATION_COUNTS.items()]).astype(float)
    malignancy = np.where(np.arange(count) < 90, 1.0 + (np.arange(count) % 2), 4.0)  # 90 benign, 10 malignant
    rng = np.random.default_rng(0)
    features = pd.DataFrame({
        "case_id": [f"case_{i:03d}" for i in range(count)],
        "centre_row": rng.uniform(0, 64, count), "centre_col": rng.uniform(0, 64, count),
        "malignancy": malignancy, "lobulation": lobulation, "spiculation": 1.0, "texture": 5.0})
    latents = torch.arange(count * 3 * 16 * 16, dtype=torch.float32).reshape(count, 3, 16, 16)
    data = LatentData(latents, torch.zeros_like(latents), torch.zeros(count, 1, 64, 64, dtype=torch.long))
    return NoduleCrops(data, features, list(features.case_id), crop_latent_px=4, factor=4)


def test_balanced_levels():
    assert balanced_levels("malignancy", np.array([1, 2, 2.5, 3, 5])).tolist() == [0, 0, 0, 1, 1]
    assert balanced_levels("texture", np.array([0.7, 1.49, 2.5, 3.0, 5.2])).tolist() == [1, 1, 3, 3, 5]


def test_every_malignancy_class_is_drawn_about_equally_often(crops):
    assert (crops.ratings.malignancy >= 3).mean() == pytest.approx(0.1)
    index = crops.balanced_index("malignancy", 4000, torch.Generator().manual_seed(0))
    assert index.shape == (4000,) and index.min() >= 0 and index.max() < len(crops)
    malignant = (crops.targets("malignancy", index) >= 3).float().mean()
    assert 0.45 < float(malignant) < 0.55


def test_every_regression_level_is_drawn_about_equally_often(crops):
    index = crops.balanced_index("lobulation", 5000, torch.Generator().manual_seed(1))
    levels = balanced_levels("lobulation", crops.targets("lobulation", index).numpy())
    counts = np.bincount(levels, minlength=6)[1:]
    assert counts.sum() == 5000
    assert counts.min() > 850 and counts.max() < 1150, counts  # 1000 each, against 3000 / 50 unbalanced
    # the single level-5 nodule is drawn every time its level comes up
    assert len(np.unique(index.numpy()[levels == 5])) == 1


def test_a_feature_with_one_level_draws_from_all_nodules(crops):
    index = crops.balanced_index("texture", 500, torch.Generator().manual_seed(2))
    assert len(np.unique(index.numpy())) > 90


def test_draws_are_reproducible(crops):
    first = crops.balanced_index("lobulation", 50, torch.Generator().manual_seed(3))
    assert torch.equal(first, crops.balanced_index("lobulation", 50, torch.Generator().manual_seed(3)))


def test_each_crop_is_the_latent_window_around_its_nodule(crops):
    row = crops.ratings.iloc[7]
    box = LatentBox.around(row.centre_row, row.centre_col, 4, (16, 16), 4)
    latents = torch.arange(len(crops) * 3 * 16 * 16, dtype=torch.float32).reshape(len(crops), 3, 16, 16)
    assert torch.equal(crops.crops[7], latents[7, :, box.rows, box.cols])
    assert crops.crops.shape == (len(crops), 3, 4, 4)


def test_ambiguous_malignancy_is_never_drawn_for_the_malignancy_classifier():
    from lsdm_aug.training.classifiers import ambiguous_malignancy

    count = 60
    malignancy = np.array([1.0, 2.0, 2.5, 3.0, 3.5, 4.0] * 10)
    rng = np.random.default_rng(1)
    features = pd.DataFrame({"case_id": [f"c{i}" for i in range(count)], "centre_row": rng.uniform(0, 64, count),
                             "centre_col": rng.uniform(0, 64, count), "malignancy": malignancy, "lobulation": 1.0,
                             "spiculation": 1.0, "texture": 5.0})
    latents = torch.zeros(count, 3, 16, 16)
    data = LatentData(latents, torch.zeros_like(latents), torch.zeros(count, 1, 64, 64, dtype=torch.long))
    band = NoduleCrops(data, features, list(features.case_id), 4, 4, malignancy_ambiguous=(2.5, 3.5))
    drawn = band.targets("malignancy", band.balanced_index("malignancy", 400, torch.Generator().manual_seed(0)))
    assert set(drawn.tolist()) == {1.0, 2.0, 4.0}
    assert abs(int((drawn >= 3).sum()) - 200) < 40  # benign and malignant still balanced
    lobulation = band.targets("lobulation", band.balanced_index("lobulation", 50, torch.Generator().manual_seed(0)))
    assert len(lobulation) == 50  # other features draw from every nodule
    assert ambiguous_malignancy(malignancy, ()).sum() == 0
    assert ambiguous_malignancy(malignancy, (2.5, 3.5)).sum() == 30


def test_augment_rotates_and_flips_the_whole_batch_consistently():
    from lsdm_aug.training.classifiers import augment

    images = torch.arange(2 * 16, dtype=torch.float32).reshape(2, 1, 4, 4)
    seen = {tuple(augment(images, torch.Generator().manual_seed(s))[0, 0].flatten().tolist()) for s in range(40)}
    assert len(seen) == 8  # the 8 symmetries of the square
    out = augment(images, torch.Generator().manual_seed(3))
    assert sorted(out[1].flatten().tolist()) == sorted(images[1].flatten().tolist())


def test_bad_ambiguous_band_is_named():
    from lsdm_aug.config import RecipeError, load_recipe, recipe_from_dict

    recipe = load_recipe("phantom-128")
    assert recipe.train_classifiers.malignancy_ambiguous == (2.5, 3.5) and recipe.train_classifiers.augment
    data = recipe.to_dict() | {"train_classifiers": {"malignancy_ambiguous": [4, 2]}}
    with pytest.raises(RecipeError, match="malignancy_ambiguous must be \\[\\] or \\[low, high\\] within 1..5"):
        recipe_from_dict(data)
