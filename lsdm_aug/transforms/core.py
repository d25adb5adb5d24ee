"""The framework-free core of every NoduleSynth transform: draw parameters, then apply them.

MONAI, TorchIO and nnU-Net wrappers hold one :class:`NoduleSynthesizer` and only adapt tensors and
metadata. ``draw`` is the random part (features, source outline, site, seed) and returns
:class:`NoduleParameters`; ``apply`` is deterministic given them, so a recorded draw replays
exactly. Images are NumPy arrays, 2D (H, W) or 3D (H, W, D) with axial slices along the last axis.

Only pixels inside the insertion footprint change (bit-identical elsewhere, in the input's own
intensity units); the label gets exactly the inserted nodule mask with ``label_value``.

Example:
    >>> synthesis = NoduleSynthesizer(malignancy=5, model="models/phantom-128")  # doctest: +SKIP
    >>> params = synthesis.draw(image_hu, label, np.random.RandomState(0), spacing_mm=(2.8, 2.8))  # doctest: +SKIP
    >>> image_hu, label, info = synthesis.apply(image_hu, label, params, spacing_mm=(2.8, 2.8))  # doctest: +SKIP
"""

from __future__ import annotations

import functools
import hashlib
import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
from scipy import ndimage

from lsdm_aug.bank.placement import bank_outline, place_patch, shrink_to_area
from lsdm_aug.config import CONDITIONING_FEATURES, RATING_LEVELS, rating_level
from lsdm_aug.data.lidc import NoduleMaskBank, load_nodule_table, resample_mask
from lsdm_aug.data.phantom import free_site
from lsdm_aug.data.prepared import hu_to_unit, unit_to_hu
from lsdm_aug.data.semantic import SemanticLabel, lung_mask_from_hu, semantic_map_from_hu
from lsdm_aug.editing.saturation import DEFAULT_MAX_REDRAWS, checked_max_redraws

__all__ = ["NoduleSynthesizer", "NoduleParameters", "parse_feature", "MODES", "load_pipeline", "usable_nodule_table",
           "usable_nodule", "choose_outline", "nodule_outline", "SHAPE_FEATURES", "slice_lung"]

SHAPE_FEATURES = ("malignancy", "lobulation", "spiculation")  # what a nodule's outline carries
APPEARANCE_FEATURES = ("texture", "calcification")  # what the U-Net renders inside the outline

MODES = ("insert", "replace", "remove")
SAMPLINGS = ("balanced", "dataset")
INTENSITIES = ("hu", "normalized")


def parse_feature(name: str, value: Any) -> int | tuple[int, int] | str | None:
    """Check one feature argument: an int on the feature's rating scale (1..5; calcification 1..6), a (low, high)
    range within it, "balanced", "dataset" or None."""
    top = RATING_LEVELS[name]
    if value is None or value in SAMPLINGS:
        return value
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool) and 1 <= value <= top:
        return int(value)
    if isinstance(value, (tuple, list)) and len(value) == 2 and all(
            isinstance(v, (int, np.integer)) and 1 <= v <= top for v in value) and value[0] <= value[1]:
        return int(value[0]), int(value[1])
    raise ValueError(f"{name} must be an int 1..{top}, a (low, high) range within 1..{top}, 'balanced' or "
                     f"'dataset'; got {value!r}")


@functools.cache
def load_pipeline(model: str, device: str | None, max_redraws: int = DEFAULT_MAX_REDRAWS):
    """One pipeline per (model, device, redraws) and process (DataLoader workers each load their own)."""
    from lsdm_aug.pipeline import LSDMPipeline

    return LSDMPipeline.from_pretrained(model, device=device, max_redraws=max_redraws)


