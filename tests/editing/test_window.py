"""The edit path in millimetres: resampled to the model's spacing and back, bit-identical outside the footprint."""

from __future__ import annotations

import numpy as np
import pytest

from lsdm_aug.data.lidc import NoduleMaskBank, resample_mask
from lsdm_aug.data.phantom import ChestPhantom, PhantomConfig
from lsdm_aug.data.prepared import hu_to_unit
from lsdm_aug.data.semantic import semantic_map_from_hu
from lsdm_aug.editing import ModelGrid, SpacingError, check_spacing, plan_window
from lsdm_aug.pipeline import LSDMPipeline
from lsdm_aug.transforms.core import usable_nodule_table

MODEL_SPACING = 0.7
SPACINGS = (0.5, 0.7, 2.7)


def _disk(shape: tuple[int, int], centre: tuple[float, float], radius_px: float) -> np.ndarray:
    rows, cols = np.indices(shape)
    return (rows - centre[0]) ** 2 + (cols - centre[1]) ** 2 <= radius_px**2


@pytest.mark.parametrize("spacing", [0.4, 0.5, 0.69, 0.9, 2.7, 3.0])
def test_a_region_keeps_its_physical_area_on_the_model_grid(spacing):
    radius_mm = 10.0  # at 3 mm a smaller disk is mostly pixel quantisation
    shape = (int(round(160 / spacing)),) * 2
    region = _disk(shape, (shape[0] / 2, shape[1] / 2), radius_mm / spacing)
    window = plan_window(np.zeros(shape, np.float32), np.zeros(shape, np.uint8), region, spacing, MODEL_SPACING,
                         window_model_px=64, factor=4, multiple=4)
    image_mm2 = region.sum() * spacing**2
    model_mm2 = window.model_region().sum() * MODEL_SPACING**2
    assert abs(model_mm2 / image_mm2 - 1) < 0.1
    assert abs(model_mm2 / (np.pi * radius_mm**2) - 1) < 0.1
    assert window.grid.size_model_px >= 64 and window.grid.size_model_px % 16 == 0
    assert window.model_footprint()[window.model_region()].all()


def test_the_same_spacing_is_the_plain_latent_window():
    region = _disk((128, 128), (40, 90), 4)
    window = plan_window(np.zeros((128, 128)), np.zeros((128, 128), np.uint8), region, 0.7, 0.707, 32, 4, 4)
    assert window.grid.identity and window.grid.top % 4 == 0 and window.grid.left % 4 == 0
    assert np.array_equal(window.model_region(), region[window.grid.image_slices(region.shape)])


def test_a_patch_smaller_than_the_training_window_gets_the_largest_window_that_fits():
    """nnU-Net patches can be narrower than the U-Net's training window; the U-Net is convolutional."""
    region = np.zeros((40, 80), bool)
    region[18:22, 38:42] = True
    window = plan_window(np.zeros((40, 80)), np.zeros((40, 80), np.uint8), region, 0.7, 0.7, 64, 4, 4)
    assert window.grid.size_model_px == 32  # the largest multiple of 16 within 40 px
    large = np.zeros((40, 80), bool)
    large[2:38, 20:56] = True
    with pytest.raises(ValueError, match="does not fit a 40 x 80 image"):
        plan_window(np.zeros((40, 80)), np.zeros((40, 80), np.uint8), large, 0.7, 0.7, 64, 4, 4)


def test_resampling_there_and_back_keeps_a_smooth_image():
    rows, cols = np.indices((200, 200))
    image = np.sin(rows / 15.0) * np.cos(cols / 11.0)
    grid = ModelGrid(top=20.3, left=35.7, size_model_px=64, scale=1.9)
    model = grid.to_model(image, order=1)
    (r, c), back = grid.to_image(model, image.shape)
    inner = (slice(4, -4), slice(4, -4))  # the window's rim samples beyond the model grid's last centres
    assert np.abs(back[inner] - image[r, c][inner]).max() < 0.05


