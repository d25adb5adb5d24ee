"""``LSDMPipeline``: generate slices from semantic maps, and insert, replace or remove nodules in real slices.

One object holds the trained autoencoder, SPADE U-Net and feature classifiers of a model folder
(safetensors + JSON each). Every random draw comes from one ``torch.Generator`` seeded by ``seed``,
so a seed reproduces a sample; CUDA is used when present.

Local edits (:meth:`insert`, :meth:`replace`, :meth:`remove`) encode the slice, edit the semantic
map, run the reverse process only on a latent window around the site while the rest of the window
is held to the original (RePaint re-noising at every step), decode the window and blend it back
with a feathered mask: pixels outside the footprint are bit-identical to the input.

Example:
    >>> pipe = LSDMPipeline.from_pretrained("default")  # doctest: +SKIP
    >>> images = pipe.generate(semantic_maps, features={"malignancy": 5}, steps=50, seed=0)  # doctest: +SKIP
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lsdm_aug.config import CONDITIONING_FEATURES, FEATURES, RATING_LEVELS, Recipe, recipe_from_dict
from lsdm_aug.data.semantic import SemanticLabel, malignancy_label
from lsdm_aug.editing import (DEFAULT_MAX_REDRAWS, EditWindow, ModelGrid, SpacingError, check_spacing,
                              checked_max_redraws, is_saturated, plan_window, redraw_seed, told_not_calcified)
from lsdm_aug.editing.window import SAME_SPACING_TOLERANCE
from lsdm_aug.models.autoencoder import build_autoencoder, encode_mean
from lsdm_aug.models.checkpoint import CheckpointError, load_weights, read_config, resolve_model_dir, weights_digest
from lsdm_aug.models.classifiers import build_classifier, classifier_file
from lsdm_aug.models.unet import (SemanticCondition, build_unet, conditioned_features, feature_levels,
                                  is_feature_conditioned, semantic_onehot, semantic_to_unit)
from lsdm_aug.sampling.guidance import ClassifierGuidance, LatentBox, TargetCalibration, latent_nodule_mask
from lsdm_aug.sampling.sampler import KnownRegion, random_normal, sample_latents
from lsdm_aug.sampling.schedulers import build_scheduler
from lsdm_aug.training.autoencoder import AUTOENCODER_FILE
from lsdm_aug.training.common import select_device
from lsdm_aug.training.diffusion import UNET_FILE

__all__ = ["LSDMPipeline", "EditResult", "DEFAULT_MODEL_DIR", "validate_features", "fallback_window", "SpacingError",
           "model_spacing"]

DEFAULT_MODEL_DIR = resolve_model_dir("default")
NODULE_LABELS = (SemanticLabel.NODULE_BENIGN, SemanticLabel.NODULE_INDETERMINATE, SemanticLabel.NODULE_MALIGNANT)


def validate_features(features: Mapping[str, float] | None) -> dict[str, float]:
    """Check requested feature values: names among :data:`~lsdm_aug.config.CONDITIONING_FEATURES`, values on
    their LIDC rating scale (1..5; calcification 1..6, 6 = absent)."""
    features = dict(features or {})
    for name, value in features.items():
        if name not in CONDITIONING_FEATURES:
            raise ValueError(f"feature must be one of {CONDITIONING_FEATURES}, got {name!r}")
        top = RATING_LEVELS[name]
        if not isinstance(value, (int, float, np.integer, np.floating)) or not 1 <= float(value) <= top:
            raise ValueError(f"{name} must be in 1..{top}, got {value!r}")
    return {k: float(v) for k, v in features.items()}


def model_spacing(unet_config: Mapping[str, Any], folder: Path) -> tuple[float, tuple[float, float]]:
    """The spacing a model folder's U-Net trained at (the median over its training slices) and the range of image
    spacings it serves (0.4..3.0 mm, widened to its own training range): from ``unet.json``.

    Raises:
        CheckpointError: the folder records no training spacing.
    """
    spacing = unet_config.get("spacing_mm")
    if not isinstance(spacing, Mapping) or "median" not in spacing:
        raise CheckpointError(f"model folder {str(folder)!r} records no training spacing ('spacing_mm' in "
                              f"{UNET_FILE.replace('.safetensors', '.json')}); a model must never run blind at "
                              "another resolution")
    median = float(spacing["median"])
    serves = unet_config.get("serves_spacing_mm") or (min(0.4, float(spacing.get("min", median))),
                                                      max(3.0, float(spacing.get("max", median))))
    return median, (float(serves[0]), float(serves[1]))


def _checked_window(window_px: Any, recipe: Recipe, model_id: str) -> int:
    """A local edit's smallest window side (model pixels), checked against what the networks can take."""
    step = recipe.size_step
    smallest = recipe.classifiers.crop_px
    if isinstance(window_px, bool) or not isinstance(window_px, (int, np.integer)) or window_px < smallest \
            or window_px % step:
        raise ValueError(f"model {model_id}: edit window {window_px!r} px; allowed: a multiple of {step} px (the "
                         f"U-Net's size step) of at least {smallest} px (the classifiers' crop)")
    return int(window_px)