@dataclass(frozen=True)
class NoduleParameters:
    """What one call drew; enough to replay it exactly.

    Attributes:
        mode: insert, replace or remove.
        features: requested feature values (1..5) by name.
        nodule_id: LIDC nodule whose consensus outline is used (insert).
        centre: (row, col) of the site in the slice (insert), or of the nodule acted on.
        slices: axial slice indices edited (3D), empty for 2D.
        centre_slice: the axial slice the nodule's centre layer goes on (3D); the outline's layer ``j`` goes on
            slice ``centre_slice - depth // 2 + j``, also when the volume cuts the nodule off.
        seed: seeds the diffusion.
        size_mm: requested diameter, if any.
        skipped: why nothing was done (no lung, no nodule to replace), else empty.
        bank_entry: the banked nodule placed (bank mode), else -1.
        outline_distance: how far the source nodule's ratings are from the requested shape features (0: an
            exact match; see :func:`choose_outline`).
        outline_appearance: the source nodule's own texture / calcification levels, told to a feature-conditioned
            U-Net for those the request leaves out (``appearance_from_outline``), else empty.
    """

    mode: str
    features: dict[str, float] = field(default_factory=dict)
    nodule_id: str = ""
    centre: tuple[float, float] = (0.0, 0.0)
    slices: tuple[int, ...] = ()
    seed: int = 0
    size_mm: float | None = None
    skipped: str = ""
    bank_entry: int = -1
    outline_distance: float = 0.0
    centre_slice: int = 0
    outline_appearance: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class NoduleSynthesizer:
    """Insert, replace or remove lung nodules with controlled features (the shared core).

    Args:
        mode: "insert", "replace" or "remove".
        malignancy, lobulation, spiculation, texture: each an int 1..5, a (low, high) range,
            "balanced" (uniform over 1..5) or "dataset" (as in LIDC); None leaves it unrequested.
        calcification: the same on LIDC's scale 1..6 (1 popcorn, 2 laminated, 3 solid, 4 non-central, 5 central,
            6 absent); steered by classifier-free guidance where the model is conditioned on it.
        size_mm: diameter of inserted nodules (a LIDC outline rescaled), or None for the outline's own size.
        location: None for a random site inside the lung, or (row, col[, slice]) in pixels.
        guidance_scale: classifier guidance scale s.
        cfg_scale: classifier-free guidance scale w (feature-conditioned models; None: the model's default).
        steps: DDIM steps.
        label_value: value written into the label on the inserted nodule.
        intensity: "hu" if the image holds Hounsfield units, "normalized" if it holds (HU - hu_mean) / hu_std.
        hu_mean, hu_std: the normalisation, for intensity="normalized".
        device: torch device of the diffusion (default: CUDA when present).
        model: "default" or a model folder.
        bank: a nodule bank folder (``lsdm-aug bank build``): insert pre-generated nodules with Poisson
            blending instead of running the diffusion (cheap, CPU only); None runs the diffusion live.
        appearance_from_outline: tell a feature-conditioned U-Net the texture and calcification of the real LIDC
            nodule whose outline is inserted, for those the request leaves out (classifier-free guidance only,
            no classifier steers them; the default, True: an outline and its appearance come from one real nodule);
            False leaves them out, and the U-Net draws its average nodule (the detection benchmark's LSDM cases:
            median -220 HU off, -165 on, real nodules -93).
        max_redraws: how often a nodule told "not calcified" that comes out saturated is drawn again
            (:class:`~lsdm_aug.pipeline.LSDMPipeline`'s ``max_redraws``; 0 keeps first draws; live diffusion only).
    """

    def __init__(self, mode: str = "insert", malignancy: Any = "balanced", lobulation: Any = None,
                 spiculation: Any = None, texture: Any = None, size_mm: float | None = None,
                 location: Sequence[int] | None = None, guidance_scale: float = 1.0, steps: int = 25,
                 label_value: int = 1, intensity: str = "hu", hu_mean: float = 0.0, hu_std: float = 1.0,
                 device: str | None = None, model: str = "default", bank: str | None = None,
                 cfg_scale: float | None = None, calcification: Any = None,
                 appearance_from_outline: bool = True, max_redraws: int = DEFAULT_MAX_REDRAWS) -> None:
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if intensity not in INTENSITIES:
            raise ValueError(f"intensity must be one of {INTENSITIES}, got {intensity!r}")
        if size_mm is not None and not 2.0 <= float(size_mm) <= 60.0:
            raise ValueError(f"size_mm must be in 2..60 mm, got {size_mm!r}")
        if location is not None and len(location) not in (2, 3):
            raise ValueError(f"location must be (row, col) or (row, col, slice), got {location!r}")
        if guidance_scale < 0:
            raise ValueError(f"guidance_scale must be >= 0, got {guidance_scale!r}")
        if cfg_scale is not None and cfg_scale < 0:
            raise ValueError(f"cfg_scale must be >= 0 or None (the model's default), got {cfg_scale!r}")
        if not 1 <= int(steps) <= 1000:
            raise ValueError(f"steps must be in 1..1000, got {steps!r}")
        if hu_std <= 0:
            raise ValueError(f"hu_std must be > 0, got {hu_std!r}")
        self.mode, self.size_mm, self.location = mode, size_mm, None if location is None else tuple(location)
        self.features = {name: parse_feature(name, value) for name, value in
                         zip(CONDITIONING_FEATURES, (malignancy, lobulation, spiculation, texture, calcification))}
        self.guidance_scale, self.steps, self.label_value = float(guidance_scale), int(steps), int(label_value)
        self.cfg_scale = None if cfg_scale is None else float(cfg_scale)
        self.appearance_from_outline = bool(appearance_from_outline)
        self.max_redraws = checked_max_redraws(max_redraws)
        self.intensity, self.hu_mean, self.hu_std = intensity, float(hu_mean), float(hu_std)
        self.device, self.model = device, str(model)
        self.bank = None if bank is None else str(bank)
        if self.bank is not None:
            if mode != "insert":
                raise ValueError(f"a nodule bank only inserts nodules; mode must be 'insert' with a bank, got {mode!r}")
            load_bank(self.bank)  # a missing or incomplete bank fails here, not in a worker

    # ---- intensities ------------------------------------------------------------------------------------------
    def to_hu(self, image: np.ndarray) -> np.ndarray:
        image = np.asarray(image, np.float32)
        return image if self.intensity == "hu" else image * self.hu_std + self.hu_mean

    def from_hu(self, hu: np.ndarray) -> np.ndarray:
        return hu if self.intensity == "hu" else (hu - self.hu_mean) / self.hu_std

    # ---- drawing -------------------------------------------------------------------------------------------
    def _draw_features(self, rng: np.random.RandomState, table) -> dict[str, float]:
        source = table.iloc[rng.randint(len(table))]
        drawn = {}
        for name, spec in self.features.items():
            if spec is None:
                continue
            if isinstance(spec, int):
                drawn[name] = float(spec)
            elif isinstance(spec, tuple):
                drawn[name] = float(rng.randint(spec[0], spec[1] + 1))
            elif spec == "balanced":
                drawn[name] = float(rng.randint(1, RATING_LEVELS[name] + 1))
            else:  # "dataset": the ratings of a random LIDC nodule
                drawn[name] = float(rating_level(source[name], RATING_LEVELS[name]))
        return drawn

    def _outline_appearance(self, nodule_id: str) -> dict[str, float]:
        """The outline's source nodule's texture and calcification levels that the request leaves out."""
        if not self.appearance_from_outline:
            return {}
        row = usable_nodule(nodule_id)
        return {name: float(rating_level(row[name], RATING_LEVELS[name])) for name in APPEARANCE_FEATURES
                if self.features[name] is None}

    def _draw_outline(self, rng: np.random.RandomState, features: dict[str, float]) -> tuple[str, float]:
        """A real LIDC nodule chosen by the requested shape features (see :func:`choose_outline`)."""
        return choose_outline(usable_nodule_table(), features, self.size_mm, rng)

    def draw(self, image: np.ndarray, label: np.ndarray | None, rng: np.random.RandomState,
             spacing_mm: Sequence[float], lung_mask: np.ndarray | None = None,
             centre_slice: int | None = None) -> NoduleParameters:
        """Draw the parameters of one call (no model is run).

        ``lung_mask`` (the image's shape, bool): the lung fields when the caller knows them (a phantom, a
        prepared dataset, a lung segmentation); by default K-means finds them (:func:`slice_lung`).
        ``centre_slice`` (3D images): the axial slice an inserted nodule is centred on, e.g. the labelled middle
        slice of a 2.5D slab; by default the ``location``'s slice or a random slice with lung.
        """
        hu = self.to_hu(image)
        _check_lung_mask(lung_mask, hu.shape)
        if centre_slice is not None and (hu.ndim != 3 or not 0 <= centre_slice < hu.shape[2]):
            raise ValueError(f"centre_slice must index an axial slice of a 3D image (0..{hu.shape[-1] - 1}), "
                             f"got {centre_slice!r} for an image of shape {hu.shape}")
        table = usable_nodule_table()
        features = self._draw_features(rng, table) if self.mode != "remove" else {}
        seed = int(rng.randint(2**31 - 1))
        if self.mode in ("replace", "remove"):
            return self._draw_existing(label, features, seed)
        bank_entry, distance, appearance = -1, 0.0, {}
        if self.bank is not None:
            bank_entry = load_bank(self.bank).choose(features, rng)
            nodule_id, outline = self._bank_outline(bank_entry, spacing_mm, hu.ndim)
        else:
            nodule_id, distance = self._draw_outline(rng, features)
            outline = nodule_outline(nodule_id, spacing_mm, hu.ndim, self.size_mm)
            appearance = self._outline_appearance(nodule_id)
        slice_axis_len = hu.shape[2] if hu.ndim == 3 else 1
        if self.location is not None:
            if centre_slice is None:
                centre_slice = self.location[2] if len(self.location) == 3 else slice_axis_len // 2
            centre = (float(self.location[0]), float(self.location[1]))
        else:
            if centre_slice is None:
                centre_slice = _lung_slice(hu, rng, spacing_mm) if hu.ndim == 3 else 0
            if centre_slice is None:
                return NoduleParameters(self.mode, features, nodule_id, seed=seed, skipped="no lung tissue")
            hu_2d = hu[..., centre_slice] if hu.ndim == 3 else hu
            lung = _lung_of(hu_2d, lung_mask, centre_slice if hu.ndim == 3 else None, float(spacing_mm[0]))
            lung = lung & ~_occupied(label, lung.shape, centre_slice, outline.shape[2], float(spacing_mm[0]))
            flat = outline.max(axis=2)
            site = free_site(lung, flat, float(spacing_mm[0]), np.random.default_rng(rng.randint(2**31)))
            if site is None:
                return NoduleParameters(self.mode, features, nodule_id, seed=seed, skipped="no lung tissue")
            rows, cols = np.nonzero(flat)
            centre = (site[0] + (rows.min() + rows.max() + 1) / 2, site[1] + (cols.min() + cols.max() + 1) / 2)
        depth = outline.shape[2] if hu.ndim == 3 else 1
        first = int(centre_slice) - depth // 2
        slices = tuple(k for k in range(first, first + depth) if 0 <= k < slice_axis_len) if hu.ndim == 3 else ()
        return NoduleParameters(self.mode, features, nodule_id, centre, slices, seed, self.size_mm,
                                bank_entry=bank_entry, outline_distance=distance,
                                centre_slice=int(centre_slice) if hu.ndim == 3 else 0, outline_appearance=appearance)

    def _bank_outline(self, index: int, spacing_mm: Sequence[float], ndim: int) -> tuple[str, np.ndarray]:
        """The source nodule id of bank entry ``index`` and its outline (H, W, depth), its widest layer the
        entry's own mask; the depth is the real nodule's at this spacing."""
        entry = load_bank(self.bank).entry(index)
        nodule_id = str(entry.row["source_nodule_id"])
        _, mask = bank_outline(entry, float(spacing_mm[0]), self.size_mm, entry.row.get("source_diameter_mm"))
        depth = nodule_outline(nodule_id, spacing_mm, 3, self.size_mm).shape[2] if ndim == 3 else 1
        return nodule_id, np.repeat(mask[:, :, None], depth, axis=2)

    def _draw_existing(self, label: np.ndarray | None, features: dict[str, float], seed: int) -> NoduleParameters:
        if label is None or not np.any(label > 0):
            return NoduleParameters(self.mode, features, seed=seed, skipped="no nodule in the label to act on")
        components, count = ndimage.label(np.asarray(label) > 0)
        sizes = ndimage.sum(components > 0, components, range(1, count + 1))
        largest = components == (1 + int(np.argmax(sizes)))
        points = np.argwhere(largest)
        centre = tuple(float(c) for c in points[:, :2].mean(axis=0))
        slices = tuple(sorted(set(points[:, 2].tolist()))) if largest.ndim == 3 else ()
        return NoduleParameters(self.mode, features, centre=centre, slices=slices, seed=seed)

    # ---- applying -------------------------------------------------------------------------------------------
    def apply(self, image: np.ndarray, label: np.ndarray | None, params: NoduleParameters,
              spacing_mm: Sequence[float], lung_mask: np.ndarray | None = None
              ) -> tuple[np.ndarray, np.ndarray | None, dict[str, Any]]:
        """Apply drawn parameters; returns the new image, the new label and what was done (the parameters,
        ``changed_pixels`` and, for a live insertion, ``told``: the features the U-Net was told besides the request,
        as the pipeline records them; for a live insertion or replacement ``redraws``, the pipeline's redraws of a
        saturated nodule told "not calcified" summed over the edited slices, and ``saturated`` when one was left so;
        ``lung_mask``: as in :meth:`draw`)."""
        _check_lung_mask(lung_mask, np.shape(image))
        info = params.to_dict()
        if params.skipped:
            return image, label, info
        if params.bank_entry >= 0:
            return self._apply_bank(image, label, params, spacing_mm)
        pipe = load_pipeline(self.model, self.device, self.max_redraws)
        image = np.asarray(image)
        out = image.copy()
        new_label = None if label is None else np.asarray(label).copy()
        hu = self.to_hu(image)
        slices = params.slices if image.ndim == 3 else (None,)
        outline_3d = nodule_outline(params.nodule_id, spacing_mm, image.ndim, params.size_mm) if params.mode == "insert" else None
        changed = 0
        for k in slices:
            hu_2d = hu if k is None else hu[..., k]
            label_2d = None if new_label is None else (new_label if k is None else new_label[..., k])
            lung = _lung_of(hu_2d, lung_mask, k, float(spacing_mm[0]))
            unit, semantic = _model_inputs(hu_2d, label_2d, spacing_mm, lung)
            if params.mode == "insert":
                layer = _layer(outline_3d, params, k)
                if layer is None or not layer.any():
                    continue
                result = pipe.insert(unit, semantic, layer, params.centre, params.features, steps=self.steps,
                                     guidance_scale=self.guidance_scale, seed=params.seed,
                                     spacing_mm=float(spacing_mm[0]), cfg_scale=self.cfg_scale,
                                     conditioning=params.outline_appearance)
                info["told"] = result.record.get("conditioning", {})
                region = result.nodule_mask > 0
            else:
                region = (label_2d > 0) if label_2d is not None else np.zeros_like(unit, bool)
                if not region.any():
                    continue
                if params.mode == "replace":
                    result = pipe.replace(unit, semantic, region, params.features, steps=self.steps,
                                          guidance_scale=self.guidance_scale, seed=params.seed,
                                          spacing_mm=float(spacing_mm[0]), cfg_scale=self.cfg_scale)
                else:
                    result = pipe.remove(unit, semantic, region, steps=self.steps, seed=params.seed,
                                         spacing_mm=float(spacing_mm[0]))
            changed += self._write(result.image, result.footprint, region, params.mode,
                                   out if k is None else out[..., k], label_2d)
            _note_redraws(info, result.record)
        info["changed_pixels"] = changed
        if changed == 0:
            info["skipped"] = ("the nodule's layers on the edited slices are empty" if params.mode == "insert"
                               else "no nodule in the label on the edited slices")
        return out, new_label, info

    def _apply_bank(self, image: np.ndarray, label: np.ndarray | None, params: NoduleParameters,
                    spacing_mm: Sequence[float]) -> tuple[np.ndarray, np.ndarray | None, dict[str, Any]]:
        """Bank mode: blend the banked nodule in; in 3D its widest layer on the centre slice, shrunk towards
        the ends with the real nodule's layer areas."""
        if self.bank is None:
            raise ValueError(f"parameters name bank entry {params.bank_entry} but this transform has no bank")
        entry = load_bank(self.bank).entry(params.bank_entry)
        patch, mask = bank_outline(entry, float(spacing_mm[0]), params.size_mm, entry.row.get("source_diameter_mm"))
        out, new_label = np.asarray(image).copy(), None if label is None else np.asarray(label).copy()
        if out.ndim == 2:
            layers: list[tuple[int | None, np.ndarray]] = [(None, mask)]
        else:
            outline_3d = nodule_outline(params.nodule_id, spacing_mm, 3, params.size_mm)
            areas = outline_3d.sum(axis=(0, 1))
            areas = areas / max(areas.max(), 1) * mask.sum()
            first = params.centre_slice - outline_3d.shape[2] // 2
            layers = [(k, shrink_to_area(mask, int(round(areas[k - first]))))
                      for k in params.slices if 0 <= k - first < len(areas)]
        changed = 0
        for k, keep in layers:
            if not keep.any():
                continue
            target = out if k is None else out[..., k]
            blended, region, footprint = place_patch(self.to_hu(target), patch, mask, params.centre, keep=keep)
            target[footprint] = self.from_hu(blended)[footprint].astype(out.dtype)
            if new_label is not None:
                (new_label if k is None else new_label[..., k])[region] = self.label_value
            changed += int(footprint.sum())
        info = {**params.to_dict(), "changed_pixels": changed}
        if changed == 0:
            info["skipped"] = "the banked nodule's layers on the edited slices are empty"
        return out, new_label, info

    def _write(self, unit_image: np.ndarray, footprint: np.ndarray, region: np.ndarray, mode: str,
               image_2d: np.ndarray, label_2d: np.ndarray | None) -> int:
        """Copy an edited slice (in [-1, 1]) into ``image_2d`` on its footprint and the nodule into the label, in place."""
        image_2d[footprint] = self.from_hu(unit_to_hu(unit_image))[footprint].astype(image_2d.dtype)
        if label_2d is not None:
            label_2d[region] = 0 if mode == "remove" else self.label_value
        return int(footprint.sum())

    def apply_batch(self, images: Sequence[np.ndarray], labels: Sequence[np.ndarray | None],
                    params: Sequence[NoduleParameters], spacings_mm: Sequence[Sequence[float]],
                    lung_masks: Sequence[np.ndarray | None] | None = None
                    ) -> list[tuple[np.ndarray, np.ndarray | None, dict[str, Any]]]:
        """:meth:`apply` on several images; 2D insertions run as one batch of the diffusion (same results as
        one by one with DDIM, faster above all on a GPU). Other items are applied one by one."""
        lung_masks = [None] * len(images) if lung_masks is None else list(lung_masks)
        if len(lung_masks) != len(images):
            raise ValueError(f"lung_masks must hold one mask (or None) per image: {len(lung_masks)} for {len(images)} images")
        results: list[Any] = [None] * len(images)
        batch = [i for i, p in enumerate(params) if p.mode == "insert" and not p.skipped and np.ndim(images[i]) == 2]
        for i in set(range(len(images))) - set(batch):
            results[i] = self.apply(images[i], labels[i], params[i], spacings_mm[i], lung_masks[i])
        if batch:
            inputs = []
            for i in batch:
                label = None if labels[i] is None else np.asarray(labels[i])
                _check_lung_mask(lung_masks[i], np.shape(images[i]))
                hu_2d = self.to_hu(images[i])
                inputs.append(_model_inputs(hu_2d, label, spacings_mm[i],
                                            _lung_of(hu_2d, lung_masks[i], None, float(spacings_mm[i][0]))))
            pipe = load_pipeline(self.model, self.device, self.max_redraws)
            edits = pipe.insert_batch([u for u, _ in inputs], [m for _, m in inputs],
                                      [nodule_outline(params[i].nodule_id, spacings_mm[i], 2, params[i].size_mm)[:, :, 0]
                                       for i in batch],
                                      [params[i].centre for i in batch], [params[i].features for i in batch],
                                      [params[i].seed for i in batch], steps=self.steps,
                                      guidance_scale=self.guidance_scale, cfg_scale=self.cfg_scale,
                                      spacing_mm=[float(spacings_mm[i][0]) for i in batch],
                                      conditioning=[params[i].outline_appearance for i in batch])
            for i, edit in zip(batch, edits):
                out = np.asarray(images[i]).copy()
                label = None if labels[i] is None else np.asarray(labels[i]).copy()
                changed = self._write(edit.image, edit.footprint, edit.nodule_mask > 0, "insert", out, label)
                results[i] = (out, label, _note_redraws({**params[i].to_dict(), "changed_pixels": changed,
                                                         "told": edit.record.get("conditioning", {})}, edit.record))
        return results


