"""Edit windows in millimetres: where to regenerate, on which grid the model sees it, and how it goes back.

A model folder records the pixel spacing its U-Net trained at (``spacing_mm``) and the range of image
spacings it serves. An edit at image spacing ``s`` is planned as a square window around the region,
large enough for the model's training window and the region with its feather; the window is laid on
the model's grid (``scale = model spacing / s`` image pixels per model pixel), the image is resampled
onto it (linear, anti-aliased when shrinking), the semantic map by nearest neighbour and the region
by thresholded linear interpolation (so a coarse outline comes out smooth). The model regenerates
the window there; the decoded window is resampled back onto the image's own pixels (anti-aliased when they
are larger) and blended with a feathered mask computed at the image's resolution, so pixels outside the footprint
stay bit-identical. Within 2 % of the model's spacing nothing is resampled at all.

Example:
    >>> import numpy as np
    >>> region = np.zeros((128, 128), bool); region[60:64, 60:64] = True
    >>> window = plan_window(np.zeros((128, 128), np.float32), np.zeros((128, 128), np.uint8), region,
    ...                      spacing_mm=2.8, model_spacing_mm=0.7, window_model_px=64, factor=4, multiple=4)
    >>> window.grid.size_model_px, window.grid.scale  # 64 model pixels of 0.7 mm = 16 image pixels of 2.8 mm
    (64, 0.25)
    >>> 240 < int(window.model_region().sum()) <= 256  # the 4 x 4 image pixels become about 16 x 16 model pixels
    True
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

__all__ = ["ModelGrid", "EditWindow", "plan_window", "check_spacing", "SpacingError", "SAME_SPACING_TOLERANCE"]

SAME_SPACING_TOLERANCE = 0.02


class SpacingError(ValueError):
    """An image's pixel spacing is outside the range a model serves; the message names both."""


def check_spacing(spacing_mm: float, serves_mm: tuple[float, float], model: str) -> float:
    """The image spacing as a float, or :class:`SpacingError` naming it and the model's range.

    Example:
        >>> check_spacing(0.7, (0.4, 3.0), "phantom-512")
        0.7
    """
    try:
        spacing = float(spacing_mm)
    except (TypeError, ValueError):
        raise SpacingError(f"spacing_mm must be a pixel spacing in mm, got {spacing_mm!r}") from None
    low, high = serves_mm
    if not math.isfinite(spacing) or not low <= spacing <= high:
        raise SpacingError(f"pixel spacing {spacing_mm!r} mm is outside the range {low:g}..{high:g} mm that model "
                           f"{model} serves")
    return spacing


@dataclass(frozen=True)
class ModelGrid:
    """A square window of an image laid on the model's pixel grid.

    Attributes:
        top, left: the window's corner in image pixels (may be fractional).
        size_model_px: its side in model pixels.
        scale: image pixels per model pixel (model spacing / image spacing); 1 when the spacings agree.
    """

    top: float
    left: float
    size_model_px: int
    scale: float

    @property
    def identity(self) -> bool:
        return self.scale == 1.0

    @property
    def size_image_px(self) -> float:
        return self.size_model_px * self.scale

    def image_slices(self, shape: tuple[int, int]) -> tuple[slice, slice]:
        """The image pixels the window covers (whole pixels, clipped to the image)."""
        top, left = int(math.floor(self.top)), int(math.floor(self.left))
        bottom = int(math.ceil(self.top + self.size_image_px))
        right = int(math.ceil(self.left + self.size_image_px))
        return slice(max(top, 0), min(bottom, shape[0])), slice(max(left, 0), min(right, shape[1]))

    def _model_coordinates(self) -> np.ndarray:
        """Image-pixel coordinates (2, n, n) of the model pixels' centres."""
        steps = (np.arange(self.size_model_px) + 0.5) * self.scale - 0.5
        rows, cols = np.meshgrid(self.top + steps, self.left + steps, indexing="ij")
        return np.stack([rows, cols])

    def to_model(self, array: np.ndarray, order: int) -> np.ndarray:
        """``array`` (image pixels) sampled on the model grid: ``order`` 0 nearest, 1 linear (anti-aliased when
        the model's pixels are larger)."""
        if self.identity:
            rows, cols = self.image_slices(array.shape)
            return array[rows, cols]
        source = np.asarray(array, np.float32 if order else array.dtype)
        if order and self.scale > 1.0:
            source = ndimage.gaussian_filter(source, sigma=0.5 * math.sqrt(self.scale**2 - 1.0))
        return ndimage.map_coordinates(source, self._model_coordinates(), order=order, mode="nearest")

    def to_image(self, window: np.ndarray, shape: tuple[int, int]) -> tuple[tuple[slice, slice], np.ndarray]:
        """A model-grid ``window`` resampled (linear, anti-aliased when the image's pixels are larger) onto the
        image pixels it covers: (their slices, values). A coarse image pixel takes about the mean of the model pixels
        around it (Gaussian prefilter, as :meth:`to_model` has), as a CT detector integrates over its pixel, not the
        value at its centre (which keeps a nodule's bright core at full strength in a pixel it only partly fills)."""
        rows, cols = self.image_slices(shape)
        if self.identity:
            return (rows, cols), window
        window = np.asarray(window, np.float32)
        if self.scale < 1.0:
            window = ndimage.gaussian_filter(window, sigma=0.5 * math.sqrt(self.scale**-2 - 1.0))
        image_rows = (np.arange(rows.start, rows.stop) - self.top + 0.5) / self.scale - 0.5
        image_cols = (np.arange(cols.start, cols.stop) - self.left + 0.5) / self.scale - 0.5
        coordinates = np.stack(np.meshgrid(image_rows, image_cols, indexing="ij"))
        return (rows, cols), ndimage.map_coordinates(window, coordinates, order=1, mode="nearest")


