"""pylidc on a current stack: the database, the DICOM-root context and the NumPy-2 fix."""

from __future__ import annotations

import os
import sys

import numpy as np
import pytest

from lsdm_aug.data.pylidc_compat import import_pylidc, use_dicom_root


@pytest.fixture(scope="module")
def pylidc():
    return import_pylidc()


def _config_path_function():
    return sys.modules["pylidc.Scan"]._get_dicom_file_path_from_config_file


def test_import_pylidc_reads_the_whole_database(pylidc):
    assert pylidc.query(pylidc.Scan).count() == 1018
    assert pylidc.query(pylidc.Annotation).count() > 6000
    assert "pylidc.Scan" in sys.modules and "pylidc.utils" in sys.modules


def test_use_dicom_root_points_pylidc_at_the_folder_and_restores(tmp_path, pylidc):
    original = _config_path_function()
    with use_dicom_root(tmp_path) as root:
        assert root == tmp_path.resolve()
        assert _config_path_function()() == str(tmp_path.resolve())
    assert _config_path_function() is original


def test_use_dicom_root_restores_after_an_error(tmp_path, pylidc):
    original = _config_path_function()
    with pytest.raises(RuntimeError, match="inside"):
        with use_dicom_root(tmp_path):
            raise RuntimeError("inside the context")
    assert _config_path_function() is original


def test_use_dicom_root_finds_a_scan_without_writing_home_config(tmp_path, monkeypatch, pylidc):
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    assert os.path.expanduser("~") == str(home)
    scan = pylidc.query(pylidc.Scan).filter(pylidc.Scan.id == 1).one()
    dicom_root = tmp_path / "LIDC-IDRI"
    series = dicom_root / scan.patient_id / scan.study_instance_uid / scan.series_instance_uid
    series.mkdir(parents=True)
    with use_dicom_root(dicom_root):
        assert scan.get_path_to_dicom_files() == str(series.resolve())
    assert not (home / ".pylidcrc").exists()
    assert list(home.iterdir()) == []


def test_use_dicom_root_missing_folder_names_the_path(tmp_path):
    missing = tmp_path / "no-such-lidc"
    original = _config_path_function() if "pylidc.Scan" in sys.modules else None
    with pytest.raises(FileNotFoundError, match="no-such-lidc"):
        with use_dicom_root(missing):
            pass
    if original is not None:
        assert _config_path_function() is original


def test_use_dicom_root_rejects_a_file(tmp_path):
    a_file = tmp_path / "dicom.txt"
    a_file.write_text("not a folder")
    with pytest.raises(FileNotFoundError, match="dicom.txt"):
        with use_dicom_root(a_file):
            pass


def test_contour_to_matrix_runs_under_numpy_2(pylidc):
    assert int(np.__version__.split(".")[0]) >= 2
    annotation = pylidc.query(pylidc.Annotation).first()
    contour = annotation.contours[0]
    ijk = contour.to_matrix()
    assert ijk.ndim == 2 and ijk.shape[1] == 3 and len(ijk) >= 3
    assert np.issubdtype(ijk.dtype, np.integer)
    np.testing.assert_array_equal(ijk[:, :2], contour.to_matrix(include_k=False))
    assert np.all(ijk[:, 2] == contour.image_k_position)


def test_annotation_boolean_mask_is_a_bool_volume(pylidc):
    annotation = pylidc.query(pylidc.Annotation).first()
    mask = annotation.boolean_mask()
    assert isinstance(mask, np.ndarray)
    assert mask.dtype == np.bool_
    assert mask.ndim == 3 and mask.any()
