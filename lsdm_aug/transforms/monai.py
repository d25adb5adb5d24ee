"""MONAI transforms: ``NoduleSynth`` (array) and ``NoduleSynthd`` (dictionary) insert, replace or remove nodules.

The array transform does the work; the dictionary transform holds one array transform, draws once
and applies it to the image key and the label key. Parameters drawn by each call are appended to
the image's ``MetaTensor.meta["nodule_synth"]`` (and the label's) as JSON text, which collates in
any batch; :func:`synthesis_records` reads them back. ``self.R`` is the transform's own RandomState; ``set_random_state(seed)`` returns ``self``.

Example:
    >>> from lsdm_aug import NoduleSynthd
    >>> synth = NoduleSynthd(keys="image", label_key="label", prob=0.5, malignancy=(4, 5))  # doctest: +SKIP
    >>> sample = synth({"image": image_hu, "label": label})  # doctest: +SKIP
"""

from __future__ import annotations

import json
from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import MapTransform, RandomizableTransform
from monai.utils import TransformBackends, convert_to_dst_type

from lsdm_aug.transforms.core import NoduleParameters, NoduleSynthesizer

__all__ = ["NoduleSynth", "NoduleSynthd", "NoduleSynthD", "NoduleSynthDict", "NoduleSynthBatchd", "NoduleSynthBatchD",
           "NoduleSynthBatchDict", "META_KEY", "synthesis_records"]

META_KEY = "nodule_synth"


def _numpy(x: Any) -> np.ndarray:
    return x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)


def _spacing(img: Any, default: Sequence[float] | None, spatial_dims: int) -> tuple[float, ...]:
    if default is not None:
        return tuple(float(s) for s in default)
    if isinstance(img, MetaTensor):
        return tuple(float(s) for s in img.pixdim[:spatial_dims])
    raise ValueError("pixel spacing unknown: give spacing_mm or a MetaTensor with an affine")


class NoduleSynth(RandomizableTransform):
    """Insert, replace or remove a lung nodule with controlled features in a CT slice or volume.

    Args:
        prob: probability of acting.
        spacing_mm: pixel spacing; read from a MetaTensor's affine when ``None``.
        All other arguments: see :class:`~lsdm_aug.transforms.core.NoduleSynthesizer` (``mode``,
        ``malignancy``, ``lobulation``, ``spiculation``, ``texture``, ``calcification``, ``size_mm``, ``location``,
        ``guidance_scale``, ``cfg_scale``, ``steps``, ``label_value``, ``intensity``, ``hu_mean``, ``hu_std``,
        ``device``, ``model``, ``bank``, ``appearance_from_outline``, ``max_redraws``).

    The image is channel-first, (1, H, W) or (1, H, W, D) with axial slices last. Called with a
    label, returns ``(image, label)``; else the image. Images without lung tissue come back unchanged,
    with the reason recorded.

    Example:
        >>> synth = NoduleSynth(malignancy=5, spiculation=(4, 5)).set_random_state(0)  # doctest: +SKIP
        >>> image, label = synth(image_hu, label)  # doctest: +SKIP
        >>> synthesis_records(image)[-1]["features"]  # doctest: +SKIP
    """

    backend = [TransformBackends.TORCH, TransformBackends.NUMPY]

    def __init__(self, prob: float = 1.0, spacing_mm: Sequence[float] | None = None, **synthesis: Any) -> None:
        RandomizableTransform.__init__(self, prob)
        self.synthesis = NoduleSynthesizer(**synthesis)
        self.spacing_mm = spacing_mm
        self.parameters: NoduleParameters | None = None

    def randomize(self, img: Any, label: Any = None) -> None:
        """Draw whether to act and, if so, the nodule's parameters."""
        super().randomize(None)
        self.parameters = None
        if not self._do_transform:
            return
        image = _numpy(img)[0]
        self.parameters = self.synthesis.draw(image, None if label is None else _numpy(label)[0], self.R,
                                              _spacing(img, self.spacing_mm, image.ndim))

    def __call__(self, img: Any, label: Any = None, randomize: bool = True) -> Any:
        if randomize:
            self.randomize(img, label)
        if self.parameters is None:
            return img if label is None else (img, label)
        image = _numpy(img)
        out, new_label, info = self.synthesis.apply(image[0], None if label is None else _numpy(label)[0],
                                                    self.parameters, _spacing(img, self.spacing_mm, image.ndim - 1))
        result = convert_to_dst_type(out[None], img)[0]
        _record(result, info)
        if label is None:
            return result
        label_out = convert_to_dst_type(new_label[None], label)[0]
        _record(label_out, info)
        return result, label_out


