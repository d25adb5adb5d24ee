"""The lung fields behind a transform's site and semantic map: remembered per slice, or given by the caller."""

from __future__ import annotations

import numpy as np
import pytest

from lsdm_aug.data.semantic import lung_mask_from_hu
from lsdm_aug.transforms.core import NoduleSynthesizer, slice_lung


def test_slice_lung_is_the_kmeans_lung_and_is_remembered_by_content(slice_hu):
    hu, spacing = slice_hu
    lung = slice_lung(hu, spacing)
    assert np.array_equal(lung, lung_mask_from_hu(hu, spacing))
    assert slice_lung(hu.copy(), spacing) is lung  # same content, another array: not computed again
    assert not lung.flags.writeable
    changed = hu.copy()
    changed[0, 0] += 1.0
    assert slice_lung(changed, spacing) is not lung
    assert slice_lung(hu, spacing * 1.5) is not lung  # the spacing sizes the morphology: another key


def test_a_given_lung_mask_decides_the_site(slice_hu, smoke_models):
    hu, spacing = slice_hu
    lung = lung_mask_from_hu(hu, spacing)
    left = lung.copy()
    left[:, hu.shape[1] // 2:] = False  # only the left half of the lung is offered
    synthesis = NoduleSynthesizer(malignancy=4, model=str(smoke_models), steps=2)
    for seed in range(4):
        params = synthesis.draw(hu, None, np.random.RandomState(seed), (spacing, spacing), lung_mask=left)
        assert not params.skipped
        assert params.centre[1] < hu.shape[1] / 2
        out, label, info = synthesis.apply(hu, np.zeros(hu.shape, np.uint8), params, (spacing, spacing),
                                           lung_mask=left)
        assert info["changed_pixels"] > 0 and label.any()


def test_an_empty_given_lung_mask_is_a_recorded_skip(slice_hu, smoke_models):
    hu, spacing = slice_hu
    synthesis = NoduleSynthesizer(malignancy=4, model=str(smoke_models), steps=2)
    params = synthesis.draw(hu, None, np.random.RandomState(0), (spacing, spacing),
                            lung_mask=np.zeros(hu.shape, bool))
    assert params.skipped == "no lung tissue"


def test_the_same_lung_given_or_found_gives_the_same_insertion(slice_hu, smoke_models):
    hu, spacing = slice_hu
    synthesis = NoduleSynthesizer(malignancy=2, model=str(smoke_models), steps=2)
    params = synthesis.draw(hu, None, np.random.RandomState(3), (spacing, spacing))
    found = synthesis.apply(hu, None, params, (spacing, spacing))[0]
    given = synthesis.apply_batch([hu], [None], [params], [(spacing, spacing)],
                                  lung_masks=[lung_mask_from_hu(hu, spacing)])[0][0]
    assert np.array_equal(found, given)


def test_a_lung_mask_of_another_shape_is_refused(slice_hu, smoke_models):
    hu, spacing = slice_hu
    synthesis = NoduleSynthesizer(malignancy=4, model=str(smoke_models), steps=2)
    with pytest.raises(ValueError, match=r"lung_mask must have the image's shape \(64, 64\), got \(32, 32\)"):
        synthesis.draw(hu, None, np.random.RandomState(0), (spacing, spacing), lung_mask=np.ones((32, 32), bool))
    with pytest.raises(ValueError, match="one mask .or None. per image: 2 for 1 images"):
        synthesis.apply_batch([hu], [None], [synthesis.draw(hu, None, np.random.RandomState(0), (spacing, spacing))],
                              [(spacing, spacing)], lung_masks=[None, None])
