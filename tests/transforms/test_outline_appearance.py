"""``appearance_from_outline``: the texture and calcification of the real LIDC nodule whose outline is inserted,
told to a feature-conditioned U-Net (classifier-free guidance only) for the features a request leaves out."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torchio as tio

from lsdm_aug.config import rating_level
from lsdm_aug.data.prepared import hu_to_unit
from lsdm_aug.data.semantic import SemanticLabel, semantic_map_from_hu
from lsdm_aug.pipeline import LSDMPipeline
from lsdm_aug.transforms.core import NoduleSynthesizer, usable_nodule_table
from lsdm_aug.transforms.torchio import RandomNoduleSynth


def _source(nodule_id: str) -> dict[str, float]:
    row = usable_nodule_table().set_index("nodule_id").loc[nodule_id]
    return {"texture": float(rating_level(row.texture)), "calcification": float(rating_level(row.calcification, 6))}


def test_draw_takes_the_left_out_appearance_from_the_outlines_own_nodule(slice_hu):
    hu, spacing = slice_hu
    told = NoduleSynthesizer(malignancy=4, appearance_from_outline=True).draw(hu, None, np.random.RandomState(3),
                                                                               (spacing, spacing))
    assert not told.skipped and told.features == {"malignancy": 4.0}  # what was requested stays apart
    assert told.outline_appearance == _source(told.nodule_id)
    texture_asked = NoduleSynthesizer(malignancy=4, texture=2, appearance_from_outline=True).draw(
        hu, None, np.random.RandomState(3), (spacing, spacing))
    assert texture_asked.features == {"malignancy": 4.0, "texture": 2.0}
    assert texture_asked.outline_appearance == {"calcification": _source(texture_asked.nodule_id)["calcification"]}
    default = NoduleSynthesizer(malignancy=4).draw(hu, None, np.random.RandomState(3), (spacing, spacing))
    assert default.outline_appearance == told.outline_appearance  # on by default
    off = NoduleSynthesizer(malignancy=4, appearance_from_outline=False).draw(hu, None, np.random.RandomState(3),
                                                                              (spacing, spacing))
    assert off.outline_appearance == {} and off.nodule_id == told.nodule_id  # off: nothing told, same draw


def _insert_inputs(hu: np.ndarray, spacing: float, pipe: LSDMPipeline):
    semantic = semantic_map_from_hu(hu, spacing_mm=spacing)
    rows, cols = np.nonzero(semantic == SemanticLabel.LUNG)
    outline = np.zeros((9, 9), bool)
    outline[1:8, 1:8] = np.hypot(*np.mgrid[-3:4, -3:4]) <= 3.2
    return hu_to_unit(hu), semantic, outline, (float(np.median(rows)), float(np.median(cols)))


def test_the_pipeline_conditions_on_told_features_without_guiding_to_them(slice_hu, smoke_models):
    pipe = LSDMPipeline.from_pretrained(str(smoke_models), device="cpu")
    hu, spacing = slice_hu
    image, semantic, outline, centre = _insert_inputs(hu, spacing, pipe)

    def insert(features, conditioning=None, cfg_scale=2.0):
        return pipe.insert(image, semantic, outline, centre, features, spacing_mm=spacing, steps=2, seed=1,
                           guidance_scale=0.0, cfg_scale=cfg_scale, conditioning=conditioning)

    plain, told = insert({"malignancy": 4.0}), insert({"malignancy": 4.0}, {"texture": 1.0, "calcification": 6.0})
    assert not np.array_equal(plain.image, told.image)  # the U-Net was told
    assert told.record["conditioning"] == {"texture": 1.0, "calcification": 6.0} and "texture" not in told.record
    assert "conditioning" not in plain.record
    asked = insert({"malignancy": 4.0, "texture": 5.0})
    overridden = insert({"malignancy": 4.0, "texture": 5.0}, {"texture": 1.0})
    np.testing.assert_array_equal(asked.image, overridden.image)  # a requested feature keeps its value
    assert "conditioning" not in overridden.record  # ... and the record says nothing else was told
    unguided = insert({"malignancy": 4.0}, {"texture": 1.0}, cfg_scale=0.0)
    assert "conditioning" not in unguided.record  # w = 0 samples without the feature vector: nothing told
    np.testing.assert_array_equal(insert({"malignancy": 4.0}, cfg_scale=0.0).image,
                                  insert({"malignancy": 4.0}, {"texture": 1.0}, cfg_scale=0.0).image)  # w = 0: unused
    with pytest.raises(ValueError, match="texture must be in 1..5, got 7"):
        insert({"malignancy": 4.0}, {"texture": 7.0})
    with pytest.raises(ValueError, match="conditioning must hold one feature dict per item: 2 for 1 items"):
        pipe.insert_batch([image], [semantic], [outline], [centre], [{"malignancy": 4.0}], [1], spacing_mm=[spacing],
                          steps=2, conditioning=[{}, {}])


def test_the_synthesizer_applies_what_it_drew_alone_and_in_a_batch(slice_hu, smoke_models):
    hu, spacing = slice_hu
    synth = NoduleSynthesizer(malignancy=4, appearance_from_outline=True, model=str(smoke_models), steps=2,
                              guidance_scale=0.0, cfg_scale=2.0, device="cpu")
    params = synth.draw(hu, None, np.random.RandomState(3), (spacing, spacing))
    alone, _, info = synth.apply(hu, None, params, (spacing, spacing))
    (batched, _, _), = synth.apply_batch([hu], [None], [params], [(spacing, spacing)])
    assert info["outline_appearance"] == params.outline_appearance and info["changed_pixels"] > 0
    assert np.abs(alone - batched).max() <= 1.0  # HU: a batch's float rounding at most
    plain = NoduleSynthesizer(malignancy=4, model=str(smoke_models), steps=2, guidance_scale=0.0, cfg_scale=2.0,
                              device="cpu", appearance_from_outline=False)
    unchanged, _, _ = plain.apply(hu, None, plain.draw(hu, None, np.random.RandomState(3), (spacing, spacing)),
                                  (spacing, spacing))
    assert not np.array_equal(unchanged, alone)


def test_torchio_replays_the_drawn_appearance(slice_hu, smoke_models):
    hu, spacing = slice_hu
    subject = tio.Subject(image=tio.ScalarImage(tensor=torch.from_numpy(hu)[None, ..., None],
                                                affine=np.diag([spacing, spacing, 1.0, 1.0])))
    torch.manual_seed(0)
    transformed = RandomNoduleSynth(label_name=None, malignancy=5, appearance_from_outline=True, cfg_scale=2.0,
                                    model=str(smoke_models), steps=2)(subject)
    history = transformed.history[-1]
    assert set(history.outline_appearance) == {"texture", "calcification"}
    assert torch.equal(transformed.get_composed_history()(subject).image.data, transformed.image.data)
