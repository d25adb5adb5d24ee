"""A wrong label key or label name is an error, never an unlabelled nodule (unless the user opts out)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torchio as tio
from monai.data import MetaTensor

from lsdm_aug import NoduleSynthd
from lsdm_aug.transforms.monai import NoduleSynthBatchd
from lsdm_aug.transforms.torchio import RandomNoduleSynth


def _meta(array, spacing):
    return MetaTensor(torch.from_numpy(np.ascontiguousarray(array))[None].float(),
                      affine=torch.diag(torch.tensor([spacing, spacing, 1.0, 1.0])))


def test_monai_label_key_not_in_the_data_is_named(slice_hu, smoke_models):
    hu, spacing = slice_hu
    data = {"image": _meta(hu, spacing), "seg": _meta(np.zeros_like(hu), spacing)}
    synth = NoduleSynthd(keys="image", label_key="label", malignancy=5, model=str(smoke_models), steps=2)
    with pytest.raises(KeyError, match=r"label key 'label' is not in the data \(keys: \['image', 'seg'\]\)"):
        synth.set_random_state(0)(data)
    batch = NoduleSynthBatchd(keys="image", label_key="label", malignancy=5, model=str(smoke_models), steps=2)
    with pytest.raises(KeyError, match="label key 'label'"):
        batch({"image": data["image"][None], "seg": data["seg"][None]})


def test_monai_allow_missing_keys_opts_out(slice_hu, smoke_models):
    hu, spacing = slice_hu
    synth = NoduleSynthd(keys="image", label_key="label", allow_missing_keys=True, malignancy=5,
                         model=str(smoke_models), steps=2).set_random_state(0)
    out = synth({"image": _meta(hu, spacing)})
    assert "label" not in out and (out["image"] != _meta(hu, spacing)).any()


def _subject(hu, spacing, label_name="seg"):
    affine = np.diag([spacing, spacing, 1.0, 1.0])
    return tio.Subject(image=tio.ScalarImage(tensor=torch.from_numpy(hu)[None, ..., None], affine=affine),
                       **{label_name: tio.LabelMap(tensor=torch.zeros(1, *hu.shape, 1), affine=affine)})


def test_torchio_label_name_not_in_the_subject_is_named(slice_hu, smoke_models):
    hu, spacing = slice_hu
    with pytest.raises(KeyError, match=r"subject has no label map 'label' \(images: \['image', 'seg'\]\)"):
        RandomNoduleSynth(malignancy=5, model=str(smoke_models), steps=2)(_subject(hu, spacing))
    torch.manual_seed(0)
    out = RandomNoduleSynth(label_name="seg", malignancy=5, model=str(smoke_models), steps=2)(_subject(hu, spacing))
    assert (out.seg.data > 0).any()


def test_torchio_include_and_exclude_work_as_in_torchio(slice_hu, smoke_models):
    hu, spacing = slice_hu
    subject = _subject(hu, spacing)
    untouched = RandomNoduleSynth(label_name="seg", exclude=["image"], malignancy=5, model=str(smoke_models),
                                  steps=2)(subject)
    assert torch.equal(untouched.image.data, subject.image.data) and not (untouched.seg.data > 0).any()
    with pytest.raises(ValueError, match="leave out its label map 'seg'"):
        RandomNoduleSynth(label_name="seg", include=["image"], malignancy=5, model=str(smoke_models), steps=2)(subject)
    torch.manual_seed(0)
    edited = RandomNoduleSynth(label_name="seg", include=["image", "seg"], malignancy=5, model=str(smoke_models),
                               steps=2)(subject)
    assert (edited.seg.data > 0).any()