def _note_redraws(info: dict[str, Any], record: dict[str, Any]) -> dict[str, Any]:
    """Add an edit record's ``redraws`` (summed) and ``saturated`` (any) to ``info``; returns ``info``."""
    if "redraws" in record:
        info["redraws"] = info.get("redraws", 0) + int(record["redraws"])
    if "saturated" in record:
        info["saturated"] = bool(info.get("saturated", False) or record["saturated"])
    return info


def _model_inputs(hu_2d: np.ndarray, label_2d: np.ndarray | None, spacing_mm: Sequence[float], lung: np.ndarray
                  ) -> tuple[np.ndarray, np.ndarray]:
    """A slice in the model's units ([-1, 1]) and its semantic map (lung fields ``lung``), the label's nodules
    marked (class 6)."""
    semantic = semantic_map_from_hu(hu_2d, spacing_mm=float(spacing_mm[0]), lung_mask=lung)
    if label_2d is not None:
        semantic[(label_2d > 0) & (semantic != SemanticLabel.BACKGROUND)] = SemanticLabel.NODULE_INDETERMINATE
    return hu_to_unit(hu_2d), semantic


_LUNG_CACHE: OrderedDict[tuple, np.ndarray] = OrderedDict()
_LUNG_CACHE_SIZE = 16
_LUNG_LOCK = threading.Lock()