def fallback_window(recipe: Recipe, training_crop_px: int | None = None) -> int:
    """The edit window of a model that sets none (``edit_window_px``): the U-Net's training window when known, else
    half the image side; never smaller than the classifiers' crop.

    Example:
        >>> from lsdm_aug.config import load_recipe
        >>> fallback_window(load_recipe("phantom-512"), 128), fallback_window(load_recipe("phantom-512"))
        (128, 256)
    """
    return max(int(training_crop_px or recipe.image_size // 2), recipe.classifiers.crop_px)


def _nodule_pixels(semantic_maps: torch.Tensor) -> torch.Tensor:
    """Boolean mask of the nodule labels (5, 6, 7) of a map tensor."""
    return torch.isin(semantic_maps, torch.tensor([int(x) for x in NODULE_LABELS], device=semantic_maps.device))


@dataclass
class EditResult:
    """A locally edited slice: image in [-1, 1], its semantic map and nodule mask, and what was done."""

    image: np.ndarray
    semantic_map: np.ndarray
    nodule_mask: np.ndarray
    footprint: np.ndarray
    record: dict[str, Any] = field(default_factory=dict)


def _calibration(data: Mapping[str, Any], path: Path) -> TargetCalibration:
    try:
        return TargetCalibration.from_dict(data)
    except ValueError as error:
        raise CheckpointError(f"classifier config {str(path)!r}: {error}") from error


class LSDMPipeline:
    """The trained LSDM stack of one model folder.

    Args:
        recipe: the recipe the models were trained with.
        autoencoder, unet: trained networks.
        classifiers: feature -> trained classifier (any subset of the four).
        scale_factor: the autoencoder's latent scale factor.
        device: where to run (default: CUDA when present, else CPU).
        calibrations: feature -> calibrated guidance targets of a regression classifier
            (:class:`~lsdm_aug.sampling.guidance.TargetCalibration`; ``from_pretrained`` reads them from the
            classifiers' configs). Set :attr:`calibrated_targets` to False to guide to the raw ratings.
        window_px: the smallest side of a local edit's window, in model pixels (``from_pretrained``: the U-Net's
            ``edit_window_px``, else its training crop); a multiple of the U-Net's size step (autoencoder factor
            x 2 per U-Net level) and at least the classifiers' crop. A larger nodule gets a larger window.
        max_redraws: how often an insertion or replacement told "not calcified" (calcification 6) whose nodule
            comes out saturated (90th percentile >= 400 HU) is drawn again with the next seed
            (:mod:`lsdm_aug.editing.saturation`; 0: never); the record says ``redraws`` and ``saturated``.

    Example:
        >>> pipe = LSDMPipeline.from_pretrained("models/phantom-128")  # doctest: +SKIP
        >>> result = pipe.insert(image, semantic_map, nodule_outline, centre=(70, 40),
        ...                      features={"malignancy": 4}, seed=1)  # doctest: +SKIP
    """

    def __init__(self, recipe: Recipe, autoencoder: torch.nn.Module, unet: torch.nn.Module,
                 classifiers: Mapping[str, torch.nn.Module], scale_factor: float, device: str | None = None,
                 model_id: str = "custom", default_cfg_scale: float = 1.0, spacing_mm: float | None = None,
                 serves_spacing_mm: tuple[float, float] | None = None, window_px: int | None = None,
                 calibrations: Mapping[str, TargetCalibration] | None = None, max_redraws: int = DEFAULT_MAX_REDRAWS) -> None:
        if spacing_mm is None:
            raise ValueError(f"model {model_id}: give the pixel spacing (mm) its U-Net was trained at")
        self.recipe, self.scale_factor, self.model_id = recipe, float(scale_factor), model_id
        self._default_cfg_scale = float(default_cfg_scale)
        self.spacing_mm = float(spacing_mm)
        self.serves_spacing_mm = tuple(serves_spacing_mm or (min(0.4, self.spacing_mm), max(3.0, self.spacing_mm)))
        self.window_px = _checked_window(window_px or fallback_window(recipe), recipe, model_id)
        self.device = select_device(device)
        self.autoencoder = autoencoder.to(self.device).eval().requires_grad_(False)
        self.unet = unet.to(self.device).eval().requires_grad_(False)
        self.classifiers = {f: c.to(self.device).eval().requires_grad_(False) for f, c in classifiers.items()}
        self.calibrations = {f: c for f, c in (calibrations or {}).items() if f in self.classifiers}
        self.calibrated_targets = True
        self.factor = recipe.autoencoder.downsampling
        self.max_redraws = checked_max_redraws(max_redraws)

    # ---- loading -------------------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, name_or_path: str | Path = "default", device: str | None = None,
                        max_redraws: int = DEFAULT_MAX_REDRAWS) -> LSDMPipeline:
        """Load ``"default"`` (shipped in the package) or a model folder written by ``lsdm-aug train``
        (``max_redraws``: see the class).

        Raises:
            CheckpointError: unknown name, missing folder or file, corrupt or mismatched weights.
        """
        folder = resolve_model_dir(name_or_path)
        autoencoder_config = read_config(folder / AUTOENCODER_FILE)
        unet_config = read_config(folder / UNET_FILE)
        recipe = recipe_from_dict({"name": autoencoder_config.get("recipe", "custom"),
                                   "image_size": autoencoder_config["image_size"],
                                   "autoencoder": autoencoder_config["autoencoder"],
                                   "diffusion": unet_config["diffusion"]})
        autoencoder = build_autoencoder(recipe.autoencoder)
        load_weights(folder / AUTOENCODER_FILE, autoencoder)
        unet = build_unet(recipe.diffusion, recipe.autoencoder.latent_channels)
        load_weights(folder / UNET_FILE, unet)
        classifiers, calibrations = {}, {}
        for feature in FEATURES:
            path = folder / classifier_file(feature)
            if path.exists():
                config = read_config(path)
                recipe.classifiers = recipe_from_dict({"classifiers": config["classifiers"]}).classifiers
                classifiers[feature] = build_classifier(recipe.classifiers, feature)
                load_weights(path, classifiers[feature])
                if config.get("calibration"):
                    calibrations[feature] = _calibration(config["calibration"], path)
        spacing, serves = model_spacing(unet_config, folder)
        window = unet_config.get("edit_window_px") or fallback_window(recipe, unet_config.get("crop_px"))
        return cls(recipe, autoencoder, unet, classifiers, autoencoder_config["scale_factor"], device,
                   model_id=f"{folder.name}@{autoencoder_config.get('steps', 0)}/{unet_config.get('steps', 0)}"
                            f"#{weights_digest(folder)}",
                   default_cfg_scale=float(unet_config.get("default_cfg_scale", 1.0)), spacing_mm=spacing,
                   serves_spacing_mm=serves, window_px=window, calibrations=calibrations, max_redraws=max_redraws)

    def check_spacing(self, spacing_mm: float) -> float:
        """An image's pixel spacing, checked against :attr:`serves_spacing_mm` (:class:`SpacingError` outside)."""
        return check_spacing(spacing_mm, self.serves_spacing_mm, self.model_id)

    # ---- building blocks ------------------------------------------------------------------------------------
    def _tensor(self, array: np.ndarray | torch.Tensor, dtype=torch.float32) -> torch.Tensor:
        tensor = torch.as_tensor(np.asarray(array) if not torch.is_tensor(array) else array).to(self.device, dtype)
        while tensor.ndim < 4:
            tensor = tensor.unsqueeze(0)
        return tensor

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Images (B, 1, H, W) in [-1, 1] -> scaled latents."""
        return encode_mean(self.autoencoder, images) * self.scale_factor

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Scaled latents -> images (no clamping; gradients flow when enabled)."""
        return self.autoencoder.decode(latents / self.scale_factor)

    @torch.no_grad()
    def condition(self, semantic_maps: torch.Tensor, features: Sequence[Mapping[str, float]] | None = None
                  ) -> SemanticCondition:
        """The U-Net's condition for (B, 1, H, W) integer maps, with one requested feature dict per map."""
        levels = None
        names = conditioned_features(self.unet)
        if features is not None and names:
            levels = torch.cat([feature_levels({k: v for k, v in item.items() if k in names}, names=names)
                                for item in features]).to(self.device)
        return SemanticCondition(self.encode(semantic_to_unit(semantic_maps)), semantic_onehot(semantic_maps), levels)

    @property
    def feature_conditioned(self) -> bool:
        """Whether the U-Net takes the feature vector (classifier-free guidance)."""
        return is_feature_conditioned(self.unet)

    @property
    def default_cfg_scale(self) -> float:
        """The classifier-free guidance scale used when none is given (0 for a U-Net without features)."""
        return self._default_cfg_scale if self.feature_conditioned else 0.0

    def _check_steering(self, features: Sequence[Mapping[str, float]], guidance_scale: float, cfg_scale: float) -> None:
        """Refuse requested features that nothing will steer: no classifier guides them (or ``guidance_scale``
        is 0) and the U-Net is not feature-conditioned (or ``cfg_scale`` is 0). With both scales 0 the request
        is unguided on purpose and passes."""
        if guidance_scale == 0 and cfg_scale == 0:
            return
        requested = sorted({name for item in features for name in item})
        conditioned = conditioned_features(self.unet)
        lost = [name for name in requested if not ((guidance_scale > 0 and name in self.classifiers)
                                                   or (cfg_scale > 0 and name in conditioned))]
        if lost:
            raise ValueError(f"model {self.model_id} cannot steer {lost} at guidance_scale {guidance_scale:g} and "
                             f"cfg_scale {cfg_scale:g} (classifiers: {sorted(self.classifiers) or 'none'}; feature "
                             f"conditioning: {list(conditioned) or 'none'}); drop them or set both "
                             "scales to 0 for an unguided sample")

    def _cfg_scale(self, cfg_scale: float | None, features: Sequence[Mapping[str, float]]) -> float:
        """Check a requested classifier-free guidance scale against the model."""
        if cfg_scale is None:
            return self.default_cfg_scale
        if not isinstance(cfg_scale, (int, float)) or cfg_scale < 0:
            raise ValueError(f"cfg_scale must be a number >= 0, got {cfg_scale!r}")
        if cfg_scale > 0 and not self.feature_conditioned and any(features):
            raise ValueError(f"cfg_scale {cfg_scale} needs a feature-conditioned U-Net; model {self.model_id} has "
                             "none (use cfg_scale=0 and classifier guidance, guidance_scale)")
        return float(cfg_scale)

    def _check_map(self, semantic_maps: torch.Tensor) -> None:
        size = semantic_maps.shape[-1]
        if semantic_maps.shape[-2] != size or size % self.factor:
            raise ValueError(f"semantic maps must be square with a side divisible by {self.factor}, "
                             f"got {tuple(semantic_maps.shape[-2:])}")

    def _guidance(self, semantic_maps: torch.Tensor, features: dict[str, float] | list[dict[str, float]],
                  scale: float) -> ClassifierGuidance | None:
        """Guidance on the nodule pixels of (B, 1, H, W) maps, with one feature dict for all or one per map
        (None when there is nothing to guide)."""
        per_sample = features if isinstance(features, list) else [features] * len(semantic_maps)
        names = {f for f in per_sample[0] if f in self.classifiers}
        if any({f for f in item if f in self.classifiers} != names for item in per_sample):
            raise ValueError("every sample of a batch must request the same features, got "
                             f"{sorted({tuple(sorted(item)) for item in per_sample})}")
        nodule = _nodule_pixels(semantic_maps)
        if scale == 0 or not names or not bool(nodule.flatten(1).any(1).all()):
            return None
        latent_shape = (semantic_maps.shape[-2] // self.factor, semantic_maps.shape[-1] // self.factor)
        boxes = []
        for sample in nodule:
            rows, cols = torch.nonzero(sample[0], as_tuple=True)
            boxes.append(LatentBox.around(float(rows.float().mean()), float(cols.float().mean()),
                                          self.recipe.classifiers.crop_px // self.factor, latent_shape, self.factor))
        pooled = latent_nodule_mask(nodule.float(), self.factor)
        mask = torch.stack([m[:, b.rows, b.cols] for m, b in zip(pooled, boxes)])
        targets = {f: [item[f] for item in per_sample] for f in sorted(names)}
        return ClassifierGuidance(self.decode, self.classifiers, targets, boxes, mask, scale,
                                  calibrations=self.calibrations if self.calibrated_targets else None)

    # ---- generation ------------------------------------------------------------------------------------------
    def generate(self, semantic_maps: np.ndarray | torch.Tensor,
                 features: Mapping[str, float] | Sequence[Mapping[str, float]] | None = None, *,
                 spacing_mm: float | Sequence[float],
                 steps: int = 50, guidance_scale: float = 1.0, seed: int = 0, sampler: str = "ddim",
                 batch_size: int = 1, cfg_scale: float | None = None) -> np.ndarray:
        """Whole slices from semantic maps, each map's nodule steered towards ``features``.

        Args:
            semantic_maps: (B, H, W) or (H, W) labels 0..7.
            spacing_mm: the maps' pixel spacing, or one per map. At another spacing than the model's, the maps
                are resampled to the model's grid, generated there and the slices resampled back.
            features: requested values 1..5 of any of malignancy, lobulation, spiculation, texture; one dict for
                every map or a list with one dict per map (all requesting the same features).
            steps: reverse steps (DDIM or DDPM).
            guidance_scale: classifier guidance scale ``s`` (0: none).
            seed: seeds every random draw.
            sampler: ``"ddim"`` or ``"ddpm"``.
            batch_size: maps denoised together. With DDIM the result does not depend on it (sample ``i`` starts
                from the ``i``-th noise draw of the seeded generator); with DDPM the step noise does.
            cfg_scale: classifier-free guidance scale ``w`` on the requested features (feature-conditioned U-Nets;
                ``None``: the model's default, see :attr:`default_cfg_scale`; 0: none).

        Returns:
            (B, H, W) float32 images in [-1, 1].
        """
        maps = self._tensor(semantic_maps, torch.long)
        if maps.ndim == 4 and maps.shape[1] != 1:
            maps = maps.reshape(-1, 1, *maps.shape[-2:])
        if isinstance(spacing_mm, Sequence) or isinstance(spacing_mm, np.ndarray):
            return self._generate_per_spacing(maps, features, list(spacing_mm), steps=steps,
                                              guidance_scale=guidance_scale, seed=seed, sampler=sampler,
                                              batch_size=batch_size, cfg_scale=cfg_scale)
        spacing = self.check_spacing(spacing_mm)
        grid = self._whole_slice_grid(tuple(maps.shape[-2:]), spacing)
        if not grid.identity:
            model_maps = np.stack([grid.to_model(m[0], order=0) for m in maps.cpu().numpy()])
            model_images = self.generate(model_maps, features, spacing_mm=self.spacing_mm, steps=steps,
                                         guidance_scale=guidance_scale, seed=seed, sampler=sampler,
                                         batch_size=batch_size, cfg_scale=cfg_scale)
            return np.stack([grid.to_image(image, tuple(maps.shape[-2:]))[1] for image in model_images]
                            ).astype(np.float32)
        self._check_map(maps)
        if isinstance(features, Sequence):
            if len(features) != len(maps):
                raise ValueError(f"{len(features)} feature dicts for {len(maps)} semantic maps")
            per_map = [validate_features(item) for item in features]
        else:
            per_map = [validate_features(features)] * len(maps)
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        cfg_scale = self._cfg_scale(cfg_scale, per_map)
        self._check_steering(per_map, guidance_scale, cfg_scale)
        scheduler = build_scheduler(self.recipe.diffusion, sampler, steps)
        generator = torch.Generator().manual_seed(int(seed))
        latent_shape = (self.recipe.autoencoder.latent_channels, maps.shape[-2] // self.factor,
                        maps.shape[-1] // self.factor)
        noise = torch.randn((len(maps), *latent_shape), generator=generator)
        images = np.empty((len(maps), *maps.shape[-2:]), np.float32)
        has_nodule = _nodule_pixels(maps).flatten(1).any(1).cpu().tolist()
        groups: dict[tuple, list[int]] = {}  # guided maps are batched only with maps guided by the same features
        for index, (nodule, requested) in enumerate(zip(has_nodule, per_map)):
            groups.setdefault((nodule, tuple(sorted(requested))), []).append(index)
        for group in groups.values():
            for chunk in torch.tensor(group).split(batch_size):
                requested = [per_map[i] if has_nodule[i] else {} for i in chunk.tolist()]
                latent = sample_latents(self.unet, scheduler, self.condition(maps[chunk], requested),
                                        generator=generator, initial_noise=noise[chunk], cfg_scale=cfg_scale,
                                        guidance=self._guidance(maps[chunk], requested, guidance_scale))
                with torch.no_grad():
                    images[chunk.numpy()] = self.decode(latent).clamp(-1, 1)[:, 0].cpu().numpy()
        return images

    def _generate_per_spacing(self, maps: torch.Tensor, features, spacings: list[float], seed: int,
                              **settings: Any) -> np.ndarray:
        """:meth:`generate` with one spacing per map: each group of one spacing runs on its own, every map
        seeded by ``seed`` and its index (so a map's slice does not depend on the others' spacings)."""
        if len(spacings) != len(maps):
            raise ValueError(f"{len(spacings)} spacings for {len(maps)} semantic maps")
        per_map = list(features) if isinstance(features, Sequence) else [features] * len(maps)
        images = np.empty((len(maps), *maps.shape[-2:]), np.float32)
        for value in sorted(set(float(v) for v in spacings)):
            group = [i for i, v in enumerate(spacings) if float(v) == value]
            images[group] = self.generate(maps[group], [per_map[i] for i in group], spacing_mm=value,
                                          seed=seed * 1_000_003 + group[0], **settings)
        return images

    def _whole_slice_grid(self, shape: tuple[int, int], spacing_mm: float) -> ModelGrid:
        """The model-spacing grid that covers a whole slice (the identity at the model's own spacing)."""
        scale = self.spacing_mm / spacing_mm
        if abs(scale - 1.0) <= SAME_SPACING_TOLERANCE:
            return ModelGrid(0.0, 0.0, shape[-1], 1.0)
        if shape[0] != shape[1]:
            raise ValueError(f"semantic maps must be square, got {shape}")
        step = self.recipe.size_step
        size = int(np.ceil(shape[0] / scale / step)) * step
        return ModelGrid(0.0, 0.0, size, scale)

    # ---- local edits ------------------------------------------------------------------------------------------
    def _plan(self, image: np.ndarray, semantic_map: np.ndarray, region: np.ndarray, spacing_mm: float,
              feather_px: float) -> EditWindow:
        """The edit window of ``region`` on the model's grid (see :mod:`lsdm_aug.editing`)."""
        return plan_window(image, semantic_map, region, spacing_mm, self.spacing_mm, self.window_px, self.factor,
                           self.recipe.diffusion.downsampling, feather_px)

    def _edit_batch(self, windows: list[EditWindow], features: list[dict[str, float]], steps: int,
                    guidance_scale: float, seeds: list[int], sampler: str, cfg_scale: float,
                    conditioning: list[dict[str, float]] | None = None) -> list[np.ndarray]:
        """Regenerate each window's footprint under its (already edited) semantic map, all windows in one batch;
        ``conditioning``: per window, more features the U-Net is told (the requested ones win), not guided to."""
        images = torch.cat([self._tensor(w.model_image()) for w in windows])
        maps = torch.cat([self._tensor(w.model_semantic_map(), torch.long) for w in windows])
        latent = self.encode(images)
        generated = latent_nodule_mask(torch.cat([self._tensor(w.model_footprint()) for w in windows]), self.factor)
        known = KnownRegion(latent=latent, mask=1.0 - generated)
        scheduler = build_scheduler(self.recipe.diffusion, sampler, steps)
        generators = [torch.Generator().manual_seed(int(seed)) for seed in seeds]
        noise = random_normal(latent.shape, generators)
        told = features if conditioning is None else [{**c, **f} for f, c in zip(features, conditioning)]
        result = sample_latents(self.unet, scheduler, self.condition(maps, told), generator=generators,
                                initial_noise=noise, guidance=self._guidance(maps, features, guidance_scale), known=known,
                                cfg_scale=cfg_scale)
        with torch.no_grad():
            decoded = self.decode(result).clamp(-1, 1)[:, 0].cpu().numpy()
        return [window.blend(values) for window, values in zip(windows, decoded)]

    def _edit(self, image: np.ndarray, semantic_map: np.ndarray, region: np.ndarray, features: dict[str, float],
              spacing_mm: float, steps: int, guidance_scale: float, seed: int, sampler: str, feather_px: float,
              cfg_scale: float) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
        """Regenerate ``region`` (bool, image pixels) of ``image`` under the (already edited) ``semantic_map``;
        returns the image, the footprint and the record's note on redraws (see :meth:`_draw`)."""
        window = self._plan(image, semantic_map, region, spacing_mm, feather_px)
        (out,), (redraw,) = self._draw([window], [features], [seed], [{}], steps, guidance_scale, sampler, cfg_scale)
        return out, window.alpha > 0, redraw

    def _draw_once(self, windows: list[EditWindow], features: list[dict[str, float]], seeds: list[int],
                   told: list[dict[str, float]], steps: int, guidance_scale: float, sampler: str,
                   cfg_scale: float) -> list[np.ndarray]:
        """:meth:`_edit_batch` with one batch per window size, so that each window is what it would be alone."""
        outs: list[np.ndarray | None] = [None] * len(windows)
        sizes = [w.grid.size_model_px for w in windows]
        for size in sorted(set(sizes)):
            group = [i for i, s in enumerate(sizes) if s == size]
            for i, out in zip(group, self._edit_batch([windows[i] for i in group], [features[i] for i in group], steps,
                                                      guidance_scale, [int(seeds[i]) for i in group], sampler,
                                                      cfg_scale, [told[i] for i in group])):
                outs[i] = out
        return outs

    def _draw(self, windows: list[EditWindow], features: list[dict[str, float]], seeds: list[int],
              told: list[dict[str, float]], steps: int, guidance_scale: float, sampler: str,
              cfg_scale: float) -> tuple[list[np.ndarray], list[dict[str, Any]]]:
        """Each window regenerated; one whose U-Net was told "not calcified" (requested or in ``told``, under
        classifier-free guidance: the only way the U-Net is told anything) whose nodule comes out saturated is drawn
        again with :func:`~lsdm_aug.editing.redraw_seed` up to :attr:`max_redraws` times. Returns the images and,
        per window, what the record says about it (``redraws``; ``saturated`` for a window that was checked)."""
        outs = self._draw_once(windows, features, seeds, told, steps, guidance_scale, sampler, cfg_scale)
        checked = [cfg_scale > 0 and told_not_calcified({**extra, **item}) for extra, item in zip(told, features)]
        redraws = [0] * len(windows)
        pending = [i for i, window in enumerate(windows) if checked[i] and is_saturated(outs[i], window.region)]
        for attempt in range(1, self.max_redraws + 1):
            if not pending:
                break
            again = self._draw_once([windows[i] for i in pending], [features[i] for i in pending],
                                    [redraw_seed(seeds[i], attempt) for i in pending], [told[i] for i in pending],
                                    steps, guidance_scale, sampler, cfg_scale)
            for i, out in zip(pending, again):
                outs[i], redraws[i] = out, attempt
            pending = [i for i in pending if is_saturated(outs[i], windows[i].region)]
        notes = [{"redraws": n, **({"saturated": i in pending} if checked[i] else {})}
                 for i, n in enumerate(redraws)]
        return outs, notes

    def insert(self, image: np.ndarray, semantic_map: np.ndarray, nodule_outline: np.ndarray,
               centre: tuple[int, int], features: Mapping[str, float] | None = None, *, spacing_mm: float,
               steps: int = 50, guidance_scale: float = 1.0, seed: int = 0, sampler: str = "ddim",
               feather_px: float = 2.0, cfg_scale: float | None = None,
               conditioning: Mapping[str, float] | None = None) -> EditResult:
        """Insert a nodule whose outline is ``nodule_outline`` (bool, image pixels) centred at ``centre`` (row, col).

        The semantic map gets the outline with the class of the requested malignancy (3 if none asked);
        the nodule is generated there and steered towards ``features`` by classifier guidance
        (``guidance_scale``) and, with a feature-conditioned U-Net, classifier-free guidance (``cfg_scale``).

        Args:
            spacing_mm: the image's pixel spacing; the edit runs at the model's spacing and comes back
                (see :mod:`lsdm_aug.editing`). Outside :attr:`serves_spacing_mm`: :class:`SpacingError`.
            feather_px: width of the blend's feather, in model pixels.
            conditioning: more features a feature-conditioned U-Net is told under classifier-free guidance but
                no classifier guides to (e.g. the texture of the real nodule whose outline this is); a feature
                also in ``features`` keeps the requested value. Recorded as ``conditioning`` in the record.
        """
        return self.insert_batch([image], [semantic_map], [nodule_outline], [centre], [features or {}], [seed],
                                 spacing_mm=[spacing_mm], steps=steps, guidance_scale=guidance_scale, sampler=sampler,
                                 feather_px=feather_px, cfg_scale=cfg_scale,
                                 conditioning=None if conditioning is None else [conditioning])[0]

    def insert_batch(self, images: list[np.ndarray], semantic_maps: list[np.ndarray], nodule_outlines: list[np.ndarray],
                     centres: list[tuple[float, float]], features: list[Mapping[str, float]], seeds: list[int], *,
                     spacing_mm: Sequence[float], steps: int = 50, guidance_scale: float = 1.0, sampler: str = "ddim",
                     feather_px: float = 2.0, cfg_scale: float | None = None,
                     conditioning: list[Mapping[str, float]] | None = None) -> list[EditResult]:
        """:meth:`insert` on several slices at once (``spacing_mm``: one spacing per slice): one reverse process
        over the batch of latent windows.

        Every item must request the same feature names (values may differ). With DDIM each result equals
        what :meth:`insert` gives for that item and seed alone, to float rounding (about 1e-6: a batch runs other
        convolution kernels); the batch only runs faster (GPU above all). A nodule whose 90th percentile lies
        within that rounding of the saturation threshold may be redrawn in one and not the other.
        """
        lengths = {len(images), len(semantic_maps), len(nodule_outlines), len(centres), len(features), len(seeds),
                   len(spacing_mm)}
        if len(lengths) != 1 or not images:
            raise ValueError("images, semantic_maps, nodule_outlines, centres, features, seeds and spacing_mm must be "
                             f"non-empty lists of one length, got lengths {sorted(lengths)}")
        features = [validate_features(item) for item in features]
        if conditioning is not None and len(conditioning) != len(features):
            raise ValueError(f"conditioning must hold one feature dict per item: {len(conditioning)} for "
                             f"{len(features)} items")
        names = conditioned_features(self.unet)
        told = [{} for _ in features] if conditioning is None else [validate_features(c) for c in conditioning]
        spacings = [self.check_spacing(value) for value in spacing_mm]
        cfg_scale = self._cfg_scale(cfg_scale, features)
        # what the U-Net is told besides the request: features it is conditioned on, not requested, and only
        # under classifier-free guidance (w = 0 samples without the feature vector)
        told = [{k: v for k, v in extra.items() if k in names and k not in item} if cfg_scale > 0 else {}
                for extra, item in zip(told, features)]
        self._check_steering(features, guidance_scale, cfg_scale)
        windows = []
        for image, semantic_map, outline, centre, item, spacing in zip(images, semantic_maps, nodule_outlines, centres,
                                                                        features, spacings):
            image, semantic_map = np.asarray(image), np.asarray(semantic_map)
            if image.shape != semantic_map.shape or image.ndim != 2:
                raise ValueError(f"image and semantic map must be 2D of one shape, got {image.shape} and "
                                 f"{semantic_map.shape}")
            region = _place(np.asarray(outline, bool), centre, image.shape)
            edited_map = semantic_map.copy()
            edited_map[region] = malignancy_label(item.get("malignancy", 3.0))
            windows.append(self._plan(image, edited_map, region, spacing, feather_px))
        outs, notes = self._draw(windows, features, list(seeds), told, steps, guidance_scale, sampler, cfg_scale)
        results = []
        for out, window, item, seed, spacing, extra, note in zip(outs, windows, features, seeds, spacings, told, notes):
            rows, cols = np.nonzero(window.region)
            record = {"mode": "insert", **item, **({"conditioning": extra} if extra else {}),
                      "centre_row": float(rows.mean()), "centre_col": float(cols.mean()),
                      "area_px": int(window.region.sum()), "seed": int(seed), "guidance_scale": guidance_scale,
                      "cfg_scale": cfg_scale, "steps": steps, "spacing_mm": spacing,
                      "model_spacing_mm": self.spacing_mm, "model": self.model_id, **note}
            results.append(EditResult(out, window.semantic_map, window.region.astype(np.uint8), window.alpha > 0,
                                      record))
        return results

    def replace(self, image: np.ndarray, semantic_map: np.ndarray, nodule_mask: np.ndarray,
                features: Mapping[str, float] | None = None, *, spacing_mm: float, steps: int = 50,
                guidance_scale: float = 1.0, seed: int = 0, sampler: str = "ddim", feather_px: float = 2.0,
                cfg_scale: float | None = None) -> EditResult:
        """Regenerate the nodule in ``nodule_mask`` (bool) with new ``features`` (its malignancy class follows);
        the arguments are those of :meth:`insert`."""
        features = validate_features(features)
        spacing = self.check_spacing(spacing_mm)
        cfg_scale = self._cfg_scale(cfg_scale, [features])
        self._check_steering([features], guidance_scale, cfg_scale)
        region = np.asarray(nodule_mask, bool)
        if not region.any():
            raise ValueError("nodule_mask is empty: nothing to replace")
        edited_map = np.asarray(semantic_map).copy()
        edited_map[region] = malignancy_label(features.get("malignancy", 3.0))
        out, footprint, note = self._edit(np.asarray(image), edited_map, region, features, spacing, steps,
                                          guidance_scale, seed, sampler, feather_px, cfg_scale)
        return EditResult(out, edited_map, region.astype(np.uint8), footprint,
                          {"mode": "replace", **features, "area_px": int(region.sum()), "seed": int(seed),
                           "guidance_scale": guidance_scale, "cfg_scale": cfg_scale, "steps": steps,
                           "spacing_mm": spacing, "model_spacing_mm": self.spacing_mm, "model": self.model_id,
                           **note})

    def remove(self, image: np.ndarray, semantic_map: np.ndarray, nodule_mask: np.ndarray, *, spacing_mm: float,
               steps: int = 50, seed: int = 0, sampler: str = "ddim", feather_px: float = 2.0) -> EditResult:
        """Replace the nodule in ``nodule_mask`` by lung tissue (label 4), unguided."""
        spacing = self.check_spacing(spacing_mm)
        region = np.asarray(nodule_mask, bool)
        if not region.any():
            raise ValueError("nodule_mask is empty: nothing to remove")
        edited_map = np.asarray(semantic_map).copy()
        edited_map[region] = SemanticLabel.LUNG
        out, footprint, _ = self._edit(np.asarray(image), edited_map, region, {}, spacing, steps, 0.0, seed, sampler,
                                       feather_px, 0.0)
        return EditResult(out, edited_map, np.zeros_like(region, np.uint8), footprint,
                          {"mode": "remove", "area_px": int(region.sum()), "seed": int(seed), "steps": steps,
                           "spacing_mm": spacing, "model_spacing_mm": self.spacing_mm, "model": self.model_id})


def _place(outline: np.ndarray, centre: tuple[int, int], shape: tuple[int, int]) -> np.ndarray:
    """A full-size mask with ``outline`` centred at ``centre``; the outline must fit inside the image."""
    if not outline.any():
        raise ValueError("nodule outline is empty")
    rows, cols = np.nonzero(outline)
    outline = outline[rows.min():rows.max() + 1, cols.min():cols.max() + 1]
    top, left = int(round(centre[0] - outline.shape[0] / 2)), int(round(centre[1] - outline.shape[1] / 2))
    if top < 0 or left < 0 or top + outline.shape[0] > shape[0] or left + outline.shape[1] > shape[1]:
        raise ValueError(f"a {outline.shape} nodule centred at {tuple(centre)} does not fit a {shape} image")
    mask = np.zeros(shape, bool)
    mask[top:top + outline.shape[0], left:left + outline.shape[1]] = outline
    return mask
