"""The prepared dataset on disk: HU scaling, atomic case files, tables, patient-wise splits, resuming."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from lsdm_aug.data.prepared import (
    HU_RANGE,
    DatasetMismatchError,
    PreparedCase,
    PreparedDataset,
    PreparedDatasetWriter,
    hu_to_unit,
    unit_to_hu,
)

SETTINGS = {"source": "test", "size": 16, "seed": 0}


def _case(i: int, patient: int, n_nodules: int = 1) -> PreparedCase:
    rng = np.random.default_rng(i)
    nodule_mask = np.zeros((16, 16), np.uint8)
    nodules = []
    for k in range(1, n_nodules + 1):
        nodule_mask[2 * k:2 * k + 2, 3:6] = k
        nodules.append({"nodule_id": f"n{i}-{k}", "malignancy": 1.0 + k, "malignancy_class": 5, "area_px": 6})
    return PreparedCase(case_id=f"case_{i:03d}", patient_id=f"patient-{patient:02d}",
                        image=rng.uniform(-1, 1, (16, 16)).astype(np.float32),
                        semantic_map=rng.integers(0, 8, (16, 16)).astype(np.uint8), nodule_mask=nodule_mask,
                        lung_mask=rng.random((16, 16)) > 0.5, spacing_mm=0.7 + 0.01 * i, nodules=nodules,
                        source={"kind": "test", "index": i})


def _cases(count: int = 20) -> list[PreparedCase]:
    """``count`` cases from ``count // 2`` patients (2 slices each), 0..2 nodules."""
    return [_case(i, patient=i // 2, n_nodules=i % 3) for i in range(count)]


def _leftovers(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.name.endswith(".tmp")]


# ---- HU scaling ---------------------------------------------------------------------------------------------
def test_hu_to_unit_maps_the_range_to_minus_one_one():
    low, high = HU_RANGE
    assert (low, high) == (-1024.0, 800.0)
    unit = hu_to_unit(np.array([low, (low + high) / 2, high]))
    assert unit.dtype == np.float32
    np.testing.assert_allclose(unit, [-1, 0, 1], atol=1e-6)


def test_hu_round_trip_inside_the_range():
    hu = np.linspace(-1024, 800, 1001, dtype=np.float32).reshape(7, 143)
    np.testing.assert_allclose(unit_to_hu(hu_to_unit(hu)), hu, atol=0.01)
    assert unit_to_hu(hu_to_unit(hu)).dtype == np.float32


def test_hu_to_unit_clips():
    unit = hu_to_unit(np.array([-3000.0, -1025.0, 801.0, 3000.0]))
    np.testing.assert_array_equal(unit, [-1, -1, 1, 1])
    np.testing.assert_allclose(unit_to_hu(unit), [-1024, -1024, 800, 800], atol=1e-3)


# ---- cases ----------------------------------------------------------------------------------------------------
def test_case_rejects_mismatched_shapes_and_nodules():
    case = _case(0, 0)
    with pytest.raises(ValueError, match="case_000"):
        PreparedCase(case.case_id, case.patient_id, case.image, case.semantic_map[:8], case.nodule_mask,
                     case.lung_mask, 0.7)
    with pytest.raises(ValueError, match="nodule 1"):
        PreparedCase(case.case_id, case.patient_id, case.image, case.semantic_map, case.nodule_mask,
                     case.lung_mask, 0.7, nodules=[])


# ---- writer ---------------------------------------------------------------------------------------------------
def test_writer_writes_and_has(tmp_path):
    root = tmp_path / "dataset"
    writer = PreparedDatasetWriter(root, SETTINGS)
    case = _case(0, 0)
    assert not writer.has(case.case_id)
    writer.write(case)
    assert writer.has(case.case_id)
    assert (root / "cases" / "case_000.npz").is_file()
    manifest = json.loads((root / "dataset.json").read_text())
    assert manifest["size"] == 16 and manifest["source"] == "test"
    assert _leftovers(root) == []


def test_failed_write_leaves_no_partial_case(tmp_path, monkeypatch):
    root = tmp_path / "dataset"
    writer = PreparedDatasetWriter(root, SETTINGS)
    writer.write(_case(0, 0))

    def crash_half_way(handle, **arrays):
        handle.write(b"PK\x03\x04 half a zip file")
        raise OSError("disk full")

    monkeypatch.setattr(np, "savez_compressed", crash_half_way)
    with pytest.raises(OSError, match="disk full"):
        writer.write(_case(1, 0))
    assert not writer.has("case_001")
    assert sorted(p.name for p in (root / "cases").iterdir()) == ["case_000.npz"]
    assert _leftovers(root) == []
    monkeypatch.undo()
    writer.write(_case(1, 0))
    assert writer.has("case_001")


def test_writer_removes_stale_temporary_files(tmp_path):
    root = tmp_path / "dataset"
    PreparedDatasetWriter(root, SETTINGS).write(_case(0, 0))
    stale = root / "cases" / ".case_001.npz.abc123.tmp"
    stale.write_bytes(b"killed mid-write")
    PreparedDatasetWriter(root, SETTINGS)
    assert not stale.exists()
    assert (root / "cases" / "case_000.npz").is_file()


def test_finalize_writes_tables_and_patient_wise_splits(tmp_path):
    root = tmp_path / "dataset"
    writer = PreparedDatasetWriter(root, SETTINGS)
    cases = _cases(20)
    for case in cases:
        writer.write(case)
    dataset = writer.finalize({"train": 0.6, "validation": 0.2, "test": 0.2}, seed=3)
    assert isinstance(dataset, PreparedDataset)
    assert {p.name for p in root.iterdir()} == {"dataset.json", "cases", "cases.csv", "features.csv", "splits.json"}

    table = pd.read_csv(root / "cases.csv", dtype={"case_id": str, "patient_id": str})
    assert sorted(table.case_id) == [c.case_id for c in cases]
    assert {"case_id", "patient_id", "split", "spacing_mm", "n_nodules", "source_index"} <= set(table.columns)
    assert table.set_index("case_id").n_nodules.to_dict() == {c.case_id: len(c.nodules) for c in cases}

    splits = json.loads((root / "splits.json").read_text())
    assert set(splits) == {"train", "validation", "test"}
    all_ids = [i for ids in splits.values() for i in ids]
    assert sorted(all_ids) == sorted(table.case_id) and len(all_ids) == len(set(all_ids))
    patients_of = {name: set(table.set_index("case_id").loc[ids, "patient_id"]) for name, ids in splits.items()}
    assert not patients_of["train"] & patients_of["validation"]
    assert not patients_of["train"] & patients_of["test"]
    assert not patients_of["validation"] & patients_of["test"]
    assert [len(patients_of[name]) for name in ("train", "validation", "test")] == [6, 2, 2]
    assert table.groupby("patient_id").split.nunique().max() == 1
    for name, ids in splits.items():
        assert (table.set_index("case_id").loc[ids, "split"] == name).all()

    features = pd.read_csv(root / "features.csv", dtype={"case_id": str, "patient_id": str})
    assert len(features) == sum(len(c.nodules) for c in cases)
    assert {"case_id", "patient_id", "nodule_index", "nodule_id", "malignancy"} <= set(features.columns)
    first = features[features.case_id == "case_002"].sort_values("nodule_index")
    assert first.nodule_index.tolist() == [1, 2] and first.nodule_id.tolist() == ["n2-1", "n2-2"]


def test_split_depends_on_seed_but_is_reproducible(tmp_path):
    def splits_for(name, seed):
        writer = PreparedDatasetWriter(tmp_path / name, SETTINGS)
        for case in _cases(20):
            writer.write(case)
        writer.finalize(seed=seed)
        return json.loads((tmp_path / name / "splits.json").read_text())

    assert splits_for("a", 1) == splits_for("b", 1)
    assert splits_for("c", 1) != splits_for("d", 2)


def test_prepared_dataset_reads_back_what_was_written(tmp_path):
    root = tmp_path / "dataset"
    writer = PreparedDatasetWriter(root, SETTINGS)
    cases = _cases(10)
    for case in cases:
        writer.write(case)
    dataset = writer.finalize(seed=0)
    assert len(dataset) == 10 and dataset.settings["size"] == 16
    by_id = {c.case_id: c for c in cases}
    for position, item in enumerate(dataset):
        case = by_id[item["case_id"]]
        assert dataset.case_ids()[position] == case.case_id
        np.testing.assert_array_equal(item["image"], case.image)
        np.testing.assert_array_equal(item["semantic_map"], case.semantic_map)
        np.testing.assert_array_equal(item["nodule_mask"], case.nodule_mask)
        np.testing.assert_array_equal(item["lung_mask"], case.lung_mask)
        assert item["image"].dtype == np.float32 and item["semantic_map"].dtype == np.uint8
        assert item["nodule_mask"].dtype == np.uint8 and item["lung_mask"].dtype == np.bool_
        assert item["patient_id"] == case.patient_id
        assert item["spacing_mm"] == pytest.approx(case.spacing_mm)
        assert item["nodules"] == case.nodules
        assert item["source"] == case.source
    assert dataset["case_004"]["case_id"] == "case_004"
    with pytest.raises(KeyError, match="case_999"):
        dataset["case_999"]
    for name in ("train", "validation", "test"):
        part = PreparedDataset(root, split=name)
        assert sorted(part.case_ids()) == sorted(dataset.splits[name])
        assert set(part.features.case_id) <= set(part.case_ids())
    with pytest.raises(ValueError, match="holdout"):
        PreparedDataset(root, split="holdout")


def test_writer_refuses_a_folder_with_other_settings(tmp_path):
    root = tmp_path / "dataset"
    PreparedDatasetWriter(root, SETTINGS).write(_case(0, 0))
    with pytest.raises(DatasetMismatchError, match="size") as error:
        PreparedDatasetWriter(root, {**SETTINGS, "size": 32})
    assert "seed" not in str(error.value)
    with pytest.raises(DatasetMismatchError, match="balance"):
        PreparedDatasetWriter(root, {**SETTINGS, "balance": "malignancy"})
    # the same settings reopen it
    assert PreparedDatasetWriter(root, dict(SETTINGS)).has("case_000")


def test_writer_refuses_a_file_and_a_foreign_folder(tmp_path):
    a_file = tmp_path / "out.npz"
    a_file.write_bytes(b"x")
    with pytest.raises(NotADirectoryError, match="out.npz"):
        PreparedDatasetWriter(a_file, SETTINGS)
    foreign = tmp_path / "photos"
    foreign.mkdir()
    (foreign / "holiday.jpg").write_bytes(b"x")
    with pytest.raises(DatasetMismatchError, match="photos"):
        PreparedDatasetWriter(foreign, SETTINGS)
    assert sorted(p.name for p in foreign.iterdir()) == ["holiday.jpg"]


def test_prepared_dataset_refuses_an_unfinished_folder(tmp_path):
    root = tmp_path / "dataset"
    PreparedDatasetWriter(root, SETTINGS).write(_case(0, 0))
    with pytest.raises(DatasetMismatchError, match="dataset"):
        PreparedDataset(root)
