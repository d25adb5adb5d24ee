"""The independent evaluator trains on clean crops of any feature and scores crops as probabilities."""

from __future__ import annotations

import numpy as np
import pytest

from lsdm_aug.metrics.evaluator import NoduleEvaluator


@pytest.fixture(scope="module")
def texture_dataset(tmp_path_factory):
    """A tiny phantom set with every texture level (the shared fixture's train split may lack ground glass)."""
    from lsdm_aug.data.phantom import PhantomConfig, prepare_phantom

    folder = tmp_path_factory.mktemp("texture") / "phantom"
    prepare_phantom(folder, count=24, seed=0, config=PhantomConfig(size=64, slices_per_patient=2,
                                                                    nodule_free_fraction=0.0, balance=("texture",)))
    return folder


def test_evaluator_trains_per_feature_and_scores_probabilities(texture_dataset, phantom_dataset):
    evaluator, report = NoduleEvaluator.train(texture_dataset, crop_px=16, steps=5, batch_size=8, feature="texture")
    assert report["feature"] == "texture" and report["train_nodules"] > 0
    auc = report["validation_auc"]
    assert np.isnan(auc) or 0 <= auc <= 1  # the tiny validation split may hold one texture class only
    scores = evaluator.high_probability(np.zeros((3, 16, 16), np.float32))
    assert scores.shape == (3,) and ((scores >= 0) & (scores <= 1)).all()
    with pytest.raises(ValueError, match="judges texture, not malignancy"):
        evaluator.malignant_probability(np.zeros((1, 16, 16), np.float32))
    with pytest.raises(ValueError, match="feature must be one of"):
        NoduleEvaluator.train(phantom_dataset, feature="margin")