@pytest.mark.parametrize("offset", [-1, 0, 1, 2])
def test_coarse_image_pixels_take_the_mean_of_the_model_pixels_they_cover(offset):
    """A bright dot of 2 x 2 model pixels fills a quarter of one 4 x 4 image pixel: the image keeps its mass
    (as a CT pixel integrates), wherever it sits, rather than its full value at one pixel centre."""
    window = np.zeros((64, 64), np.float32)
    window[30 + offset:32 + offset, 30 + offset:32 + offset] = 1.0
    grid = ModelGrid(top=0.0, left=0.0, size_model_px=64, scale=0.25)
    (rows, cols), values = grid.to_image(window, (16, 16))
    assert (rows, cols) == (slice(0, 16), slice(0, 16))
    assert values.sum() * 16 == pytest.approx(window.sum(), rel=0.1)
    assert values.max() < 0.3


def test_spacing_outside_the_served_range_is_named():
    assert check_spacing(3.0, (0.4, 3.0), "m") == 3.0
    for bad in (0.3, 3.5, float("nan"), "wide"):
        with pytest.raises(SpacingError, match="spacing") as error:
            check_spacing(bad, (0.4, 3.0), "phantom-512")
        assert str(bad) in str(error.value)


@pytest.fixture(scope="module")
def native_pipe(smoke_models) -> LSDMPipeline:
    """The smoke models as if trained at 0.7 mm (the geometry under test does not depend on what they learned)."""
    pipe = LSDMPipeline.from_pretrained(smoke_models, device="cpu")
    return LSDMPipeline(pipe.recipe, pipe.autoencoder, pipe.unet, pipe.classifiers, pipe.scale_factor, "cpu",
                        spacing_mm=MODEL_SPACING, window_px=pipe.window_px)


def _slice(spacing: float):
    size = 128 if spacing > 2 else 512
    ct = ChestPhantom(PhantomConfig(size=size, spacing="fov")).background(3, 0.5, seed=0, spacing_mm=spacing)
    return hu_to_unit(ct.hu), semantic_map_from_hu(ct.hu, spacing_mm=spacing), ct.lung_mask


def _lidc_outline(spacing: float, diameter_min_mm: float = 14.0) -> tuple[np.ndarray, float]:
    """The centre-slice outline of a real LIDC nodule at ``spacing`` and its area in mm^2 at native resolution."""
    table = usable_nodule_table()
    row = table[table.diameter_mm >= diameter_min_mm].iloc[0]
    bank = NoduleMaskBank.default()
    native = bank.centre_slice(row.nodule_id)
    native_spacing = float(bank.pixel_spacing_mm[bank.nodule_ids.index(row.nodule_id)])
    return resample_mask(native, native_spacing, spacing), float(native.sum() * native_spacing**2)


@pytest.mark.parametrize("spacing", SPACINGS)
def test_insertion_at_any_spacing_changes_only_its_footprint_and_keeps_the_nodule_size(native_pipe, spacing):
    image, semantic_map, lung = _slice(spacing)
    outline, area_mm2 = _lidc_outline(spacing)
    rows, cols = np.nonzero(lung)
    centre = (int(np.median(rows)), int(np.percentile(cols, 25)))
    result = native_pipe.insert(image, semantic_map, outline, centre, {"malignancy": 5}, spacing_mm=spacing,
                                steps=2, seed=0)
    outside = ~result.footprint
    assert np.array_equal(result.image[outside], image[outside])  # bit-identical
    assert not np.array_equal(result.image[result.footprint], image[result.footprint])
    assert abs(result.nodule_mask.sum() * spacing**2 / area_mm2 - 1) < 0.1
    extra_mm = (result.footprint.sum() - result.nodule_mask.sum()) * spacing**2 / area_mm2
    assert extra_mm < 1.5  # the feather is a rim, not a second nodule
    assert result.record["spacing_mm"] == spacing and result.record["model_spacing_mm"] == MODEL_SPACING


def test_generate_at_another_spacing_returns_the_maps_shape(native_pipe):
    _, semantic_map, _ = _slice(2.7)
    image = native_pipe.generate(semantic_map[None, :64, :64], spacing_mm=2.7, steps=2, seed=0)
    assert image.shape == (1, 64, 64) and np.isfinite(image).all()


def test_edits_refuse_a_spacing_the_model_does_not_serve(native_pipe):
    image, semantic_map, _ = _slice(2.7)
    outline, _ = _lidc_outline(2.7)
    with pytest.raises(SpacingError, match="3.5 mm is outside the range 0.4..3 mm"):
        native_pipe.insert(image, semantic_map, outline, (60, 40), spacing_mm=3.5, steps=2)
    with pytest.raises(SpacingError, match="0.2"):
        native_pipe.generate(semantic_map, spacing_mm=0.2, steps=2)
