"""Nodule banks: Poisson blending, building and resuming a bank, and placing banked nodules (2D and 3D)."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pandas as pd
import pytest
import torch
import torchio as tio
from monai.data import MetaTensor
from typer.testing import CliRunner

from lsdm_aug.bank import NoduleBank, poisson_blend
from lsdm_aug.synthesis import build_bank
from lsdm_aug.bank.placement import place_patch, shrink_to_area
from lsdm_aug.cli import app
from lsdm_aug.data.phantom import ChestPhantom, PhantomConfig
from lsdm_aug.data.prepared import DatasetMismatchError
from lsdm_aug.synthesis import SynthesisRequest
from lsdm_aug.transforms.core import NoduleSynthesizer
from lsdm_aug.transforms.monai import NoduleSynth, synthesis_records
from lsdm_aug.transforms.torchio import RandomNoduleSynth

runner = CliRunner()


def _disk(shape=(21, 21), radius=4.0) -> np.ndarray:
    rows, cols = np.mgrid[:shape[0], :shape[1]]
    return (rows - shape[0] // 2) ** 2 + (cols - shape[1] // 2) ** 2 <= radius ** 2


# ---- Poisson blending ---------------------------------------------------------------------------------------

def test_poisson_blend_keeps_the_source_contrast_and_takes_the_target_level():
    target = np.full((21, 21), -700.0)
    source = np.full((21, 21), -900.0)
    source[_disk(radius=3)] = 0.0  # a solid nodule 900 HU over its own lung
    region = _disk(radius=6)
    out = poisson_blend(target, source, region)
    assert np.array_equal(out[~region], target[~region])
    assert out[10, 10] - out[10, 10 - 6] == pytest.approx(900, abs=60)  # contrast to its rim kept
    assert out[10, 10] == pytest.approx(200, abs=60)  # ... on the target's -700 lung, not the source's -900


def test_poisson_blend_of_a_shifted_copy_is_the_target():
    rng = np.random.default_rng(0)
    target = rng.normal(-800, 30, (16, 16))
    out = poisson_blend(target, target + 250.0, _disk((16, 16), 5))
    assert np.allclose(out, target, atol=1e-6)  # same gradients, same border: nothing to change


def test_poisson_blend_refuses_bad_regions():
    region = np.zeros((8, 8), bool)
    region[0, 3] = True
    with pytest.raises(ValueError, match="must not touch the edge"):
        poisson_blend(np.zeros((8, 8)), np.zeros((8, 8)), region)
    with pytest.raises(ValueError, match="2D of one shape"):
        poisson_blend(np.zeros((8, 8)), np.zeros((8, 9)), np.zeros((8, 8), bool))


def test_shrink_to_area_keeps_the_deepest_pixels():
    mask = _disk(radius=5)
    smaller = shrink_to_area(mask, 20)
    assert smaller.sum() == 20 and smaller[10, 10] and not (smaller & ~mask).any()
    assert np.array_equal(shrink_to_area(mask, 10_000), mask)


def test_place_patch_changes_only_the_footprint():
    hu = np.full((40, 40), -800.0)
    patch = np.full((21, 21), -850.0)
    mask = _disk(radius=3)
    patch[mask] = 20.0
    out, region, footprint = place_patch(hu, patch, mask, centre=(15.5, 22.5))
    assert region.sum() == mask.sum() and footprint[region].all()
    assert np.array_equal(out[~footprint], hu[~footprint])
    rows, cols = np.nonzero(region)
    assert (rows.min() + rows.max() + 1) / 2 == 15.5 and (cols.min() + cols.max() + 1) / 2 == 22.5
    assert out[region].mean() > -100
    with pytest.raises(ValueError, match="does not fit"):
        place_patch(hu, patch, mask, centre=(2, 2))


# ---- building a bank ----------------------------------------------------------------------------------------

def test_a_bank_holds_the_requested_nodules(smoke_bank):
    bank = NoduleBank(smoke_bank)
    assert len(bank) == 10 and bank.settings["patch_px"] == 16
    assert sorted(bank.table.malignancy_asked.value_counts().to_dict().items()) == [(float(m), 2) for m in range(1, 6)]
    for index in range(len(bank)):
        entry = bank.entry(index)
        assert entry.patch_hu.shape == entry.mask.shape == (16, 16)
        assert entry.mask.any() and entry.mask.sum() == entry.row["area_px"]
        assert entry.features["malignancy"] == bank.table.malignancy_asked.iloc[index]
    assert bank.table.malignancy_asked.iloc[bank.choose({"malignancy": 4}, np.random.RandomState(0))] == 4
    with pytest.raises(IndexError, match="bank entry must be in 0..9, got 10"):
        bank.entry(10)


def test_an_interrupted_build_finishes_identically(tmp_path, smoke_bank, smoke_models):
    copy = tmp_path / "bank"
    shutil.copytree(smoke_bank, copy)
    (copy / "shards" / "shard_00001.csv").unlink()  # shard 1 written, its rows not: it counts as missing
    (copy / "shards" / "shard_00002.npz").unlink()
    (copy / "shards" / "shard_00002.csv").unlink()
    with pytest.raises(ValueError, match="incomplete: 4 of 10 entries"):
        NoduleBank(copy)
    request = SynthesisRequest(count=10, size=64, steps=2, model=str(smoke_models))
    rebuilt = build_bank(copy, request, batch_size=5, shard_size=4)
    original = NoduleBank(smoke_bank)
    pd.testing.assert_frame_equal(rebuilt.table, original.table)
    for index in range(10):
        assert np.array_equal(rebuilt.entry(index).patch_hu, original.entry(index).patch_hu)
    with pytest.raises(DatasetMismatchError, match=r"holds a different nodule bank \(differs in request.count\)"):
        build_bank(copy, SynthesisRequest(count=11, size=64, steps=2, model=str(smoke_models)), shard_size=4)


def test_a_bank_built_before_appearance_from_outline_existed_had_it_off(tmp_path, smoke_bank, smoke_models):
    copy = tmp_path / "bank"
    shutil.copytree(smoke_bank, copy)
    record = json.loads((copy / "bank.json").read_text())
    assert record["request"].pop("appearance_from_outline") is True  # the default
    (copy / "bank.json").write_text(json.dumps(record))
    request = SynthesisRequest(count=10, size=64, steps=2, model=str(smoke_models), appearance_from_outline=False)
    assert len(build_bank(copy, request, batch_size=5, shard_size=4)) == 10  # resumes (finished): it was off
    with pytest.raises(DatasetMismatchError, match=r"differs in request.appearance_from_outline"):
        build_bank(copy, SynthesisRequest(count=10, size=64, steps=2, model=str(smoke_models)), shard_size=4)


def test_a_finished_bank_is_returned_without_loading_the_model(tmp_path, smoke_bank, smoke_models, monkeypatch):
    from lsdm_aug.synthesis import bank as bank_module

    copy = tmp_path / "bank"
    shutil.copytree(smoke_bank, copy)
    monkeypatch.setattr(bank_module, "load_pipeline", lambda *args: pytest.fail("the model was loaded again"))
    again = build_bank(copy, SynthesisRequest(count=10, size=64, steps=2, model=str(smoke_models)), batch_size=5,
                       shard_size=4)
    assert len(again) == 10


def test_bank_cli_builds_and_names_bad_values(tmp_path, smoke_models):
    out = tmp_path / "bank"
    result = runner.invoke(app, ["bank", "build", "--out", str(out), "--count", "3", "--size", "64", "--steps", "2",
                                 "--malignancy", "5", "--model", str(smoke_models)])
    assert result.exit_code == 0, result.output
    assert "3 nodules, 16 px patches" in result.output
    assert (NoduleBank(out).table.malignancy_asked == 5).all()
    for args, message in ((["--count", "0"], "--count must be > 0, got 0"),
                          (["--texture", "9"], "--texture must be a level 1..5"),
                          (["--model", "missing"], "model 'missing' is neither 'default', a shipped model")):
        bad = tmp_path / "bad"
        result = runner.invoke(app, ["bank", "build", "--out", str(bad), "--size", "64", *args])
        assert result.exit_code == 2 and message in result.output and not bad.exists()
    with pytest.raises(FileNotFoundError, match="is not a nodule bank"):
        NoduleBank(tmp_path)


# ---- bank mode in the transforms ----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def lung_slice():
    ct = ChestPhantom(PhantomConfig(size=64, nodule_free_fraction=1.0)).slice(3, seed=0)
    return ct.hu, ct.spacing_mm


def test_bank_mode_changes_only_the_footprint_and_labels_the_nodule(lung_slice, smoke_bank):
    hu, spacing = lung_slice
    synth = NoduleSynthesizer(malignancy=(4, 5), bank=str(smoke_bank), label_value=3)
    label = np.zeros(hu.shape, np.uint8)
    params = synth.draw(hu, label, np.random.RandomState(2), (spacing, spacing))
    assert params.bank_entry >= 0 and not params.skipped
    out, new_label, info = synth.apply(hu, label, params, (spacing, spacing))
    changed = out != hu
    assert changed.any() and info["changed_pixels"] >= changed.sum()
    assert set(np.unique(new_label)) == {0, 3}
    entry = NoduleBank(smoke_bank).entry(params.bank_entry)
    assert entry.features["malignancy"] in (4.0, 5.0)
    assert (new_label > 0).sum() == pytest.approx(entry.mask.sum(), rel=0.5)  # the entry's mask, resampled
    assert not (changed & ~_near(new_label > 0, 3)).any()  # nothing changes beyond the footprint


def _near(mask: np.ndarray, pixels: int) -> np.ndarray:
    from scipy import ndimage

    return ndimage.binary_dilation(mask, iterations=pixels)


def test_bank_mode_in_3d_shrinks_the_nodule_towards_its_ends(lung_slice, smoke_bank):
    hu, spacing = lung_slice
    volume = MetaTensor(torch.from_numpy(np.stack([hu] * 9, axis=-1))[None].float(),
                        affine=torch.diag(torch.tensor([spacing, spacing, 1.0, 1.0])))
    label = MetaTensor(torch.zeros(1, 64, 64, 9), affine=volume.affine)
    out, out_label = NoduleSynth(malignancy=5, bank=str(smoke_bank)).set_random_state(1)(volume, label)
    record = synthesis_records(out)[-1]
    areas = out_label[0].numpy().sum(axis=(0, 1))
    slices = [k for k in record["slices"] if areas[k] > 0]
    assert len(slices) >= 2 and slices == list(range(slices[0], slices[-1] + 1))
    widest = out_label[0, ..., int(np.argmax(areas))].numpy() > 0
    for k in slices:  # every layer is a part of the widest one: one nodule, consistent from slice to slice
        layer = out_label[0, ..., k].numpy() > 0
        assert not (layer & ~widest).any()
    assert len(set(areas[slices].tolist())) > 1  # shrunk towards its ends with the real nodule's layer areas
    assert all(torch.equal(out[0, ..., k], volume[0, ..., k]) for k in range(9) if k not in record["slices"])


def test_bank_mode_replays_from_the_torchio_history(lung_slice, smoke_bank):
    hu, spacing = lung_slice
    affine = np.diag([spacing, spacing, 1.0, 1.0])
    subject = tio.Subject(image=tio.ScalarImage(tensor=torch.from_numpy(hu)[None, ..., None].float(), affine=affine),
                          label=tio.LabelMap(tensor=torch.zeros(1, 64, 64, 1), affine=affine))
    torch.manual_seed(4)
    transformed = RandomNoduleSynth(malignancy="balanced", bank=str(smoke_bank))(subject)
    fixed = transformed.get_composed_history().transforms[0]
    assert fixed.bank_entry >= 0 and fixed.bank == str(smoke_bank)
    replayed = transformed.get_composed_history()(subject)
    assert torch.equal(replayed.image.data, transformed.image.data)
    assert torch.equal(replayed.label.data, transformed.label.data) and (transformed.label.data > 0).any()


def test_a_bank_only_inserts_and_must_exist(tmp_path, smoke_bank):
    with pytest.raises(ValueError, match="mode must be 'insert' with a bank, got 'remove'"):
        NoduleSynthesizer(mode="remove", bank=str(smoke_bank))
    with pytest.raises(FileNotFoundError, match="is not a nodule bank"):
        NoduleSynthesizer(bank=str(tmp_path))