def _has_key(data: Mapping[Hashable, Any], key: Hashable, allow_missing: bool) -> bool:
    """Whether the image key is there; a missing one is an error unless ``allow_missing``."""
    if key in data:
        return True
    if allow_missing:
        return False
    raise KeyError(f"key {key!r} is not in the data (keys: {list(data)})")


def _label(data: Mapping[Hashable, Any], label_key: str | None, allow_missing: bool) -> Any:
    """The label under ``label_key`` (None when no label is wanted); a missing one is an error unless
    ``allow_missing``: a nodule inserted without its label would teach a detector that nodules are background."""
    if label_key is None:
        return None
    if label_key in data:
        return data[label_key]
    if allow_missing:
        return None
    raise KeyError(f"label key {label_key!r} is not in the data (keys: {list(data)}); give the right label_key, "
                   "label_key=None to insert without a label, or allow_missing_keys=True")


def _record(x: Any, info: dict) -> None:
    """Append the draw to the MetaTensor's metadata as JSON text (any batch of it collates)."""
    if isinstance(x, MetaTensor):
        x.meta[META_KEY] = [*x.meta.get(META_KEY, []), json.dumps(info)]


def synthesis_records(x: Any) -> list[dict]:
    """The draws recorded on a (non-collated) MetaTensor, oldest first.

    Example:
        >>> synthesis_records(image)[-1]["features"]  # doctest: +SKIP
        {'malignancy': 5.0}
    """
    return [json.loads(r) for r in x.meta.get(META_KEY, [])] if isinstance(x, MetaTensor) else []


class NoduleSynthd(RandomizableTransform, MapTransform):
    """Dictionary version of :class:`NoduleSynth`: one draw, applied to the image key and the label key.

    Args:
        keys: the image key (one key).
        label_key: the label key, updated with the inserted mask (None: no label). A label key that is not in
            the data is an error (as MONAI's label-aware transforms raise), unless ``allow_missing_keys``.
        prob: probability of acting.
        allow_missing_keys: skip when the image key is missing, and go on without a label when the label
            key is (MONAI's opt-out).
        **kwargs: as :class:`NoduleSynth`.

    Example:
        >>> NoduleSynthd(keys="image", label_key="label", malignancy="balanced")  # doctest: +SKIP
    """

    backend = NoduleSynth.backend

    def __init__(self, keys: KeysCollection, label_key: str | None = "label", prob: float = 1.0,
                 allow_missing_keys: bool = False, **kwargs: Any) -> None:
        MapTransform.__init__(self, keys, allow_missing_keys)
        RandomizableTransform.__init__(self, prob)
        if len(self.keys) != 1:
            raise ValueError(f"NoduleSynthd acts on one image key, got {self.keys}")
        self.label_key = label_key
        self.synth = NoduleSynth(prob=1.0, **kwargs)

    def set_random_state(self, seed: int | None = None, state: np.random.RandomState | None = None) -> NoduleSynthd:
        super().set_random_state(seed, state)
        self.synth.set_random_state(seed, state)
        return self

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        key = self.keys[0]
        if not _has_key(d, key, self.allow_missing_keys):
            return d
        self.randomize(None)
        if not self._do_transform:
            return d
        label = _label(d, self.label_key, self.allow_missing_keys)
        self.synth.randomize(d[key], label)
        if label is None:
            d[key] = self.synth(d[key], randomize=False)
        else:
            d[key], d[self.label_key] = self.synth(d[key], label, randomize=False)
        return d