def slice_lung(hu_2d: np.ndarray, spacing_mm: float) -> np.ndarray:
    """The lung fields of an HU slice (:func:`lung_mask_from_hu`: K-means, morphology, marching squares),
    remembered by the slice's content for the last 16 slices: a transform's ``draw`` (the free site) and its
    ``apply`` (the model's semantic map) ask for the same slice, and K-means is the costly part of both.
    Returns a read-only mask.

    Example:
        >>> hu = np.full((64, 64), -1000.0, np.float32); hu[8:56, 8:56] = 40.0; hu[16:48, 14:30] = -850.0
        >>> lung = slice_lung(hu, 2.0)
        >>> bool(lung[30, 20]), lung is slice_lung(hu.copy(), 2.0)
        (True, True)
    """
    hu_2d = np.ascontiguousarray(hu_2d, dtype=np.float32)
    key = (hashlib.blake2b(hu_2d.tobytes(), digest_size=16).digest(), hu_2d.shape, float(spacing_mm))
    with _LUNG_LOCK:
        if key in _LUNG_CACHE:
            _LUNG_CACHE.move_to_end(key)
            return _LUNG_CACHE[key]
    lung = lung_mask_from_hu(hu_2d, float(spacing_mm))
    lung.setflags(write=False)
    with _LUNG_LOCK:
        _LUNG_CACHE[key] = lung
        while len(_LUNG_CACHE) > _LUNG_CACHE_SIZE:
            _LUNG_CACHE.popitem(last=False)
    return lung