@dataclass
class EditWindow:
    """One planned edit: the slice, its edited map, the region and footprint, and the window on the model grid."""

    image: np.ndarray
    semantic_map: np.ndarray
    region: np.ndarray
    footprint: np.ndarray
    alpha: np.ndarray
    grid: ModelGrid
    feather_model_px: float

    def model_image(self) -> np.ndarray:
        return self.grid.to_model(self.image, order=1).astype(np.float32)

    def model_semantic_map(self) -> np.ndarray:
        """The edited map on the model grid: nearest neighbour, with the region's label exactly on
        :meth:`model_region` (nearest sampling alone could drop a nodule of a pixel or two)."""
        semantic = self.grid.to_model(self.semantic_map, order=0)
        if not self.grid.identity:
            labels, counts = np.unique(self.semantic_map[self.region], return_counts=True)
            semantic = semantic.copy()
            semantic[self.model_region()] = labels[np.argmax(counts)]
        return semantic

    def model_region(self) -> np.ndarray:
        """The region on the model grid (thresholded linear resampling, never empty)."""
        if self.grid.identity:
            return self.grid.to_model(self.region, order=0)
        region = self.grid.to_model(self.region.astype(np.float32), order=1)
        inside = region >= 0.5
        if not inside.any():  # smaller than a model pixel: its most covered pixel
            inside = region == region.max()
        return inside

    def model_footprint(self) -> np.ndarray:
        """What the model regenerates: the region with its feather on the model grid, and every model pixel
        under the image footprint (so no footprint pixel is left to the known region)."""
        if self.grid.identity:
            return self.grid.to_model(self.footprint, order=0)
        region = self.model_region()
        dilated = ndimage.binary_dilation(region, iterations=max(1, int(round(self.feather_model_px)))) if region.any() \
            else region
        return dilated | (self.grid.to_model(self.footprint.astype(np.float32), order=1) > 0)

    def blend(self, window: np.ndarray) -> np.ndarray:
        """The slice with the decoded model-grid ``window`` blended in; bit-identical outside the footprint."""
        out = self.image.astype(np.result_type(self.image.dtype, np.float32), copy=True)
        (rows, cols), values = self.grid.to_image(window, self.image.shape)
        weight = self.alpha[rows, cols]
        blended = weight * values + (1 - weight) * out[rows, cols]
        out[rows, cols] = np.where(weight > 0, blended, out[rows, cols])
        return out


def plan_window(image: np.ndarray, semantic_map: np.ndarray, region: np.ndarray, spacing_mm: float,
                model_spacing_mm: float, window_model_px: int, factor: int, multiple: int,
                feather_px: float = 2.0) -> EditWindow:
    """Plan the edit of ``region`` (bool, image pixels) of a slice at ``spacing_mm``.

    Args:
        image, semantic_map: the slice and its (already edited) map, image pixels.
        region: what to regenerate.
        spacing_mm: the image's pixel spacing.
        model_spacing_mm: the spacing the model trained at.
        window_model_px: the smallest window side, in model pixels (the U-Net's training window); an image
            smaller than that (a training patch) gets the largest window that fits it, if the nodule does.
        factor: the autoencoder's downsampling; multiple: the U-Net's, in latent pixels (the side is a multiple
            of ``factor * multiple`` model pixels).
        feather_px: the blend's feather, in model pixels (the same width in millimetres at any image spacing).

    Raises:
        ValueError: the region with its margin does not fit the image.
    """
    if not region.any():
        raise ValueError("the region to edit is empty")
    scale = model_spacing_mm / spacing_mm
    if abs(scale - 1.0) <= SAME_SPACING_TOLERANCE:
        scale = 1.0
    rows, cols = np.nonzero(region)
    extent_model = (max(np.ptp(rows), np.ptp(cols)) + 1) / scale + 2 * (feather_px + 2 * factor)
    step = factor * multiple
    size = int(math.ceil(max(window_model_px, extent_model) / step)) * step
    height, width = region.shape
    fitting = int(math.floor(min(height, width) / scale / step + 1e-9)) * step
    if extent_model <= fitting < size:  # a patch smaller than the training window: the U-Net is convolutional
        size = fitting
    if size * scale > min(height, width) + 1e-6:
        raise ValueError(f"a nodule spanning {int(round(extent_model * scale))} px with its margin does not fit a "
                         f"{height} x {width} image (the edit window needs {size * scale:.0f} px)")
    centre_row, centre_col = rows.mean(), cols.mean()
    if scale == 1.0:  # on the latent grid of the whole slice, exactly as without resampling
        latent_h, latent_w = height // factor, width // factor
        top = min(max(int(round(centre_row / factor - size / (2 * factor))), 0), latent_h - size // factor) * factor
        left = min(max(int(round(centre_col / factor - size / (2 * factor))), 0), latent_w - size // factor) * factor
    else:
        top = float(np.clip(centre_row + 0.5 - size * scale / 2, 0, height - size * scale))
        left = float(np.clip(centre_col + 0.5 - size * scale / 2, 0, width - size * scale))
    feather_image = feather_px * scale  # model pixels -> image pixels
    footprint = ndimage.binary_dilation(region, iterations=max(1, int(round(feather_image))))
    alpha = np.clip(ndimage.gaussian_filter(footprint.astype(np.float32), max(feather_image, 0.5) / 2), 0, 1)
    alpha[~footprint] = 0.0  # outside the footprint nothing changes, bit for bit
    alpha[region] = 1.0
    return EditWindow(np.asarray(image), np.asarray(semantic_map), region, footprint, alpha,
                      ModelGrid(top, left, size, scale), feather_px)
