"""TorchIO transforms: ``RandomNoduleSynth`` draws the parameters and calls the fixed ``NoduleSynthesis``.

As with ``RandomGamma`` -> ``Gamma``, the random transform only draws; the fixed one lists its
parameters in ``args_names``, so the subject's history records every draw and
``subject.get_composed_history()`` replays a run exactly.

TorchIO images are (C, W, H, D); the CT is channel 0, axial slices along D (D = 1 for 2D).

Example:
    >>> import torchio as tio
    >>> transform = tio.Compose([RandomNoduleSynth(malignancy=(4, 5), p=0.5)])  # doctest: +SKIP
    >>> transformed = transform(subject)  # doctest: +SKIP
    >>> transformed.get_composed_history()  # doctest: +SKIP
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torchio as tio
from torchio.transforms.augmentation import RandomTransform

from lsdm_aug.editing.saturation import DEFAULT_MAX_REDRAWS
from lsdm_aug.transforms.core import NoduleParameters, NoduleSynthesizer

__all__ = ["RandomNoduleSynth", "NoduleSynthesis"]

_SYNTHESIZER_ARGS = ("guidance_scale", "steps", "label_value", "intensity", "hu_mean", "hu_std", "device", "model",
                     "bank", "cfg_scale", "max_redraws")
_PARAMETER_ARGS = ("mode", "features", "nodule_id", "centre", "slices", "seed", "size_mm", "skipped", "bank_entry",
                   "outline_distance", "centre_slice", "outline_appearance")


def _arrays(subject: tio.Subject, image_name: str, label_name: str | None, transform: tio.Transform):
    """The CT image and label map to edit, or None when ``include`` / ``exclude`` leave the image out.

    A missing image or label map is an error naming it and the images present; so is a label map left out by
    ``include`` / ``exclude`` while its image is edited (the nodule would go unlabelled).
    """
    names = list(subject.get_images_dict(intensity_only=False))
    if image_name not in subject:
        raise KeyError(f"subject has no image {image_name!r} (images: {names})")
    if label_name is not None and label_name not in subject:
        raise KeyError(f"subject has no label map {label_name!r} (images: {names}); give the right label_name, or "
                       "label_name=None to insert without a label")
    selected = subject.get_images_dict(intensity_only=False, include=transform.include, exclude=transform.exclude)
    if image_name not in selected:
        return None
    if label_name is not None and label_name not in selected:
        raise ValueError(f"include / exclude edit image {image_name!r} but leave out its label map {label_name!r}: "
                         "the inserted nodule would go unlabelled")
    image = subject[image_name]
    array = image.data[0].numpy()
    label = subject[label_name] if label_name else None
    label_array = None if label is None else label.data[0].numpy()
    if array.shape[2] == 1:  # 2D
        array = array[:, :, 0]
        label_array = None if label_array is None else label_array[:, :, 0]
    return image, array, label, label_array


class NoduleSynthesis(tio.Transform):
    """Apply given nodule parameters (as drawn by :class:`RandomNoduleSynth`) to a subject.

    Args:
        image_name, label_name: the subject's CT image and its label map (None: no label; a name the subject
            lacks is an error). TorchIO's ``include`` / ``exclude`` choose whether the image is edited.
        mode, features, nodule_id, centre, slices, seed, size_mm, skipped, bank_entry, outline_distance,
            centre_slice, outline_appearance: the drawn :class:`~lsdm_aug.transforms.core.NoduleParameters`.
        guidance_scale, steps, label_value, intensity, hu_mean, hu_std, device, model, bank, cfg_scale,
            max_redraws: as :class:`~lsdm_aug.transforms.core.NoduleSynthesizer`.

    Example:
        >>> NoduleSynthesis(mode="insert", features={"malignancy": 5.0}, nodule_id="LIDC-IDRI-0078-s1-n00",
        ...                 centre=(40.0, 30.0), seed=3)  # doctest: +SKIP
    """

    def __init__(self, image_name: str = "image", label_name: str | None = "label", mode: str = "insert",
                 features: dict[str, float] | None = None, nodule_id: str = "", centre: tuple[float, float] = (0.0, 0.0),
                 slices: tuple[int, ...] = (), seed: int = 0, size_mm: float | None = None, skipped: str = "",
                 bank_entry: int = -1, guidance_scale: float = 1.0, steps: int = 25, label_value: int = 1,
                 intensity: str = "hu", hu_mean: float = 0.0, hu_std: float = 1.0, device: str | None = None,
                 model: str = "default", bank: str | None = None, outline_distance: float = 0.0,
                 centre_slice: int = 0, cfg_scale: float | None = None,
                 outline_appearance: dict[str, float] | None = None, max_redraws: int = DEFAULT_MAX_REDRAWS,
                 **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.image_name, self.label_name = image_name, label_name
        self.mode, self.features, self.nodule_id = mode, dict(features or {}), nodule_id
        self.outline_appearance = dict(outline_appearance or {})
        self.centre, self.slices, self.seed = tuple(centre), tuple(slices), int(seed)
        self.size_mm, self.skipped, self.bank_entry, self.bank = size_mm, skipped, int(bank_entry), bank
        self.guidance_scale, self.steps, self.label_value = guidance_scale, steps, label_value
        self.intensity, self.hu_mean, self.hu_std, self.device, self.model = intensity, hu_mean, hu_std, device, model
        self.outline_distance, self.centre_slice, self.cfg_scale = float(outline_distance), int(centre_slice), cfg_scale
        self.max_redraws = max_redraws
        self.synthesizer = NoduleSynthesizer(mode=mode, malignancy=None, **{k: getattr(self, k) for k in _SYNTHESIZER_ARGS})
        self.args_names = ["image_name", "label_name", *_PARAMETER_ARGS, *_SYNTHESIZER_ARGS]

    def apply_transform(self, subject: tio.Subject) -> tio.Subject:
        selected = _arrays(subject, self.image_name, self.label_name, self)
        if selected is None:
            return subject
        image, array, label, label_array = selected
        params = NoduleParameters(**{k: getattr(self, k) for k in _PARAMETER_ARGS})
        spacing = image.spacing if array.ndim == 3 else image.spacing[:2]
        out, new_label, _ = self.synthesizer.apply(array, label_array, params, spacing)
        image.set_data(torch.as_tensor(np.asarray(out).reshape(image.data.shape[1:])[None], dtype=image.data.dtype))
        if label is not None and new_label is not None:
            label.set_data(torch.as_tensor(np.asarray(new_label).reshape(label.data.shape[1:])[None], dtype=label.data.dtype))
        return subject


class RandomNoduleSynth(RandomTransform):
    """Randomly insert, replace or remove a lung nodule with controlled features.

    Args:
        image_name, label_name: the subject's CT image and its label map (None: no label; a name the subject
            lacks is an error). TorchIO's ``include`` / ``exclude`` choose whether the image is edited.
        mode, malignancy, lobulation, spiculation, texture, size_mm, location, guidance_scale, steps,
            label_value, intensity, hu_mean, hu_std, device, model, bank, cfg_scale, calcification,
            appearance_from_outline, max_redraws: as :class:`~lsdm_aug.transforms.core.NoduleSynthesizer`.
        **kwargs: TorchIO's ``Transform`` arguments (``p``, ``copy``, ...).

    Example:
        >>> transform = RandomNoduleSynth(malignancy="balanced", texture=5, p=0.3)  # doctest: +SKIP
    """

    def __init__(self, image_name: str = "image", label_name: str | None = "label", mode: str = "insert",
                 malignancy: Any = "balanced", lobulation: Any = None, spiculation: Any = None, texture: Any = None,
                 size_mm: float | None = None, location: tuple[int, ...] | None = None, guidance_scale: float = 1.0,
                 steps: int = 25, label_value: int = 1, intensity: str = "hu", hu_mean: float = 0.0,
                 hu_std: float = 1.0, device: str | None = None, model: str = "default", bank: str | None = None,
                 cfg_scale: float | None = None, calcification: Any = None, appearance_from_outline: bool = True,
                 max_redraws: int = DEFAULT_MAX_REDRAWS, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.image_name, self.label_name = image_name, label_name
        self.synthesizer = NoduleSynthesizer(mode, malignancy, lobulation, spiculation, texture, size_mm, location,
                                             guidance_scale, steps, label_value, intensity, hu_mean, hu_std, device, model,
                                             bank, cfg_scale=cfg_scale, calcification=calcification,
                                             appearance_from_outline=appearance_from_outline, max_redraws=max_redraws)

    def apply_transform(self, subject: tio.Subject) -> tio.Subject:
        selected = _arrays(subject, self.image_name, self.label_name, self)
        if selected is None:
            return subject
        image, array, _, label_array = selected
        rng = np.random.RandomState(int(torch.randint(2**31 - 1, (1,)).item()))  # TorchIO draws with torch's RNG
        spacing = image.spacing if array.ndim == 3 else image.spacing[:2]
        params = self.synthesizer.draw(array, label_array, rng, spacing)
        fixed = NoduleSynthesis(self.image_name, self.label_name, **params.to_dict(),
                                **{k: getattr(self.synthesizer, k) for k in _SYNTHESIZER_ARGS}, **self._get_base_args())
        return fixed(subject)