def _check_lung_mask(lung_mask: np.ndarray | None, shape: tuple[int, ...]) -> None:
    if lung_mask is not None and np.shape(lung_mask) != tuple(shape):
        raise ValueError(f"lung_mask must have the image's shape {tuple(shape)}, got {np.shape(lung_mask)}")


def _lung_of(hu_2d: np.ndarray, lung_mask: np.ndarray | None, k: int | None, spacing_mm: float) -> np.ndarray:
    """The lung fields of slice ``k`` (None: a 2D image): the caller's mask when given, else :func:`slice_lung`."""
    if lung_mask is None:
        return slice_lung(hu_2d, spacing_mm)
    mask = np.asarray(lung_mask, bool)
    return mask if k is None else mask[..., k]


@functools.cache
def load_bank(path: str):
    """One nodule bank per folder and process."""
    from lsdm_aug.bank.store import NoduleBank

    return NoduleBank(path)


def choose_outline(table, features: dict[str, float], size_mm: float | None,
                   rng: np.random.RandomState) -> tuple[str, float]:
    """A LIDC nodule whose consensus outline fits the requested shape: malignancy, lobulation and spiculation
    (the rounded median ratings, which the outline carries) and, when given, the size.

    The distance of a nodule is the Euclidean distance in rating levels over the requested shape features,
    plus, with ``size_mm``, one level per whole factor 1.5 between the nodule's diameter and ``size_mm``
    (``floor(|log(diameter / size_mm)| / log(1.5))``; the outline is rescaled to ``size_mm`` anyway, this keeps
    the rescaling small). One of the nearest nodules is drawn at random; exact matches have distance 0. Texture is not a shape
    feature: the U-Net and the guidance render it.

    Returns:
        (nodule id, its distance).

    Example:
        >>> nodule_id, distance = choose_outline(usable_nodule_table(), {"spiculation": 5, "malignancy": 5}, None,
        ...                                      np.random.RandomState(0))
        >>> distance
        0.0
    """
    requested = [name for name in SHAPE_FEATURES if name in features]
    distance = np.zeros(len(table))
    for name in requested:
        levels = rating_level(table[name].to_numpy())
        distance += (levels - float(features[name])) ** 2
    distance = np.sqrt(distance)
    if size_mm is not None:
        ratio = np.abs(np.log(table.diameter_mm.to_numpy().clip(1e-3) / float(size_mm)))
        distance += np.floor(ratio / np.log(1.5))
    nearest = np.flatnonzero(distance <= distance.min() + 1e-9)
    choice = nearest[rng.randint(len(nearest))]
    return str(table.nodule_id.iloc[choice]), round(float(distance[choice]), 4)


