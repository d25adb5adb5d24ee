"""nnU-Net's raw format: one file per channel, labels beside, dataset.json from nnU-Net's own writer."""

from __future__ import annotations

import json

import numpy as np
import pytest

from lsdm_aug.data.nnunet_format import case_paths, read_case, read_label, write_case, write_dataset_json


def test_a_slice_with_its_neighbours_round_trips_as_one_file_per_channel(tmp_path):
    rng = np.random.default_rng(0)
    slab = rng.integers(-1024, 800, (3, 16, 20)).astype(np.int16)
    label = (rng.random((16, 20)) > 0.8).astype(np.uint8)
    write_case(tmp_path, "case_0", slab, label, (0.7, 0.8))
    assert [case_paths(tmp_path, "case_0", c)[0].is_file() for c in range(4)] == [True, True, True, False]
    image, labels, spacing = read_case(tmp_path, "case_0")
    np.testing.assert_array_equal(image, slab)
    np.testing.assert_array_equal(labels, label)
    assert spacing == pytest.approx((0.7, 0.8))
    labels_only, spacing_only = read_label(tmp_path, "case_0")  # what scoring reads: no image channels
    np.testing.assert_array_equal(labels_only, label)
    assert spacing_only == spacing


def test_a_single_channel_slice_reads_back_without_a_channel_axis(tmp_path):
    write_case(tmp_path, "case_1", np.full((8, 8), -700.0), np.zeros((8, 8)), (0.7, 0.7))
    image, _, _ = read_case(tmp_path, "case_1")
    assert image.shape == (8, 8) and image.dtype == np.int16


def test_an_image_that_does_not_match_its_label_is_refused(tmp_path):
    with pytest.raises(ValueError, match=r"image \(2, 8, 9\) and label \(8, 8\)"):
        write_case(tmp_path, "bad", np.zeros((2, 8, 9)), np.zeros((8, 8)), (0.7, 0.7))


def test_the_dataset_json_names_every_channel_ct(tmp_path):
    write_dataset_json(tmp_path, 1, channels=3)
    assert json.loads((tmp_path / "dataset.json").read_text())["channel_names"] == {"0": "CT", "1": "CT", "2": "CT"}
    with pytest.raises(ValueError, match="channels must be >= 1, got 0"):
        write_dataset_json(tmp_path, 1, channels=0)
