"""NoduleSynth in MONAI and TorchIO: footprint-only changes, label updates, recorded and replayable draws."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torchio as tio
from monai.data import MetaTensor

from lsdm_aug.transforms.core import NoduleSynthesizer, parse_feature
from lsdm_aug.transforms.monai import NoduleSynth, NoduleSynthd, NoduleSynthD, NoduleSynthDict, synthesis_records
from lsdm_aug.transforms.torchio import NoduleSynthesis, RandomNoduleSynth


def _meta(array: np.ndarray, spacing: float, z: float = 1.0) -> MetaTensor:
    return MetaTensor(torch.from_numpy(np.ascontiguousarray(array))[None].float(),
                      affine=torch.diag(torch.tensor([spacing, spacing, z, 1.0])))


@pytest.mark.parametrize(("name", "value"), [("malignancy", 0), ("texture", 6), ("spiculation", (4, 2)),
                                             ("lobulation", "sometimes"), ("malignancy", True)])
def test_bad_feature_values_name_the_value(name, value):
    with pytest.raises(ValueError, match=f"{name} must be an int 1..5"):
        parse_feature(name, value)


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="mode must be one of"):
        NoduleSynthesizer(mode="paint")
    with pytest.raises(ValueError, match="intensity must be one of"):
        NoduleSynthesizer(intensity="raw")
    with pytest.raises(ValueError, match="size_mm must be in 2..60 mm, got 100"):
        NoduleSynthesizer(size_mm=100)


def test_monai_insert_changes_only_the_footprint_and_records_the_draw(slice_hu, smoke_models):
    hu, spacing = slice_hu
    image, label = _meta(hu, spacing), _meta(np.zeros_like(hu), spacing)
    synth = NoduleSynth(malignancy=5, texture=(4, 5), model=str(smoke_models), steps=3, label_value=2).set_random_state(0)
    out, out_label = synth(image, label)
    record = synthesis_records(out)[-1]
    assert record["features"]["malignancy"] == 5.0 and record["features"]["texture"] in (4.0, 5.0)
    assert synthesis_records(out_label)[-1] == record
    changed = (out != image)[0].numpy()
    assert changed.any()
    assert set(np.unique(out_label.numpy())) == {0.0, 2.0}
    footprint_reach = np.argwhere(changed)
    centre = np.array(record["centre"])
    assert np.abs(footprint_reach - centre).max() < 20  # only around the inserted nodule
    assert record["changed_pixels"] >= changed.sum()
    again, again_label = NoduleSynth(malignancy=5, texture=(4, 5), model=str(smoke_models), steps=3,
                                     label_value=2).set_random_state(0)(image, label)
    assert torch.equal(again, out) and torch.equal(again_label, out_label)


def test_monai_prob_zero_is_the_identity(slice_hu, smoke_models):
    hu, spacing = slice_hu
    image = _meta(hu, spacing)
    out = NoduleSynth(prob=0.0, model=str(smoke_models)).set_random_state(0)(image)
    assert torch.equal(out, image) and "nodule_synth" not in out.meta


def test_monai_dictionary_version_and_aliases(slice_hu, smoke_models):
    assert NoduleSynthD is NoduleSynthd and NoduleSynthDict is NoduleSynthd
    hu, spacing = slice_hu
    data = {"image": _meta(hu, spacing), "label": _meta(np.zeros_like(hu), spacing)}
    out = NoduleSynthd(keys="image", label_key="label", malignancy=(1, 2), model=str(smoke_models),
                       steps=3).set_random_state(4)(data)
    inserted = out["label"][0].numpy() > 0
    assert inserted.any()
    assert synthesis_records(out["image"])[-1]["features"]["malignancy"] in (1.0, 2.0)


def test_monai_no_lung_is_left_unchanged_with_a_reason(smoke_models):
    soft_tissue = _meta(np.full((64, 64), 40.0, np.float32), 5.5)
    out = NoduleSynth(malignancy=3, model=str(smoke_models), steps=2).set_random_state(0)(soft_tissue)
    assert torch.equal(out, soft_tissue)
    assert synthesis_records(out)[-1]["skipped"] == "no lung tissue"


def test_monai_3d_volume_gets_the_nodule_on_consecutive_slices(slice_hu, smoke_models):
    hu, spacing = slice_hu
    volume = _meta(np.stack([hu] * 8, axis=-1), spacing, z=2.5)
    label = _meta(np.zeros((64, 64, 8), np.float32), spacing, z=2.5)
    out, out_label = NoduleSynth(malignancy=4, model=str(smoke_models), steps=2).set_random_state(3)(volume, label)
    slices = synthesis_records(out)[-1]["slices"]
    assert len(slices) >= 1 and list(slices) == list(range(slices[0], slices[0] + len(slices)))
    labelled = np.flatnonzero(out_label[0].numpy().reshape(-1, 8).any(axis=0))
    assert set(labelled) <= set(slices) and len(labelled) >= 1
    untouched = [k for k in range(8) if k not in slices]
    assert all(torch.equal(out[0, ..., k], volume[0, ..., k]) for k in untouched)


def test_normalized_intensities_round_trip_outside_the_footprint(slice_hu, smoke_models):
    hu, spacing = slice_hu
    normalized = (hu - (-300.0)) / 400.0
    image = _meta(normalized, spacing)
    out = NoduleSynth(malignancy=5, intensity="normalized", hu_mean=-300.0, hu_std=400.0, model=str(smoke_models),
                      steps=2).set_random_state(1)(image)
    changed = (out != image)[0].numpy()
    assert changed.any() and changed.sum() < 0.2 * changed.size
    assert float(out.max()) < (800 + 300) / 400 + 1  # stayed in normalized units, not HU


def test_torchio_history_replays_the_same_result(slice_hu, smoke_models):
    hu, spacing = slice_hu
    affine = np.diag([spacing, spacing, 1.0, 1.0])
    subject = tio.Subject(image=tio.ScalarImage(tensor=torch.from_numpy(hu)[None, ..., None], affine=affine),
                          label=tio.LabelMap(tensor=torch.zeros(1, 64, 64, 1), affine=affine))
    torch.manual_seed(0)
    transformed = RandomNoduleSynth(malignancy=(4, 5), model=str(smoke_models), steps=3)(subject)
    assert (transformed.label.data > 0).any()
    history = transformed.get_composed_history()
    assert isinstance(history.transforms[0], NoduleSynthesis)
    assert history.transforms[0].features["malignancy"] in (4.0, 5.0)
    replayed = history(subject)
    assert torch.equal(replayed.image.data, transformed.image.data)
    assert torch.equal(replayed.label.data, transformed.label.data)
    changed = transformed.image.data != subject.image.data
    assert changed.any() and changed.sum() < 0.2 * changed.numel()


def test_monai_dataloader_with_two_workers_draws_differently_and_reproducibly(slice_hu, smoke_models):
    import json

    from monai.data import DataLoader, Dataset
    from monai.utils import set_determinism

    hu, spacing = slice_hu
    items = [{"image": _meta(hu, spacing), "label": _meta(np.zeros_like(hu), spacing)} for _ in range(4)]

    def seeds() -> list[int]:
        set_determinism(0)
        transform = NoduleSynthd(keys="image", label_key="label", malignancy="balanced", model=str(smoke_models), steps=2)
        loader = DataLoader(Dataset(items, transform), batch_size=2, num_workers=2)
        return [json.loads(r)["seed"] for batch in loader for r in batch["image"].meta["nodule_synth"][-1]]

    first = seeds()
    assert len(set(first)) == 4  # every sample its own draw, across both workers
    assert seeds() == first  # and the same again under set_determinism
    set_determinism(None)


def test_batch_transform_gives_each_sample_its_own_draw_and_the_single_sample_result(slice_hu, smoke_models):
    import json

    from monai.data import list_data_collate

    from lsdm_aug import NoduleSynthBatchd
    from lsdm_aug.transforms.core import NoduleParameters

    hu, spacing = slice_hu
    batch = list_data_collate([{"image": _meta(hu, spacing), "label": _meta(np.zeros_like(hu), spacing)}
                               for _ in range(3)])
    synth = NoduleSynthBatchd(keys="image", label_key="label", malignancy="balanced", model=str(smoke_models),
                              steps=2, label_value=2)
    out = synth.set_random_state(7)(batch)
    records = [json.loads(r) for r in out["image_nodule_synth"]]
    assert len({r["seed"] for r in records}) == 3 and out["image"].shape == batch["image"].shape
    single = NoduleSynthesizer(malignancy=None, model=str(smoke_models), steps=2, label_value=2)
    for i, record in enumerate(records):
        for done in ("changed_pixels", "told", "redraws", "saturated"):  # what was done, beside the drawn parameters
            record.pop(done, None)
        params = NoduleParameters(**{**record, "centre": tuple(record["centre"]), "slices": tuple(record["slices"])})
        alone, alone_label, _ = single.apply(hu.astype(np.float32), np.zeros(hu.shape, np.float32), params,
                                             (spacing, spacing))
        assert np.allclose(out["image"][i, 0].numpy(), alone, atol=0.05)
        assert np.array_equal(out["label"][i, 0].numpy(), alone_label)
    assert set(np.unique(out["label"].numpy())) == {0.0, 2.0}


def test_monai_cache_dataset_synthesizes_after_the_cached_part(slice_hu, smoke_models):
    from monai.data import CacheDataset
    from monai.transforms import Compose, EnsureTyped

    hu, spacing = slice_hu
    items = [{"image": _meta(hu, spacing), "label": _meta(np.zeros_like(hu), spacing)} for _ in range(2)]
    transform = Compose([EnsureTyped(keys=["image", "label"]),  # deterministic: cached
                         NoduleSynthd(keys="image", label_key="label", malignancy=4, model=str(smoke_models), steps=2)])
    transform.set_random_state(0)
    dataset = CacheDataset(items, transform, cache_rate=1.0, num_workers=0, progress=False)
    first, second = dataset[0], dataset[0]
    assert not synthesis_records(dataset._cache[0]["image"])  # the cache holds the slice before synthesis
    assert synthesis_records(first["image"])[-1]["seed"] != synthesis_records(second["image"])[-1]["seed"]
    assert (first["label"] > 0).any() and (second["label"] > 0).any()
    assert not torch.equal(first["image"], second["image"])  # a new nodule on every access


def test_torchio_subjects_loader_keeps_subjects_and_caches_flat(slice_hu, smoke_models):
    from lsdm_aug.transforms.core import load_pipeline

    hu, spacing = slice_hu
    affine = np.diag([spacing, spacing, 1.0, 1.0])
    subjects = [tio.Subject(image=tio.ScalarImage(tensor=torch.from_numpy(hu)[None, ..., None].float(), affine=affine),
                            label=tio.LabelMap(tensor=torch.zeros(1, 64, 64, 1), affine=affine)) for _ in range(2)]
    transform = tio.Compose([tio.RandomFlip(axes=(0,), flip_probability=1.0),
                             RandomNoduleSynth(malignancy=(4, 5), model=str(smoke_models), steps=2)])
    loader = tio.SubjectsLoader(tio.SubjectsDataset(subjects, transform=transform), batch_size=2, num_workers=0)
    load_pipeline.cache_clear()  # earlier tests in this process loaded other models
    torch.manual_seed(0)
    for _epoch in range(3):
        for batch in loader:
            assert (batch["label"][tio.DATA] > 0).flatten(1).any(1).all()
    # the dataset's subjects are never changed: no history piles up epoch after epoch (what grew memory before)
    assert all(len(s.applied_transforms) == 0 for s in subjects)
    assert all(torch.equal(s.image.data, subjects[0].image.data) for s in subjects)
    assert [name for name, _ in loader.dataset[0].applied_transforms] == ["Flip", "NoduleSynthesis"]
    assert load_pipeline.cache_info().currsize == 1  # one pipeline for the model and device, not one per sample