@functools.cache
def usable_nodule_table():
    """LIDC nodules with a non-empty consensus mask (the ones that can be placed), loaded once per process."""
    table = load_nodule_table()
    return table[table.consensus_voxels > 0].reset_index(drop=True)


@functools.cache
def _usable_nodules_by_id():
    return usable_nodule_table().set_index("nodule_id")


def usable_nodule(nodule_id: str):
    """One usable LIDC nodule's row of :func:`usable_nodule_table` (ratings, diameter, spacing), by its id.

    Raises:
        ValueError: no usable nodule has that id.

    Example:
        >>> nodule_id = usable_nodule_table().nodule_id.iloc[0]
        >>> bool(1 <= usable_nodule(nodule_id).malignancy <= 5)
        True
    """
    records = _usable_nodules_by_id()
    if nodule_id not in records.index:
        raise ValueError(f"no usable LIDC nodule {nodule_id!r} (ids look like {records.index[0]!r})")
    return records.loc[nodule_id]


def nodule_outline(nodule_id: str, spacing_mm: Sequence[float], ndim: int, size_mm: float | None) -> np.ndarray:
    """A nodule's consensus mask at the image's spacing, (H, W, D) without empty end layers (so that layer
    ``D // 2`` is its middle); for 2D images its centre slice, (H, W, 1)."""
    bank = NoduleMaskBank.default()
    index = bank.nodule_ids.index(nodule_id)
    zoom = 1.0
    if size_mm is not None:
        zoom = size_mm / max(float(usable_nodule(nodule_id).diameter_mm), 1e-3)
    in_plane = float(bank.pixel_spacing_mm[index]) * zoom
    if ndim == 2:
        return resample_mask(bank.centre_slice(nodule_id), in_plane, [float(s) for s in spacing_mm[:2]])[:, :, None]
    native = (in_plane, in_plane, float(bank.slice_spacing_mm[index]) * zoom)
    outline = resample_mask(bank.mask_3d(nodule_id), native, [float(s) for s in spacing_mm[:3]])
    filled = np.flatnonzero(outline.any(axis=(0, 1)))  # resampling to thick slices can empty the end layers
    return outline[:, :, filled[0]:filled[-1] + 1]