NoduleSynthD = NoduleSynthDict = NoduleSynthd


class NoduleSynthBatchd(RandomizableTransform, MapTransform):
    """Batch version for a collated batch (like MONAI's ``MixUp`` / ``CutMix``): one diffusion run for the
    whole batch, on the batch's device, e.g. in the training loop after the DataLoader.

    Each sample is acted on with probability ``prob`` and gets its own draw; 2D insertions of the batch
    run as one reverse process (on a GPU that is far cheaper per sample than one run per sample).
    The draws are stored per sample as JSON text under ``"<key>_nodule_synth"`` (None where nothing
    was done). Only ``mode="insert"`` runs batched; other modes run per sample.

    Args:
        keys: the image key (one key); images (B, 1, H, W) or (B, 1, H, W, D).
        label_key: the label key, updated with the inserted masks (None: no label; missing from the data: an
            error unless ``allow_missing_keys``).
        prob: probability of acting, per sample.
        spacing_mm: pixel spacing; read from each sample's affine (collated MetaTensor) when ``None``.
        **synthesis: as :class:`~lsdm_aug.transforms.core.NoduleSynthesizer`.

    Example:
        >>> batch_synth = NoduleSynthBatchd(keys="image", label_key="label", prob=0.5, device="cuda")  # doctest: +SKIP
        >>> for batch in loader:  # doctest: +SKIP
        ...     batch = batch_synth(batch)
    """

    backend = NoduleSynth.backend

    def __init__(self, keys: KeysCollection, label_key: str | None = "label", prob: float = 1.0,
                 spacing_mm: Sequence[float] | None = None, allow_missing_keys: bool = False,
                 **synthesis: Any) -> None:
        MapTransform.__init__(self, keys, allow_missing_keys)
        RandomizableTransform.__init__(self, prob)
        if len(self.keys) != 1:
            raise ValueError(f"NoduleSynthBatchd acts on one image key, got {self.keys}")
        self.label_key, self.spacing_mm = label_key, spacing_mm
        self.synthesis = NoduleSynthesizer(**synthesis)

    def _spacings(self, images: Any, spatial_dims: int) -> list[tuple[float, ...]]:
        if self.spacing_mm is not None:
            return [tuple(float(s) for s in self.spacing_mm)] * len(images)
        if isinstance(images, MetaTensor) and images.affine.ndim == 3:
            return [tuple(float(s) for s in affine[:spatial_dims, :spatial_dims].norm(dim=0)) for affine in images.affine]
        raise ValueError("pixel spacing unknown: give spacing_mm or a collated MetaTensor with affines")

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        key = self.keys[0]
        if not _has_key(d, key, self.allow_missing_keys):
            return d
        images = _numpy(d[key])[:, 0]
        label = _label(d, self.label_key, self.allow_missing_keys)
        labels = None if label is None else _numpy(label)[:, 0]
        spacings = self._spacings(d[key], images.ndim - 1)
        chosen, params = [], []
        for i in range(len(images)):
            if self.R.rand() < self.prob:
                chosen.append(i)
                params.append(self.synthesis.draw(images[i], None if labels is None else labels[i], self.R, spacings[i]))
        results = self.synthesis.apply_batch([images[i] for i in chosen],
                                             [None if labels is None else labels[i] for i in chosen], params,
                                             [spacings[i] for i in chosen]) if chosen else []
        records: list[str | None] = [None] * len(images)
        out_images, out_labels = images.copy(), None if labels is None else labels.copy()
        for i, (image, label, info) in zip(chosen, results):
            out_images[i] = image
            if out_labels is not None:
                out_labels[i] = label
            records[i] = json.dumps(info)
        d[key] = convert_to_dst_type(out_images[:, None], d[key])[0]
        if out_labels is not None:
            d[self.label_key] = convert_to_dst_type(out_labels[:, None], d[self.label_key])[0]
        d[f"{key}_{META_KEY}"] = records
        return d


NoduleSynthBatchD = NoduleSynthBatchDict = NoduleSynthBatchd
