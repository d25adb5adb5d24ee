"""NoduleSynth for nnU-Net v2: a batchgeneratorsv2 transform working on nnU-Net's normalized patches.

nnU-Net runs its augmentation per sample in CPU worker processes on tensors shaped (C, X, Y[, Z]) that
are already normalized (CT: clipped to the foreground 0.5/99.5 percentiles, then z-scored with the
plans' ``foreground_intensity_properties_per_channel``). The transform maps channel 0 back to HU with
that mean and standard deviation, inserts a nodule, and maps the changed pixels back; the segmentation
gets the nodule label. ``get_parameters`` draws (the random part), ``apply`` only applies.

Axes: nnU-Net hands 2D patches as (C, y, x) and 3D patches as (C, z, y, x), with the configuration's
spacing in the same order; the synthesizer works on (H, W) or (H, W, D) with axial slices last, so a 3D
patch is viewed as (y, x, z) and its spacing reordered to match. nnU-Net transposes a dataset so that its
coarsest axis comes first (``transpose_forward`` in the plans): when that is not z, ``axial_axis`` says
where z went (the trainer sets it from the plans).

2.5D (``slice_thickness_mm`` given): the channels of a 2D patch are neighbouring axial slices that far apart, the
middle one labelled (as ``lsdm-aug benchmark detection`` writes slabs with ``neighbour_slices``); the patch is
viewed as a (y, x, channels) volume, the nodule inserted over its slices centred on the middle one, and the
segmentation gets the middle slice's layer. nnU-Net normalises every channel with its own foreground
statistics (``channel_stats``, from the plans); the transform works in channel 0's units and writes each
channel's changed pixels back in its own.

Example:
    >>> transform = NoduleSynthTransform(spacing_mm=(0.7, 0.7), hu_mean=-300.0, hu_std=400.0, prob=0.3)  # doctest: +SKIP
    >>> sample = transform(image=image, segmentation=segmentation)  # doctest: +SKIP
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from batchgeneratorsv2.transforms.base.basic_transform import BasicTransform

from lsdm_aug.transforms.core import NoduleParameters, NoduleSynthesizer

__all__ = ["NoduleSynthTransform"]


class NoduleSynthTransform(BasicTransform):
    """Insert (or replace / remove) a nodule in an nnU-Net training sample.

    Args:
        spacing_mm: the configuration's spacing (nnU-Net axis order).
        hu_mean, hu_std: the CT channel's foreground mean and std from the plans.
        prob: probability per sample.
        label_value: segmentation value of the inserted nodule.
        axial_axis: the patch axis (after the channel) along which axial slices follow, for 3D patches.
        slice_thickness_mm: 2D patches whose channels are neighbouring slices this far apart (2.5D); None: one
            CT channel.
        channel_stats: 2.5D: (mean, std) of each channel's normalisation (None: every channel as
            ``hu_mean``, ``hu_std``).
        **synthesis: :class:`~lsdm_aug.transforms.core.NoduleSynthesizer` arguments (mode, features,
            guidance_scale, cfg_scale, steps, model, device ...).

    ``last_record`` holds what the last applied draw did (the synthesizer's record: features, slices,
    ``changed_pixels``, ``skipped``).
    """

    def __init__(self, spacing_mm: Sequence[float], hu_mean: float, hu_std: float, prob: float = 0.3,
                 label_value: int = 1, axial_axis: int = 0, slice_thickness_mm: float | None = None,
                 channel_stats: Sequence[Sequence[float]] | None = None, **synthesis: Any) -> None:
        super().__init__()
        if not 0.0 <= prob <= 1.0:
            raise ValueError(f"prob must be in [0, 1], got {prob!r}")
        if slice_thickness_mm is not None and not (len(spacing_mm) == 2 and slice_thickness_mm > 0):
            raise ValueError(f"slice_thickness_mm (2.5D) needs a 2D patch spacing and a thickness > 0, got spacing "
                             f"{tuple(spacing_mm)} and thickness {slice_thickness_mm!r}")
        self.slice_thickness_mm = None if slice_thickness_mm is None else float(slice_thickness_mm)
        if channel_stats is not None and any(len(pair) != 2 or not pair[1] > 0 for pair in channel_stats):
            raise ValueError(f"channel_stats must be (mean, std > 0) per channel, got {channel_stats!r}")
        self.channel_stats = None if channel_stats is None else [(float(m), float(s)) for m, s in channel_stats]
        self.hu_mean, self.hu_std = float(hu_mean), float(hu_std)
        if axial_axis not in (0, 1, 2):
            raise ValueError(f"axial_axis must be 0, 1 or 2 (a 3D patch's axes after the channel), got {axial_axis!r}")
        self.spacing_mm, self.prob = tuple(float(s) for s in spacing_mm), float(prob)
        self.axial_axis = int(axial_axis)
        self._in_plane_first = self._synthesizer_order(self.spacing_mm)
        self.synthesizer = NoduleSynthesizer(intensity="normalized", hu_mean=hu_mean, hu_std=hu_std,
                                             label_value=label_value, **synthesis)
        self.last_record: dict[str, Any] = {}

    def _axial_last(self, array: np.ndarray) -> np.ndarray:
        """nnU-Net's (z, y, x) as the synthesizer's (y, x, z); 2D (y, x) as it is."""
        return np.moveaxis(array, self.axial_axis, -1) if array.ndim == 3 else array

    def _nnunet_order(self, array: np.ndarray) -> np.ndarray:
        return np.moveaxis(array, -1, self.axial_axis) if array.ndim == 3 else array

    def _synthesizer_order(self, spacing: tuple[float, ...]) -> tuple[float, ...]:
        """``spacing`` in the synthesizer's order (in-plane first, z last), in-plane pixels checked to be square
        (a spacing of another length is refused by :meth:`_spacing` against the patch)."""
        if len(spacing) == 3:
            spacing = tuple(s for i, s in enumerate(spacing) if i != self.axial_axis) + (spacing[self.axial_axis],)
        if len(spacing) in (2, 3) and abs(spacing[0] - spacing[1]) > 0.02 * max(spacing[:2]):
            raise ValueError(f"in-plane pixels must be square, got spacing {spacing[:2]} mm (patch spacing "
                             f"{self.spacing_mm}, axial axis {self.axial_axis}): is axial_axis right?")
        return spacing

    def _spacing(self, ndim: int) -> tuple[float, ...]:
        if len(self.spacing_mm) != ndim:
            raise ValueError(f"spacing_mm {self.spacing_mm} has {len(self.spacing_mm)} axes, the patch has {ndim}")
        return self._in_plane_first

    def _channel_scales(self, channels: int) -> tuple[np.ndarray, np.ndarray]:
        """Per channel (scale, offset) taking its normalised values to channel 0's units."""
        stats = self.channel_stats or [(self.hu_mean, self.hu_std)] * channels
        if len(stats) != channels:
            raise ValueError(f"channel_stats has {len(stats)} channels, the patch has {channels}")
        mean, std = np.array(stats, np.float64).T
        return std / self.hu_std, (mean - self.hu_mean) / self.hu_std

    def _slab(self, data_dict: dict) -> tuple[np.ndarray, np.ndarray | None]:
        """2.5D: the patch's channels as a (y, x, channels) volume in channel 0's units, and the label on its
        middle slice."""
        image = data_dict["image"].numpy()
        scale, offset = self._channel_scales(len(image))
        volume = np.moveaxis(image * scale[:, None, None] + offset[:, None, None], 0, -1).astype(np.float32)
        segmentation = data_dict.get("segmentation")
        if segmentation is None:
            return volume, None
        label = np.zeros(volume.shape, segmentation.numpy().dtype)
        label[..., volume.shape[-1] // 2] = segmentation[0].numpy()
        return volume, label

    def _slab_spacing(self) -> tuple[float, float, float]:
        return (*self._spacing(2), self.slice_thickness_mm)

    def get_parameters(self, **data_dict: Any) -> dict[str, Any]:
        rng = np.random.RandomState(np.random.randint(2**31 - 1))  # nnU-Net seeds NumPy per worker
        if rng.uniform() >= self.prob:
            return {"nodule": None}
        if self.slice_thickness_mm is not None:
            volume, label = self._slab(data_dict)
            return {"nodule": self.synthesizer.draw(volume, label, rng, self._slab_spacing(),
                                                    centre_slice=volume.shape[-1] // 2)}
        image = data_dict["image"][0].numpy()
        segmentation = data_dict["segmentation"][0].numpy() if data_dict.get("segmentation") is not None else None
        return {"nodule": self.synthesizer.draw(self._axial_last(image),
                                                None if segmentation is None else self._axial_last(segmentation),
                                                rng, self._spacing(image.ndim))}

    def apply(self, data_dict: dict, nodule: NoduleParameters | None = None, **params: Any) -> dict:
        if nodule is None or nodule.skipped:
            return data_dict
        if self.slice_thickness_mm is not None:
            return self._apply_slab(data_dict, nodule)
        image = data_dict["image"]
        segmentation = data_dict.get("segmentation")
        ndim = image[0].ndim
        out, new_segmentation, info = self.synthesizer.apply(
            self._axial_last(image[0].numpy()),
            None if segmentation is None else self._axial_last(segmentation[0].numpy()), nodule, self._spacing(ndim))
        self.last_record = info
        image[0] = torch.from_numpy(np.ascontiguousarray(self._nnunet_order(np.asarray(out, np.float32)))).to(image.dtype)
        if segmentation is not None:
            segmentation[0] = torch.from_numpy(np.ascontiguousarray(self._nnunet_order(np.asarray(new_segmentation)))
                                               ).to(segmentation.dtype)
        return data_dict

    def _apply_slab(self, data_dict: dict, nodule: NoduleParameters) -> dict:
        volume, label = self._slab(data_dict)
        out, new_label, self.last_record = self.synthesizer.apply(volume, label, nodule, self._slab_spacing())
        image = data_dict["image"]
        changed = np.moveaxis(np.asarray(out) != volume, -1, 0)
        scale, offset = self._channel_scales(len(image))
        own = (np.moveaxis(np.asarray(out, np.float64), -1, 0) - offset[:, None, None]) / scale[:, None, None]
        merged = np.where(changed, own, image.numpy())  # pixels outside the footprint stay exactly as they were
        image[:] = torch.from_numpy(np.ascontiguousarray(merged)).to(image.dtype)
        if new_label is not None:
            segmentation = data_dict["segmentation"]
            segmentation[0] = torch.from_numpy(np.ascontiguousarray(new_label[..., volume.shape[-1] // 2])
                                               ).to(segmentation.dtype)
        return data_dict