NODULE_MARGIN_MM = 5.0


def _occupied(label: np.ndarray | None, shape: tuple[int, ...], centre_slice: int, depth: int,
              spacing_mm: float) -> np.ndarray:
    """Pixels a new nodule must not cover: the label's nodules (on every slice the new one would span, in 3D)
    grown by :data:`NODULE_MARGIN_MM`, so two lesions never merge into one label."""
    if label is None:
        return np.zeros(shape, bool)
    label = np.asarray(label)
    if label.ndim == 3:
        first = max(centre_slice - depth // 2, 0)
        label = label[..., first:first + depth].max(axis=2)
    existing = label > 0
    if not existing.any():
        return existing
    return ndimage.binary_dilation(existing, iterations=max(1, int(round(NODULE_MARGIN_MM / spacing_mm))))


def _layer(outline_3d: np.ndarray, params: NoduleParameters, k: int | None) -> np.ndarray | None:
    """The outline's layer for axial slice ``k`` (by its offset from the centre slice), None outside the nodule;
    a 2D image (``k`` None) gets the centre layer."""
    depth = outline_3d.shape[2]
    index = depth // 2 if k is None else k - (params.centre_slice - depth // 2)
    return outline_3d[:, :, index] if 0 <= index < depth else None


def _lung_slice(hu: np.ndarray, rng: np.random.RandomState, spacing_mm: Sequence[float]) -> int | None:
    """A random axial slice with enough low-density lung (fast HU test; the semantic map decides the site)."""
    lung_like = ((hu > -950) & (hu < -600)).reshape(-1, hu.shape[2]).mean(axis=0)
    candidates = np.flatnonzero(lung_like > 0.05)
    if len(candidates) == 0:
        return None
    return int(candidates[rng.randint(len(candidates))])
