"""The transforms take the pipeline's ``max_redraws``: MONAI, TorchIO (and its replay) hand it to the pipeline
they load, and a bad value fails where the transform is built, not in a DataLoader worker."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torchio as tio
from monai.data import MetaTensor

from lsdm_aug import NoduleSynth
from lsdm_aug.transforms.core import NoduleSynthesizer, load_pipeline
from lsdm_aug.transforms.monai import synthesis_records
from lsdm_aug.transforms.torchio import NoduleSynthesis, RandomNoduleSynth


@pytest.fixture
def always_saturated(monkeypatch):
    """Every draw looks saturated: each request told "not calcified" is redrawn as often as allowed."""
    from lsdm_aug import pipeline as module

    monkeypatch.setattr(module, "is_saturated", lambda image, region: True)


@pytest.mark.parametrize("allowed", [0, 1, 3])
def test_monai_redraws_as_often_as_it_is_told(slice_hu, smoke_models, always_saturated, allowed):
    hu, spacing = slice_hu
    image = MetaTensor(torch.from_numpy(hu)[None], affine=torch.diag(torch.tensor([spacing, spacing, 1.0, 1.0])))
    synth = NoduleSynth(malignancy=2, calcification=6, guidance_scale=0.0, cfg_scale=1.0, model=str(smoke_models),
                        steps=2, max_redraws=allowed)
    record = synthesis_records(synth.set_random_state(4)(image))[-1]
    assert record["redraws"] == allowed and record["saturated"] is True
    assert load_pipeline(str(smoke_models), None, allowed).max_redraws == allowed  # one cached pipeline per value


def test_torchio_takes_max_redraws_and_its_replay_repeats_the_redrawn_nodule(slice_hu, smoke_models):
    hu, spacing = slice_hu
    subject = tio.Subject(image=tio.ScalarImage(tensor=torch.from_numpy(hu)[None, ..., None],
                                                affine=np.diag([spacing, spacing, 1.0, 1.0])))
    torch.manual_seed(0)
    transformed = RandomNoduleSynth(label_name=None, malignancy=5, calcification=6, model=str(smoke_models), steps=2,
                                    cfg_scale=1.0, max_redraws=1)(subject)
    replay = transformed.get_composed_history()
    assert isinstance(replay[0], NoduleSynthesis) and replay[0].max_redraws == 1
    assert torch.equal(replay(subject).image.data, transformed.image.data)


@pytest.mark.parametrize("value", [-1, 1.5, True])
def test_a_bad_max_redraws_is_named_where_the_transform_is_built(value):
    with pytest.raises(ValueError, match=f"max_redraws must be an int >= 0, got {value!r}"):
        NoduleSynthesizer(max_redraws=value)
    with pytest.raises(ValueError, match="max_redraws must be an int >= 0"):
        NoduleSynth(max_redraws=value)
    with pytest.raises(ValueError, match="max_redraws must be an int >= 0"):
        RandomNoduleSynth(max_redraws=value)
