"""``lsdm-aug benchmark model-quality``: a trained model's gates on held-out phantom slices at native resolution.

Every figure is measured on the test split of a prepared phantom dataset (patients the model never saw)
and written to ``model_quality.md`` / ``model_quality.json``:

1. **autoencoder**: SSIM / PSNR of whole reconstructed slices; the HU contrast of nodules of >= 5 mm to the
   lung around them, after reconstruction, as a share of the original contrast;
2. **map respect**: mean HU of generated lung (whole slices, unguided); inserted nodules' mean HU per
   requested texture level against the phantom's own nodules of that level; the share of non-calcified
   requests whose 90th percentile reaches 400 HU (a saturated blob);
3. **control**, judged by independent evaluators (:class:`~lsdm_aug.metrics.evaluator.NoduleEvaluator`, trained
   on clean phantom crops only, never on generated ones): level 1 vs 5 requested (malignancy 1-2 vs 4-5), the
   outline chosen by the requested shape features, for each guidance setting (classifier guidance ``s``,
   classifier-free guidance ``w``); guidance alone (the same outlines requested benign and malignant) with the
   nodule-crop Fréchet distance relative to no guidance; every AUC with its 95 % bootstrap interval over the
   requests (:func:`~lsdm_aug.metrics.auc.auc_interval`);
   and, for the same nodules inserted in place, their HU by depth below the outline against the phantom's and the
   autoencoder's alone (:mod:`lsdm_aug.benchmarks.edge_profile`): where an inserted nodule's HU is lost;
4. the insertion gates again at other pixel spacings (phantom backgrounds drawn at that spacing; the edit
   path resamples to the model's);
5. **speed**: a local insertion against generating the whole slice, at the same steps;
6. ``guidance_grid.png``: one outline, one site, one seed; rows malignancy 1..5 requested, columns the
   guidance settings.

Each finished section is kept under ``out/parts-<hash>/``: rerunning the command resumes (the sections that insert
or generate are keyed by :data:`INSERTION_VERSION` too, so that a changed edit path remakes them).

Example:
    >>> report = run_model_quality(QualitySettings(data="prepared/phantom-512"))  # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import re
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from scipy import ndimage

from lsdm_aug.benchmarks.edge_profile import edge_profile, edge_profile_markdown
from lsdm_aug.config import FEATURES, rating_level
from lsdm_aug.data.phantom import ChestPhantom, PhantomConfig, free_site
from lsdm_aug.data.prepared import (PreparedDataset, atomic_write_figure, atomic_write_npz, atomic_write_text,
                                    hu_to_unit, unit_to_hu)
from lsdm_aug.data.semantic import SemanticLabel, semantic_map_from_hu
from lsdm_aug.editing import DEFAULT_MAX_REDRAWS, NOT_CALCIFIED, SATURATED_HU, ModelGrid, checked_max_redraws
from lsdm_aug.lifetime import exit_with_parent
from lsdm_aug.metrics.auc import auc_interval, roc_auc
from lsdm_aug.metrics.evaluator import NoduleEvaluator, nodule_crops
from lsdm_aug.metrics.features import frechet_distance
from lsdm_aug.models.checkpoint import module_digest, resolve_model_dir, weights_digest
from lsdm_aug.models.unet import conditioned_features, predict_noise
from lsdm_aug.pipeline import LSDMPipeline
from lsdm_aug.progress import track_progress
from lsdm_aug.sampling.schedulers import build_scheduler
from lsdm_aug.training.autoencoder import reconstruction_metrics
from lsdm_aug.transforms.core import choose_outline, nodule_outline, usable_nodule, usable_nodule_table

__all__ = ["QualitySettings", "run_model_quality", "quality_markdown", "GuidanceSetting", "guidance_grid"]

AUC_RESAMPLES = 1000  # bootstrap resamples of each control AUC's interval
RIM_MM = 1.4  # a nodule's rim in the texture section: its outer 1.4 mm (2 px at 0.7 mm)


@dataclass(frozen=True)
class GuidanceSetting:
    """One way of steering: classifier guidance ``s`` and classifier-free guidance ``w``; ``raw_targets`` guides
    the regressions to the requested ratings themselves instead of their calibrated targets."""

    name: str
    guidance_scale: float
    cfg_scale: float
    raw_targets: bool = False


DEFAULT_SETTINGS = (GuidanceSetting("none", 0.0, 0.0), GuidanceSetting("classifier s=1", 1.0, 0.0),
                    GuidanceSetting("classifier s=2", 2.0, 0.0), GuidanceSetting("classifier s=4", 4.0, 0.0),
                    GuidanceSetting("cfg w=1", 0.0, 1.0), GuidanceSetting("cfg w=2", 0.0, 2.0),
                    GuidanceSetting("cfg w=4", 0.0, 4.0), GuidanceSetting("both s=1 w=2", 1.0, 2.0),
                    GuidanceSetting("both s=1 w=1", 1.0, 1.0),  # appended: earlier settings keep their section
                    GuidanceSetting("both s=1 w=1, raw targets", 1.0, 1.0, raw_targets=True),
                    GuidanceSetting("cfg w=1.5", 0.0, 1.5), GuidanceSetting("both s=1 w=1.5", 1.0, 1.5))


@contextlib.contextmanager
def _targets_of(pipe: LSDMPipeline, setting: GuidanceSetting) -> Iterator[LSDMPipeline]:
    """``pipe`` guiding to calibrated targets or, for a ``raw_targets`` setting, to the requested ratings."""
    before = pipe.calibrated_targets
    pipe.calibrated_targets = not setting.raw_targets
    try:
        yield pipe
    finally:
        pipe.calibrated_targets = before


@dataclass
class QualitySettings:
    """What :func:`run_model_quality` measures.

    Args:
        data: prepared phantom dataset (its test split is used; its train split trains the evaluators).
        model: "default", a shipped name or a model folder.
        out: report folder.
        count: insertions per requested level and setting (48: a control AUC's 95 % interval spans about +-0.11;
            at 16 about +-0.19).
        steps: DDIM steps.
        settings: the guidance settings compared (names, s, w).
        other_spacings: extra pixel spacings (mm) for the insertion gates, with the phantom slice size used.
        evaluator_steps: training steps of each evaluator.
        seed: seeds backgrounds, sites and diffusion.
        max_redraws: the pipeline's redraws of a saturated nodule told "not calcified" (0: report first draws).
    """

    data: str
    model: str = "default"
    out: str = "reports/model_quality"
    count: int = 48
    steps: int = 20
    settings: tuple[GuidanceSetting, ...] = DEFAULT_SETTINGS
    other_spacings: tuple[tuple[float, int], ...] = ((0.5, 512), (0.9, 512), (2.7, 128))
    evaluator_steps: int = 600
    seed: int = 0
    generated_slices: int = 8
    features: tuple[str, ...] = FEATURES
    max_redraws: int = DEFAULT_MAX_REDRAWS

    def __post_init__(self) -> None:
        if self.count < 2:
            raise ValueError(f"count must be >= 2 (an AUC needs both classes), got {self.count!r}")
        if not 1 <= self.steps <= 1000:
            raise ValueError(f"steps must be in 1..1000, got {self.steps!r}")
        self.max_redraws = checked_max_redraws(self.max_redraws)
        unknown = sorted(set(self.features) - set(FEATURES))
        if unknown:
            raise ValueError(f"features must be among {FEATURES}, got {unknown}")


# ---- autoencoder -------------------------------------------------------------------------------------------------

def autoencoder_quality(pipe: LSDMPipeline, test: PreparedDataset, limit: int = 32, min_diameter_mm: float = 5.0
                        ) -> dict[str, Any]:
    """Whole-slice SSIM / PSNR, and the share of nodule-to-lung contrast kept for nodules of >= ``min_diameter_mm``."""
    ids = test.case_ids()[:limit]
    images = torch.from_numpy(np.stack([test[c]["image"] for c in ids])).unsqueeze(1)
    metrics = reconstruction_metrics(pipe.autoencoder, images.to(pipe.device))
    kept = []
    for case_id in test.features.case_id.unique()[:limit]:
        case = test[case_id]
        with torch.no_grad():
            recon = pipe.autoencoder.reconstruct(pipe._tensor(case["image"])).clamp(-1, 1)[0, 0].cpu().numpy()
        for k, nodule in enumerate(case["nodules"], start=1):
            mask = case["nodule_mask"] == k
            if nodule["diameter_mm"] < min_diameter_mm or nodule.get("texture", 5) < 2 or not mask.any():
                continue
            ring = ndimage.binary_dilation(mask, iterations=3) & ~mask & case["lung_mask"]
            if not ring.any():
                continue
            real = unit_to_hu(case["image"])
            contrast = real[mask].mean() - real[ring].mean()
            if contrast > 100:
                rec = unit_to_hu(recon)
                kept.append(float((rec[mask].mean() - rec[ring].mean()) / contrast))
    return {**metrics, "slices": len(ids), "nodule_contrast_kept": float(np.median(kept)) if kept else None,
            "nodules_measured": len(kept)}


def feature_sensitivity(pipe: LSDMPipeline, test: PreparedDataset, count: int = 8, seed: int = 0,
                        timesteps: tuple[int, ...] = (100, 500, 900)) -> dict[str, Any] | None:
    """How much the feature vector moves the U-Net (what classifier-free guidance can amplify): on ``count``
    windows of the edit size around test nodules, the norm of eps(texture 5) - eps(texture 1), and of
    eps(texture 1) - eps(not given), relative to the norm of eps(not given), at each of ``timesteps``. None for a
    U-Net without feature conditioning."""
    if not pipe.feature_conditioned:
        return None
    from lsdm_aug.models.unet import feature_levels

    size = min(pipe.window_px, pipe.recipe.image_size)
    scheduler = build_scheduler(pipe.recipe.diffusion, "ddpm", 1000)
    generator = torch.Generator().manual_seed(seed)
    ratios: dict[int, dict[str, list[float]]] = {t: {"texture 5 - texture 1": [], "texture 1 - not given": []}
                                                 for t in timesteps}
    for row in test.features.head(count).itertuples():
        case = test[row.case_id]
        top = int(np.clip(round(row.centre_row) - size // 2, 0, case["image"].shape[0] - size))
        left = int(np.clip(round(row.centre_col) - size // 2, 0, case["image"].shape[1] - size))
        window = (slice(top, top + size), slice(left, left + size))
        with torch.no_grad():
            latent = pipe.encode(torch.as_tensor(case["image"][window], dtype=torch.float32)[None, None].to(pipe.device))
            condition = pipe.condition(torch.as_tensor(case["semantic_map"][window])[None, None].long().to(pipe.device))
            noise = torch.randn(latent.shape, generator=generator).to(latent.device)
            for t in timesteps:
                step = torch.tensor([t], device=latent.device)
                noisy = scheduler.add_noise(latent, noise, step)
                eps = {name: predict_noise(pipe.unet, noisy, step, condition.with_features(
                    None if levels is None else feature_levels(levels, names=conditioned_features(pipe.unet))
                    .to(latent.device)))
                    for name, levels in (("null", None), ("low", {"texture": 1}), ("high", {"texture": 5}))}
                base = float(eps["null"].norm())
                ratios[t]["texture 5 - texture 1"].append(float((eps["high"] - eps["low"]).norm()) / base)
                ratios[t]["texture 1 - not given"].append(float((eps["low"] - eps["null"]).norm()) / base)
    return {"windows": count, "window_px": size,
            "relative_change": {str(t): {k: float(np.mean(v)) for k, v in r.items()} for t, r in ratios.items()}}


# ---- generation and insertion ------------------------------------------------------------------------------------

def generated_lung_hu(pipe: LSDMPipeline, test: PreparedDataset, count: int, steps: int, seed: int) -> dict[str, Any]:
    """Mean HU of label-4 lung in whole slices generated (unguided) from held-out maps."""
    ids = test.case_ids()[:count]
    cases = [test[c] for c in ids]
    images = pipe.generate(np.stack([c["semantic_map"] for c in cases]), spacing_mm=[c["spacing_mm"] for c in cases],
                           steps=steps, guidance_scale=0.0, cfg_scale=0.0, seed=seed)
    lung = [float(unit_to_hu(image)[case["semantic_map"] == SemanticLabel.LUNG].mean())
            for image, case in zip(images, cases)]
    real = [float(unit_to_hu(c["image"])[c["semantic_map"] == SemanticLabel.LUNG].mean()) for c in cases]
    return {"slices": len(cases), "generated_lung_mean_hu": float(np.mean(lung)), "real_lung_mean_hu": float(np.mean(real))}


@dataclass
class Background:
    """A nodule-free slice to insert into: unit image, semantic map, lung, spacing."""

    image: np.ndarray
    semantic_map: np.ndarray
    lung: np.ndarray
    spacing_mm: float


def test_backgrounds(test: PreparedDataset, count: int) -> list[Background]:
    ids = test.cases[test.cases.n_nodules == 0].case_id.tolist()[:count]
    return [Background(c["image"], c["semantic_map"], c["semantic_map"] == SemanticLabel.LUNG, float(c["spacing_mm"]))
            for c in (test[i] for i in ids)]


def phantom_backgrounds(spacing_mm: float, size: int, count: int, seed: int) -> list[Background]:
    """Nodule-free phantom slices drawn at ``spacing_mm`` (patients far beyond any training set's)."""
    phantom = ChestPhantom(PhantomConfig(size=size, spacing="fov", nodule_free_fraction=1.0))
    out = []
    for k in range(count):
        ct = phantom.background(900_000 + k, 0.3 + 0.4 * (k % 5) / 4, seed=seed, spacing_mm=spacing_mm)
        semantic = semantic_map_from_hu(ct.hu, spacing_mm=spacing_mm)
        out.append(Background(hu_to_unit(ct.hu), semantic, semantic == SemanticLabel.LUNG, spacing_mm))
    return out


@dataclass
class Inserted:
    """What a batch of insertions gave: crops for the evaluators, HU statistics inside each nodule."""

    crops: np.ndarray
    mean_hu: np.ndarray
    p90_hu: np.ndarray
    non_calcified: np.ndarray  # the outline's source nodule is not calcified (LIDC calcification 6)
    seconds: float = 0.0
    request_index: np.ndarray | None = None  # which request each row answers (a request without room is left out)
    core_hu: np.ndarray | None = None  # mean HU deeper than RIM_MM inside each nodule (nan: a nodule all rim)
    rim_hu: np.ndarray | None = None  # mean HU of each nodule's outer RIM_MM
    redraws: np.ndarray | None = None  # how often the pipeline drew each nodule again (saturated, not calcified)
    spacing_mm: np.ndarray | None = None  # the pixel spacing of the background each nodule went into


def core_and_rim_hu(hu: np.ndarray, mask: np.ndarray, spacing_mm: float, rim_mm: float = RIM_MM
                    ) -> tuple[float, float]:
    """Mean HU of a nodule's core (``mask`` eroded by ``rim_mm``, at least one pixel) and of its rim (the rest
    of ``mask``): whether an inserted nodule's mean departs from the phantom's inside or at the edge. nan for an
    empty part.

    Example:
        >>> hu = np.full((9, 9), -800.0); mask = np.zeros((9, 9), bool); mask[2:7, 2:7] = True; hu[4, 4] = 0.0
        >>> core_and_rim_hu(hu, mask, spacing_mm=0.7)  # a 1.4 mm rim: 2 px
        (0.0, -800.0)
    """
    if not (spacing_mm > 0 and rim_mm > 0):
        raise ValueError(f"spacing_mm and rim_mm must be > 0, got {spacing_mm!r} and {rim_mm!r}")
    core = ndimage.binary_erosion(mask, iterations=max(1, round(rim_mm / spacing_mm)))
    rim = mask & ~core
    return tuple(float(hu[part].mean()) if part.any() else float("nan") for part in (core, rim))


def _outline(nodule_id: str, spacing_mm: float) -> np.ndarray:
    """The nodule's centre-slice outline at ``spacing_mm`` (as the transforms draw it)."""
    return nodule_outline(nodule_id, (spacing_mm, spacing_mm), 2, None)[:, :, 0]


def insert_requests(pipe: LSDMPipeline, backgrounds: list[Background], requests: list[dict[str, float]],
                    setting: GuidanceSetting, steps: int, seed: int, crop_px: int, crop_spacing_mm: float,
                    outline_features: list[dict[str, float]] | None = None,
                    non_calcified_only: bool = False, nodule_ids: list[str] | None = None) -> Inserted:
    """Insert one nodule per request into the backgrounds in turn (the outline chosen by the request's shape
    features, or by ``outline_features``, or given as ``nodule_ids``; among non-calcified LIDC nodules only with
    ``non_calcified_only``);
    crops resampled to ``crop_spacing_mm`` for the evaluators. A U-Net conditioned on calcification is told the
    calcification of the outline's source nodule (the pipeline's ``conditioning``: a request as that real nodule
    would make it, used under classifier-free guidance), unless the request gives one."""
    table = usable_nodule_table()
    if non_calcified_only:
        table = table[rating_level(table.calcification.to_numpy(), 6) == NOT_CALCIFIED]
    rng = np.random.RandomState(seed)
    crops, mean_hu, p90_hu, non_calcified, answered, core_rim, redraws, spacings = [], [], [], [], [], [], [], []
    started = time.perf_counter()
    for i, request in enumerate(requests):
        if nodule_ids is None:
            nodule_id, _ = choose_outline(table, (outline_features or requests)[i], None, rng)
        else:
            nodule_id = nodule_ids[i]
        for attempt in range(len(backgrounds)):  # the next background when this one has no room in its lung
            background = backgrounds[(i + attempt) % len(backgrounds)]
            outline = _outline(nodule_id, background.spacing_mm)
            site = free_site(background.lung, outline, background.spacing_mm, np.random.default_rng([seed, i]))
            if site is not None:
                break
        if site is None:
            continue
        source_level = float(rating_level(usable_nodule(nodule_id).calcification, 6))
        centre = (site[0] + outline.shape[0] / 2, site[1] + outline.shape[1] / 2)
        with _targets_of(pipe, setting):
            result = pipe.insert(background.image, background.semantic_map, outline, centre, request,
                                 spacing_mm=background.spacing_mm, steps=steps, guidance_scale=setting.guidance_scale,
                                 cfg_scale=setting.cfg_scale, seed=seed * 7919 + i,
                                 conditioning={"calcification": source_level})
        mask = result.nodule_mask > 0
        hu = unit_to_hu(result.image)
        mean_hu.append(float(hu[mask].mean()))
        p90_hu.append(float(np.percentile(hu[mask], 90)))
        core_rim.append(core_and_rim_hu(hu, mask, background.spacing_mm))
        non_calcified.append(source_level == NOT_CALCIFIED)
        redraws.append(int(result.record.get("redraws", 0)))
        spacings.append(background.spacing_mm)
        answered.append(i)
        rows, cols = np.nonzero(mask)
        zoom = background.spacing_mm / crop_spacing_mm
        image = ndimage.zoom(result.image, zoom, order=1) if abs(zoom - 1) > 0.02 else result.image
        crops.append(nodule_crops(image[None], [(rows.mean() * zoom, cols.mean() * zoom)], crop_px)[0])
    seconds = (time.perf_counter() - started) / max(len(requests), 1)
    core_rim = np.array(core_rim, float).reshape(-1, 2)
    return Inserted(np.stack(crops), np.array(mean_hu), np.array(p90_hu), np.array(non_calcified, bool), seconds,
                    np.array(answered, int), core_rim[:, 0], core_rim[:, 1], np.array(redraws, int),
                    np.array(spacings, float))


def _auc_with_interval(high: np.ndarray, low: np.ndarray, seed: int) -> tuple[float, list[float]]:
    """The AUC of ``high`` against ``low`` and its 95 % bootstrap interval (each class resampled
    :data:`AUC_RESAMPLES` times)."""
    return roc_auc(high, low), list(auc_interval(high, low, resamples=AUC_RESAMPLES, seed=seed))


def _frechet(evaluator: NoduleEvaluator, crops: np.ndarray, real: np.ndarray) -> float:
    return frechet_distance(evaluator.features(real), evaluator.features(crops))


LOW_HIGH = {"malignancy": ((1.0, 2.0), (4.0, 5.0))}


def _levels(feature: str, count: int, high: bool) -> list[float]:
    pair = LOW_HIGH.get(feature, ((1.0,), (5.0,)))[int(high)]
    return [pair[i % len(pair)] for i in range(count)]


def control_setting(pipe: LSDMPipeline, evaluators: dict[str, NoduleEvaluator], backgrounds: list[Background],
                    settings: QualitySettings, setting: GuidanceSetting, crop_spacing_mm: float,
                    real_crops: np.ndarray) -> dict[str, Any]:
    """One guidance setting: per feature the evaluator AUC of level 1 vs 5 requested (malignancy 1-2 vs 4-5), the
    outline chosen by the requested shape features; the saturated share; guidance alone on shared outlines."""
    crop_px = pipe.recipe.classifiers.crop_px
    aucs, intervals, saturated = {}, {}, []
    for feature in settings.features:
        results = {}
        for high in (False, True):
            requests = [{feature: v} for v in _levels(feature, settings.count, high)]
            results[high] = insert_requests(pipe, backgrounds, requests, setting, settings.steps, settings.seed,
                                            crop_px, crop_spacing_mm)
        scores = {h: evaluators[feature].high_probability(r.crops) for h, r in results.items()}
        aucs[feature], intervals[feature] = _auc_with_interval(scores[True], scores[False], settings.seed)
        both = np.concatenate([results[False].p90_hu[results[False].non_calcified],
                               results[True].p90_hu[results[True].non_calcified]])
        saturated.extend((both >= SATURATED_HU).tolist())
    shared = [{} for _ in range(settings.count)]  # outlines drawn without regard to malignancy
    malignant = insert_requests(pipe, backgrounds, [{"malignancy": 5.0}] * settings.count, setting, settings.steps,
                                settings.seed + 1, crop_px, crop_spacing_mm, shared)
    benign = insert_requests(pipe, backgrounds, [{"malignancy": 1.0}] * settings.count, setting, settings.steps,
                             settings.seed + 1, crop_px, crop_spacing_mm, shared)
    judge = evaluators["malignancy"]
    auc, interval = _auc_with_interval(judge.high_probability(malignant.crops), judge.high_probability(benign.crops),
                                       settings.seed)
    alone = {"setting": setting.name, "auc": auc, "auc_interval": interval,
             "nodule_frechet": _frechet(judge, np.concatenate([malignant.crops, benign.crops]), real_crops),
             "seconds_per_insertion": malignant.seconds}
    return {"per_feature": aucs, "per_feature_interval": intervals,
            "saturated": float(np.mean(saturated)) if saturated else None, "guidance_alone": alone}


def control_table(parts: list[dict[str, Any]]) -> dict[str, Any]:
    """The settings' :func:`control_setting` results as one table (Fréchet relative to the first, no guidance)."""
    table: dict[str, Any] = {"per_feature": {}, "per_feature_interval": {}, "guidance_alone": [], "saturated": {}}
    for part in parts:
        name = part["guidance_alone"]["setting"]
        for feature, auc in part["per_feature"].items():
            table["per_feature"].setdefault(feature, {})[name] = auc
            interval = part.get("per_feature_interval", {}).get(feature)  # None in a section of an earlier version
            table["per_feature_interval"].setdefault(feature, {})[name] = interval
        table["saturated"][name] = part["saturated"]
        table["guidance_alone"].append(dict(part["guidance_alone"]))
    base = table["guidance_alone"][0]["nodule_frechet"]
    for point in table["guidance_alone"]:
        point["frechet_vs_none"] = point["nodule_frechet"] / base
    return table


def guidance_grid(pipe: LSDMPipeline, background: Background, settings: tuple[GuidanceSetting, ...], steps: int,
                  seed: int, crop_px: int) -> np.ndarray:
    """Crops (rows: malignancy 1..5 requested; columns: the guidance settings) of one outline at one site with
    one seed, in HU: what each way of steering does to the same nodule."""
    rng = np.random.RandomState(seed)
    nodule_id, _ = choose_outline(usable_nodule_table(), {"malignancy": 3.0}, None, rng)
    outline = _outline(nodule_id, background.spacing_mm)
    site = free_site(background.lung, outline, background.spacing_mm, np.random.default_rng(seed))
    if site is None:
        raise ValueError("the grid's background has no room in its lung for the outline")
    centre = (site[0] + outline.shape[0] / 2, site[1] + outline.shape[1] / 2)
    grid = np.zeros((5, len(settings), crop_px, crop_px), np.float32)
    for row, level in enumerate(range(1, 6)):
        for col, setting in enumerate(settings):
            with _targets_of(pipe, setting):
                result = pipe.insert(background.image, background.semantic_map, outline, centre,
                                     {"malignancy": float(level)}, spacing_mm=background.spacing_mm, steps=steps,
                                     guidance_scale=setting.guidance_scale, cfg_scale=setting.cfg_scale, seed=seed)
            grid[row, col] = unit_to_hu(nodule_crops(result.image[None], [centre], crop_px)[0])
    return grid


def save_grid_png(path: Path, grid: np.ndarray, settings: tuple[GuidanceSetting, ...]) -> None:
    """The :func:`guidance_grid` as a PNG (lung window -1000..400 HU), rows and columns labelled."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows, cols = grid.shape[:2]
    figure, axes = plt.subplots(rows, cols, figsize=(1.4 * cols, 1.4 * rows), squeeze=False)
    for r in range(rows):
        for c in range(cols):
            axes[r, c].imshow(grid[r, c], cmap="gray", vmin=-1000, vmax=400)
            axes[r, c].set_xticks([]), axes[r, c].set_yticks([])
            if r == 0:
                axes[r, c].set_title(settings[c].name, fontsize=7)
            if c == 0:
                axes[r, c].set_ylabel(f"malignancy {r + 1}", fontsize=7)
    figure.tight_layout()
    atomic_write_figure(path, figure, dpi=110)
    plt.close(figure)


def texture_fidelity(pipe: LSDMPipeline, backgrounds: list[Background], test: PreparedDataset, count: int, steps: int,
                     seed: int, crop_spacing_mm: float) -> dict[str, Any]:
    """Inserted nodules' mean HU per requested texture level (default guidance) against the phantom's rendering
    of the same nodules, and the share of saturated ones.

    Paired: each request of level L inserts the outline of one of the phantom's non-calcified test nodules of
    level L (in turn), and its mean HU is compared with that very nodule's in the phantom, imaged at the pixel
    spacing it was inserted at (:func:`imaged_at`; its own slice's figures, ``phantom_native_mean_hu``, beside). A
    nodule's mean HU falls with its size (a thin rim of partial volume weighs more in a small one), and LIDC's
    ground-glass nodules are larger than its solid ones, so random outlines would compare other sizes than the
    phantom's; for the same reason a nodule imaged with 2.7 mm pixels reads darker than with 0.7 mm ones."""
    phantom: dict[int, list[tuple[str, str, int]]] = {}  # level -> (nodule id, case id, nodule index)
    for row in test.features.itertuples():
        if rating_level(getattr(row, "calcification", NOT_CALCIFIED), 6) != NOT_CALCIFIED:
            continue
        if (test[row.case_id]["nodule_mask"] == row.nodule_index).any():
            phantom.setdefault(rating_level(row.texture), []).append(
                (str(row.nodule_id), str(row.case_id), int(row.nodule_index)))
    native = functools.lru_cache(maxsize=None)(lambda case_id, index: _native_nodule(test, case_id, index))
    figures = functools.lru_cache(maxsize=None)(lambda case_id, index, spacing: _phantom_figures(
        *native(case_id, index), spacing))
    setting = GuidanceSetting("default", 1.0, pipe.default_cfg_scale)
    levels, saturated, first_draws = {}, [], []
    for level in range(1, 6):
        nodules = phantom.get(level, [])
        if not nodules:
            levels[str(level)] = {"inserted": 0, "phantom_nodules": 0, **_paired_means(None, np.empty((0, 3))),
                                  "phantom_native_mean_hu": None}
            continue
        chosen = [nodules[i % len(nodules)] for i in range(count)]
        result = insert_requests(pipe, backgrounds, [{"texture": float(level)}] * count, setting, steps, seed + level,
                                 pipe.recipe.classifiers.crop_px, crop_spacing_mm, non_calcified_only=True,
                                 nodule_ids=[nodule_id for nodule_id, *_ in chosen])
        pairs = np.array([figures(*chosen[i][1:], float(spacing))
                          for i, spacing in zip(result.request_index, result.spacing_mm)], float).reshape(-1, 3)
        native = [figures(*chosen[i][1:], None)[0] for i in result.request_index]
        levels[str(level)] = {"inserted": int(len(pairs)), "phantom_nodules": len(nodules),
                              **_paired_means(result, pairs),
                              "phantom_native_mean_hu": float(np.mean(native)) if native else None}
        saturated.extend((result.p90_hu >= SATURATED_HU).tolist())
        first_draws.extend(((result.redraws > 0) | (result.p90_hu >= SATURATED_HU)).tolist())
    return {"levels": levels, "saturated_share": float(np.mean(saturated)) if saturated else None,
            "first_draw_saturated_share": float(np.mean(first_draws)) if first_draws else None,
            "max_redraws": int(pipe.max_redraws), "paired": True, "phantom_imaged_at_insertion_spacing": True}


def _native_nodule(test: PreparedDataset, case_id: str, index: int) -> tuple[np.ndarray, np.ndarray, float]:
    """Test nodule ``index`` of ``case_id`` on its own slice: (HU, mask, spacing), read once per nodule."""
    case = test[case_id]
    return unit_to_hu(case["image"]), case["nodule_mask"] == index, float(case["spacing_mm"])


def _phantom_figures(hu: np.ndarray, mask: np.ndarray, own: float, spacing_mm: float | None
                     ) -> tuple[float, float, float]:
    """Mean, core and rim HU of a nodule (``mask`` on a slice of ``own`` mm pixels) imaged at ``spacing_mm``
    (None: its own)."""
    if spacing_mm is not None:
        hu, mask = imaged_at(hu, mask, own, spacing_mm)
    return float(hu[mask].mean()), *core_and_rim_hu(hu, mask, own if spacing_mm is None else spacing_mm)


def imaged_at(hu: np.ndarray, mask: np.ndarray, spacing_mm: float, target_mm: float
              ) -> tuple[np.ndarray, np.ndarray]:
    """A square slice (HU) and a nodule's mask as a scanner with ``target_mm`` pixels would image them: the edit
    path's own resampling (:class:`~lsdm_aug.editing.ModelGrid`: linear, Gaussian anti-aliasing when the pixels
    grow, which weighs the pixels a larger one covers as a detector integrates them, somewhat more widely); the
    mask the pixels whose centre lies in the nodule, as an outline is drawn at that spacing (its most covered pixel
    when none does). Within 2 % of the slice's own spacing, the slice itself.

    Example:
        >>> hu = np.full((64, 64), -800.0); mask = np.zeros((64, 64), bool); mask[28:32, 28:32] = True; hu[mask] = 0.0
        >>> coarse, small = imaged_at(hu, mask, 0.7, 2.8)  # 4 x 4 pixels of 0.7 mm: one pixel of 2.8 mm
        >>> coarse.shape, int(small.sum()), round(float(coarse[small].mean()))  # the lung around blurs in
        ((16, 16), 1, -422)
    """
    if hu.shape[0] != hu.shape[1] or mask.shape != hu.shape:
        raise ValueError(f"imaged_at needs a square slice and its mask, got {hu.shape} and {mask.shape}")
    scale = target_mm / spacing_mm
    if abs(scale - 1.0) <= 0.02:
        return hu, mask
    grid = ModelGrid(0.0, 0.0, int(hu.shape[0] / scale), scale)
    inside = grid.to_model(mask, order=0)  # the pixels whose centre lies in the nodule, as an outline is drawn
    if not inside.any():
        cover = grid.to_model(mask.astype(np.float32), order=1)
        if not cover.max() > 0:
            raise ValueError(f"the nodule lies outside the {grid.size_model_px} px grid of {target_mm} mm pixels")
        inside = cover == cover.max()
    return grid.to_model(hu, order=1), inside


def _paired_means(result: Inserted | None, pairs: np.ndarray) -> dict[str, Any]:
    """Mean, core and rim HU of the inserted nodules and of the same nodules in the phantom (``pairs``: their
    phantom mean, core and rim per inserted row). Cores are compared over the nodules that have one on both
    sides (``cored``); None where there is nothing to compare.

    Example:
        >>> inserted = Inserted(np.zeros((2, 1, 1)), np.array([-300.0, -100.0]), np.zeros(2), np.ones(2, bool),
        ...                     core_hu=np.array([np.nan, 0.0]), rim_hu=np.array([-300.0, -200.0]))
        >>> means = _paired_means(inserted, np.array([[-200.0, 50.0, -250.0], [-50.0, 40.0, -150.0]]))
        >>> means["inserted_core_hu"], means["phantom_core_hu"], means["cored"]  # the first has no inserted core
        (0.0, 40.0, 1)
    """
    parts = [f"{who}_{part}_hu" for who in ("inserted", "phantom") for part in ("mean", "core", "rim")]
    if result is None or not len(pairs):
        return {**dict.fromkeys(parts), "cored": 0}
    cored = np.isfinite(result.core_hu) & np.isfinite(pairs[:, 1])
    values = (result.mean_hu, result.core_hu[cored], result.rim_hu, pairs[:, 0], pairs[cored, 1], pairs[:, 2])
    return {**{name: float(v.mean()) if len(v) else None for name, v in zip(parts, values)}, "cored": int(cored.sum())}


def insertion_speed(pipe: LSDMPipeline, background: Background, steps: int, repeats: int = 5) -> dict[str, float]:
    """Median seconds of an unguided local insertion and of generating the whole slice, at the same DDIM steps,
    one after the other in one run (after one warm-up each), and their ratio."""
    outline = _outline(choose_outline(usable_nodule_table(), {"malignancy": 4.0}, 8.0, np.random.RandomState(0))[0],
                       background.spacing_mm)
    site = free_site(background.lung, outline, background.spacing_mm, np.random.default_rng(0))
    centre = (site[0] + outline.shape[0] / 2, site[1] + outline.shape[1] / 2)
    timings = {}
    for name, run in (("insert", lambda: pipe.insert(background.image, background.semantic_map, outline, centre,
                                                       {"malignancy": 4.0}, spacing_mm=background.spacing_mm,
                                                       steps=steps, guidance_scale=0.0, cfg_scale=0.0)),
                      ("whole_slice", lambda: pipe.generate(background.semantic_map, spacing_mm=background.spacing_mm,
                                                            steps=steps, guidance_scale=0.0, cfg_scale=0.0))):
        timings[f"{name}_seconds"] = _median_seconds(run, repeats)
    timings["whole_slice_over_insert"] = timings["whole_slice_seconds"] / timings["insert_seconds"]
    timings |= _insertion_parts(pipe, repeats)
    timings |= {"torch_threads": torch.get_num_threads(), "repeats": repeats}
    return timings


def _median_seconds(run: Callable[[], Any], repeats: int) -> float:
    """Median wall time of ``repeats`` calls of ``run``, after one warm-up call."""
    run()
    seconds = []
    for _ in range(repeats):
        started = time.perf_counter()
        run()
        seconds.append(time.perf_counter() - started)
    return float(np.median(seconds))


def _insertion_parts(pipe: LSDMPipeline, repeats: int) -> dict[str, float]:
    """Why insertion is not (512 / window)^2 cheaper: one U-Net step on the edit window's latents and on the
    whole slice's, and the encoding of the window's own image, which in-painting needs and generation does not."""
    window, whole = pipe.window_px // pipe.factor, 512 // pipe.factor
    device = pipe.device
    condition = pipe.condition(torch.ones(1, 1, window * pipe.factor, window * pipe.factor, dtype=torch.long,
                                          device=device), [{}])
    condition_whole = pipe.condition(torch.ones(1, 1, 512, 512, dtype=torch.long, device=device), [{}])
    channels = pipe.recipe.autoencoder.latent_channels
    step = torch.tensor([500], device=device)
    with torch.no_grad():
        return {"window_px": pipe.window_px,
                "unet_step_window_seconds": _median_seconds(lambda: predict_noise(
                    pipe.unet, torch.zeros(1, channels, window, window, device=device), step, condition), repeats),
                "unet_step_whole_seconds": _median_seconds(lambda: predict_noise(
                    pipe.unet, torch.zeros(1, channels, whole, whole, device=device), step, condition_whole), repeats),
                "encode_window_seconds": _median_seconds(lambda: pipe.encode(torch.zeros(
                    1, 1, window * pipe.factor, window * pipe.factor, device=device)), repeats)}


# ---- the report --------------------------------------------------------------------------------------------------

# Sections that insert nodules or generate are kept under a key with this version: raise it when the edit path or
# what such a section measures changes, so that a rerun remakes them instead of mixing old sections with new ones
# (2: edit windows returned anti-aliased; texture compared with the phantom imaged at the insertion's spacing).
INSERTION_VERSION = 2


def _key(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()[:12]


EXPLICIT_SECTIONS = ("guidance_grid", "feature_sensitivity", "generated_lung")  # every guidance scale given explicitly


def _explicit(name: str) -> bool:
    """Whether section ``name`` passes every guidance scale itself (these, and the guidance settings ``control_<k>``)."""
    return name in EXPLICIT_SECTIONS or re.fullmatch(r"control_\d+", name) is not None


class Parts:
    """Finished sections of one run, kept as JSON under ``out/parts-<settings and model hash>/``: a rerun with the
    same settings and model skips them (each written atomically, so an interruption loses only the section running).

    Sections that do not depend on the whole model live apart, so that another U-Net reuses them: the evaluators
    (trained on clean phantom crops only) under ``out/evaluators-<settings hash>/``, and the autoencoder's gates
    under ``out/autoencoder-<settings and autoencoder hash>/`` (``autoencoder_id``: a digest of its weights).
    Sections that pass every guidance scale explicitly (the guidance settings and :data:`EXPLICIT_SECTIONS`) live
    under ``out/explicit-<settings and weights hash>/`` when ``weights_id`` is given (a digest that leaves the model's
    default cfg scale out): the same ``--model`` with another default reuses them (one finished under ``parts-`` by an
    earlier version is read from there).
    """

    def __init__(self, out: Path, settings: QualitySettings, model_id: str, autoencoder_id: str | None = None,
                 weights_id: str | None = None) -> None:
        self.folder = out / f"parts-{_key([asdict(settings), model_id, INSERTION_VERSION])}"
        model_free = {k: v for k, v in asdict(settings).items()
                      if k not in ("model", "settings", "max_redraws")}  # nor guidance, nor the pipeline's redraws
        self.evaluator_folder = out / f"evaluators-{_key(model_free)}"
        self.autoencoder_folder = (out / f"autoencoder-{_key([model_free, autoencoder_id])}" if autoencoder_id
                                   else self.folder)
        self.explicit_folder = (out / f"explicit-{_key([asdict(settings), weights_id, INSERTION_VERSION])}" if weights_id
                                else self.folder)
        for folder in (self.folder, self.evaluator_folder, self.autoencoder_folder, self.explicit_folder):
            folder.mkdir(parents=True, exist_ok=True)

    def _folder_of(self, name: str, suffix: str = ".json") -> Path:
        if not _explicit(name) or (self.folder / f"{name}{suffix}").is_file():
            return self.folder
        return self.explicit_folder

    def get(self, name: str, compute: Callable[[], Any], folder: Path | None = None) -> Any:
        path = (folder or self._folder_of(name)) / f"{name}.json"
        if path.is_file():
            return json.loads(path.read_text())
        value = compute()
        atomic_write_text(path, json.dumps(value, indent=1, default=float))
        return json.loads(path.read_text())

    def array(self, name: str, compute: Callable[[], np.ndarray]) -> np.ndarray:
        path = self._folder_of(name, ".npz") / f"{name}.npz"
        if path.is_file():
            with np.load(path) as saved:
                return saved["array"]
        value = compute()
        atomic_write_npz(path, array=value)
        return value

    def claim(self, name: str) -> bool:
        """Take section ``name`` for this process (``workers`` > 1): False when it is finished or another process
        has taken it. A claim is a file created exclusively; :meth:`clear_claims` drops them at a run's start."""
        folder = self._folder_of(name)
        if (folder / f"{name}.json").is_file():
            return False
        try:
            os.close(os.open(folder / f"{name}.claim", os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        except FileExistsError:
            return False
        return True

    def clear_claims(self) -> None:
        for folder in {self.folder, self.explicit_folder}:
            for claim in folder.glob("*.claim"):
                claim.unlink(missing_ok=True)

    def evaluator(self, feature: str, train: Callable[[], tuple[NoduleEvaluator, dict]]) -> tuple[NoduleEvaluator, dict]:
        path = self.evaluator_folder / f"evaluator_{feature}.safetensors"
        if path.is_file():
            return NoduleEvaluator.load(path)
        evaluator, report = train()
        evaluator.save(path, report)
        return evaluator, report


@dataclass
class _Context:
    """What every section of a run needs, built the same way in each process."""

    settings: QualitySettings
    pipe: LSDMPipeline
    parts: Parts
    test: PreparedDataset
    backgrounds: list[Background]
    crop_spacing: float

    @classmethod
    def build(cls, settings: QualitySettings) -> _Context:
        torch.manual_seed(settings.seed)
        pipe = LSDMPipeline.from_pretrained(settings.model, max_redraws=settings.max_redraws)
        parts = Parts(Path(settings.out), settings, pipe.model_id,
                      autoencoder_id=module_digest(pipe.autoencoder, pipe.scale_factor),
                      weights_id=weights_digest(resolve_model_dir(settings.model), leave_out=("default_cfg_scale",)))
        test = PreparedDataset(settings.data, split="test")
        return cls(settings, pipe, parts, test, test_backgrounds(test, max(settings.count, 8)),
                   float(np.median(test.cases.spacing_mm)))

    def evaluators(self, progress: bool = False) -> tuple[dict[str, NoduleEvaluator], dict[str, dict]]:
        crop_px = self.pipe.recipe.classifiers.crop_px
        evaluators, reports = {}, {}
        for feature in track_progress(self.settings.features, "evaluators", enabled=progress):
            train = functools.partial(NoduleEvaluator.train, self.settings.data, crop_px=crop_px,
                                      steps=self.settings.evaluator_steps, seed=self.settings.seed, feature=feature)
            evaluators[feature], reports[feature] = self.parts.evaluator(feature, train)
        return evaluators, reports

    def real_crops(self) -> np.ndarray:
        reference = PreparedDataset(self.settings.data)  # real phantom nodules of every split: the Fréchet reference
        rows = reference.features.head(400)
        return nodule_crops(np.stack([reference[c]["image"] for c in rows.case_id]),
                            list(zip(rows.centre_row, rows.centre_col)), self.pipe.recipe.classifiers.crop_px)

    def spacing_sections(self) -> list[tuple[str, Callable[[], Any]]]:
        """The insertion gates at the other spacings, one section each."""
        s = self.settings
        return [(f"spacing_{spacing:g}", lambda sp=spacing, px=size: {
            "slice_px": px, **texture_fidelity(self.pipe, phantom_backgrounds(sp, px, 6, s.seed), self.test,
                                               max(s.count // 2, 2), s.steps, s.seed, self.crop_spacing)})
                for spacing, size in s.other_spacings]

    def control_sections(self, evaluators: dict[str, NoduleEvaluator], real_crops: np.ndarray
                         ) -> list[tuple[str, Callable[[], Any]]]:
        """One section per guidance setting (:func:`control_setting`)."""
        return [(f"control_{k}", lambda g=setting: control_setting(self.pipe, evaluators, self.backgrounds,
                                                                   self.settings, g, self.crop_spacing, real_crops))
                for k, setting in enumerate(self.settings.settings)]


def _work_through(context: _Context, sections: list[tuple[str, Callable[[], Any]]], description: str = "",
                  progress: bool = False) -> None:
    """Compute, in order, the sections no other process has taken (a progress bar over them with ``progress``)."""
    for name, compute in track_progress(sections, description, enabled=progress):
        if context.parts.claim(name):
            context.parts.get(name, compute)


def _helper(settings: QualitySettings) -> None:
    """A second process of :func:`run_model_quality` (``workers`` = 2): the sections the main process reaches last,
    from the end (the other spacings, then the guidance settings backwards, once the evaluators exist). It ends with
    the main process, also when that one is killed by a signal."""
    exit_with_parent()
    torch.set_num_threads(1)
    context = _Context.build(settings)
    _work_through(context, context.spacing_sections()[::-1])
    folder = context.parts.evaluator_folder
    while not all((folder / f"evaluator_{f}.safetensors").is_file() for f in settings.features):
        time.sleep(5)
    evaluators, _ = context.evaluators()
    _work_through(context, context.control_sections(evaluators, context.real_crops())[::-1])


def run_model_quality(settings: QualitySettings, progress: bool = True, workers: int = 1) -> dict[str, Any]:
    """Measure every gate and write ``model_quality.md`` / ``.json`` and ``guidance_grid.png`` into
    ``settings.out``; an interrupted run resumes from its finished sections. ``workers`` = 2 runs a second process
    (one torch thread each) that takes the guidance settings and spacings from the end while this one takes them
    from the start; the figures are the same as with one."""
    if workers not in (1, 2):
        raise ValueError(f"workers must be 1 or 2, got {workers!r}")
    context = _Context.build(settings)
    pipe, parts = context.pipe, context.parts
    helper = None
    if workers == 2:
        import multiprocessing

        torch.set_num_threads(1)
        parts.clear_claims()
        helper = multiprocessing.get_context("spawn").Process(target=_helper, args=(settings,), daemon=True)
        helper.start()
    evaluators, evaluator_reports = context.evaluators(progress)
    real_crops = context.real_crops()
    report: dict[str, Any] = {"settings": asdict(settings), "model": pipe.model_id,
                              "model_spacing_mm": pipe.spacing_mm, "default_cfg_scale": pipe.default_cfg_scale,
                              "evaluators": evaluator_reports}
    report["autoencoder"] = parts.get("autoencoder", lambda: autoencoder_quality(pipe, context.test),
                                      parts.autoencoder_folder)
    report["generated_lung"] = parts.get("generated_lung", lambda: generated_lung_hu(
        pipe, context.test, settings.generated_slices, settings.steps, settings.seed))
    report["texture"] = parts.get("texture", lambda: texture_fidelity(
        pipe, context.backgrounds, context.test, settings.count, settings.steps, settings.seed, context.crop_spacing))
    report["edge_profile"] = parts.get("edge_profile", lambda: edge_profile(
        pipe, context.test, settings.count, settings.steps, settings.seed))
    report["feature_sensitivity"] = parts.get("feature_sensitivity", lambda: feature_sensitivity(
        pipe, context.test, seed=settings.seed))
    controls, spacings = context.control_sections(evaluators, real_crops), context.spacing_sections()
    if helper is not None:
        _work_through(context, [*controls, *spacings], "guidance settings and spacings", progress)
        helper.join()
        if helper.exitcode != 0:
            raise RuntimeError(f"the second model-quality process failed (exit code {helper.exitcode})")
    report["control"] = control_table([parts.get(name, compute)
                                       for name, compute in track_progress(controls, "guidance settings",
                                                                           progress and helper is None)])
    report["other_spacings"] = {name.removeprefix("spacing_"): parts.get(name, compute) for name, compute in spacings}
    grid = parts.array("guidance_grid", lambda: guidance_grid(pipe, context.backgrounds[0], settings.settings,
                                                              settings.steps, settings.seed,
                                                              pipe.recipe.classifiers.crop_px))
    out = Path(settings.out)
    save_grid_png(out / "guidance_grid.png", grid, settings.settings)
    report["speed"] = insertion_speed(pipe, context.backgrounds[0], settings.steps)
    atomic_write_text(out / "model_quality.json", json.dumps(report, indent=1, default=float))
    atomic_write_text(out / "model_quality.md", quality_markdown(report))
    return report


def _fmt(value: Any, spec: str = ".3f") -> str:
    return "n/a" if value is None else format(value, spec)


def _interval(interval: list[float] | None, spec: str = ".3f") -> str:
    """`` [low, high]`` of a 95 % interval, or nothing for a section of an earlier version that has none."""
    return "" if interval is None else f" [{interval[0]:{spec}}, {interval[1]:{spec}}]"


def _default_setting(report: dict[str, Any]) -> str | None:
    """The name of the compared setting that is the model's default (s = 1, w = its default cfg_scale, calibrated
    targets), if the run compared it."""
    for setting in report["settings"]["settings"]:
        setting = setting if isinstance(setting, dict) else asdict(setting)
        if (setting["guidance_scale"] == 1.0 and setting["cfg_scale"] == report.get("default_cfg_scale", 1.0)
                and not setting.get("raw_targets", False)):
            return setting["name"]
    return None


def _saturation_figure(texture: dict[str, Any]) -> str:
    """The saturated share after the pipeline's redraws, with the first draws' share beside it when redrawn."""
    figure = _fmt(texture["saturated_share"], ".3f")
    first = texture.get("first_draw_saturated_share")
    if texture.get("max_redraws") and first is not None:
        figure += f" (first draws {first:.3f}, up to {texture['max_redraws']} redraws)"
    return figure


def gates(report: dict[str, Any]) -> list[tuple[str, str, bool | None]]:
    """(gate, measured figure, met) for every gate of the native-resolution issue that this report measures."""
    ae, lung, texture, ctrl = report["autoencoder"], report["generated_lung"], report["texture"], report["control"]
    out = [("autoencoder SSIM >= 0.92 (whole slices)", _fmt(ae["ssim"]), ae["ssim"] >= 0.92),
           ("nodules >= 5 mm keep >= 85 % of their contrast", _fmt(ae["nodule_contrast_kept"], ".2f"),
            None if ae["nodule_contrast_kept"] is None else ae["nodule_contrast_kept"] >= 0.85),
           ("generated lung < -700 HU", _fmt(lung["generated_lung_mean_hu"], ".0f"), lung["generated_lung_mean_hu"] < -700)]
    diffs = [abs(v["inserted_mean_hu"] - v["phantom_mean_hu"]) for v in texture["levels"].values()
             if v["inserted_mean_hu"] is not None and v["phantom_mean_hu"] is not None]
    out.append(("texture levels within 100 HU of the phantom", f"max {max(diffs):.0f} HU" if diffs else "n/a",
                bool(diffs) and max(diffs) <= 100))
    out.append(("<= 2 % saturated (p90 >= 400 HU)", _saturation_figure(texture),
                None if texture["saturated_share"] is None else texture["saturated_share"] <= 0.02))
    default = _default_setting(report)
    where = f"at the default ({default})" if default else "(best setting)"
    for feature, target in (("malignancy", 0.85), ("texture", 0.90), ("lobulation", 0.75), ("spiculation", 0.75)):
        aucs = ctrl["per_feature"].get(feature, {})
        if not aucs:
            out.append((f"{feature} AUC >= {target} {where}", "n/a", None))
            continue
        best_setting = max(aucs, key=aucs.get)
        value = aucs[default] if default else aucs[best_setting]
        interval = ctrl.get("per_feature_interval", {}).get(feature, {}).get(default or best_setting)
        figure = _fmt(value) + _interval(interval) + (f" (best {aucs[best_setting]:.3f}, {best_setting})" if default else "")
        out.append((f"{feature} AUC >= {target} {where}", figure, value >= target))
    alone = {p["setting"]: p for p in ctrl["guidance_alone"]}
    chosen = alone.get(default or "classifier s=1")
    if chosen:
        none = alone.get("none")
        rising = f" (none: {none['auc']:.3f})" if none else ""
        out.append((f"guidance alone AUC >= 0.70 {where if default else 'at s = 1'}",
                    _fmt(chosen["auc"]) + _interval(chosen.get("auc_interval")) + rising,
                    chosen["auc"] >= 0.70 and (none is None or chosen["auc"] > none["auc"])))
        out.append(("... with Fréchet <= 1.5 x none", _fmt(chosen["frechet_vs_none"], ".2f"),
                    chosen["frechet_vs_none"] <= 1.5))
    speed = report["speed"]["whole_slice_over_insert"]
    out.append(("local insertion >= 15x cheaper than the whole slice", f"{speed:.1f}x", speed >= 15))
    for spacing, entry in report["other_spacings"].items():
        diffs = [abs(v["inserted_mean_hu"] - v["phantom_mean_hu"]) for v in entry["levels"].values()
                 if v["inserted_mean_hu"] is not None and v["phantom_mean_hu"] is not None]
        out.append((f"at {spacing} mm: texture within 100 HU", f"max {max(diffs):.0f} HU" if diffs else "n/a",
                    bool(diffs) and max(diffs) <= 100))
        out.append((f"at {spacing} mm: <= 2 % saturated", _saturation_figure(entry),
                    None if entry["saturated_share"] is None else entry["saturated_share"] <= 0.02))
    return out


def control_markdown(report: dict[str, Any], heading: str = "##") -> list[str]:
    """The guidance settings side by side: control AUC per feature, saturated share, guidance alone (AUC, nodule
    Fréchet relative to no guidance, seconds per insertion) and the guidance grid."""
    ctrl = report["control"]
    names = [g["name"] for g in report["settings"]["settings"]]
    with_intervals = any(v for f in ctrl.get("per_feature_interval", {}).values() for v in f.values())
    lines = [f"{heading} Control AUC per guidance setting (level 1 vs 5; malignancy 1-2 vs 4-5)", "",
             f"{report['settings']['count']} insertions per requested level" + (
                 f"; in brackets the 95 % bootstrap interval over them (each class resampled, {AUC_RESAMPLES} times)."
                 if with_intervals else "."), "",
             "| feature | " + " | ".join(names) + " |", "| --- |" + " --- |" * len(names)]
    for feature, aucs in ctrl["per_feature"].items():
        intervals = ctrl.get("per_feature_interval", {}).get(feature, {})
        lines.append(f"| {feature} | " + " | ".join(_fmt(aucs.get(n), ".2f") + _interval(intervals.get(n), ".2f")
                                                    for n in names) + " |")
    lines.append("| saturated share | " + " | ".join(_fmt(ctrl["saturated"].get(n)) for n in names) + " |")
    lines += ["", "Guidance alone (the same outlines, requested malignancy 1 vs 5):", "",
              "| setting | AUC | nodule Fréchet | vs none | s per insertion |", "| --- | --- | --- | --- | --- |"]
    lines += [f"| {p['setting']} | {p['auc']:.3f}{_interval(p.get('auc_interval'))} | {p['nodule_frechet']:.2f} | "
              f"{p['frechet_vs_none']:.2f} | "
              f"{p['seconds_per_insertion']:.2f} |" for p in ctrl["guidance_alone"]]
    lines += ["", "One outline at one site with one seed; rows: malignancy 1..5 requested; columns: the settings above "
              "(lung window -1000..400 HU):", "", "![guidance grid](guidance_grid.png)"]
    return lines


def quality_markdown(report: dict[str, Any]) -> str:
    s = report["settings"]
    command = (f"lsdm-aug benchmark model-quality --data {s['data']} --model {s['model']} --count {s['count']} "
               f"--steps {s['steps']} --seed {s['seed']} --out {s['out']}")
    lines = ["# Model quality", "", f"Made by `{command}` (model {report['model']}, trained at "
             f"{report['model_spacing_mm']:.3f} mm; default cfg_scale {report['default_cfg_scale']:g}).", "",
             "## Gates", "", "| gate | measured | met |", "| --- | --- | --- |"]
    lines += [f"| {name} | {figure} | {'n/a' if ok is None else 'yes' if ok else 'no'} |"
              for name, figure, ok in gates(report)]
    ae = report["autoencoder"]
    lines += ["", "## Autoencoder", "", f"SSIM {ae['ssim']:.3f}, PSNR {ae['psnr_db']:.2f} dB on {ae['slices']} whole test "
              f"slices (1 px blur: {ae['blur_ssim']:.3f}); nodule contrast kept (median of {ae['nodules_measured']} "
              f"nodules >= 5 mm): {_fmt(ae['nodule_contrast_kept'], '.2f')}.", "",
              "## Evaluators (trained on clean phantom crops only)", "",
              "| feature | validation AUC (low <= 2 vs high >= 4) | train nodules |", "| --- | --- | --- |"]
    lines += [f"| {f} | {_fmt(r['validation_auc'])} | {r['train_nodules']} |" for f, r in report["evaluators"].items()]
    lines += ["", *control_markdown(report, "##")]
    sensitivity = report.get("feature_sensitivity")
    if sensitivity:
        lines += ["", f"How much the feature vector moves the U-Net (norm of the change in predicted noise relative to "
                      f"eps(not given), mean over {sensitivity['windows']} {sensitivity['window_px']} px windows around "
                      "test nodules): what classifier-free guidance can amplify.", "",
                  "| timestep | texture 5 - texture 1 | texture 1 - not given |", "| --- | --- | --- |"]
        lines += [f"| {t} | {v['texture 5 - texture 1']:.4f} | {v['texture 1 - not given']:.4f} |"
                  for t, v in sensitivity["relative_change"].items()]
    lines += ["", "## Texture fidelity (default guidance)", "",
              "Paired: each phantom test nodule of a level (non-calcified) has its own outline inserted with that "
              "texture requested; its mean HU against the same nodule's in the phantom (random outlines would "
              "compare other sizes: LIDC's ground-glass nodules are the larger ones, and a small nodule reads darker). "
              "The phantom's nodule is imaged at the spacing it was inserted at (the edit path's resampling: a larger "
              "pixel integrates what it covers, so at 2.7 mm a nodule reads darker than on its own slice; in brackets "
              f"its figure on its own slice). Core: deeper than {RIM_MM:g} mm inside the nodule (nodules with one in "
              f"both images); rim: its outer {RIM_MM:g} mm. They tell whether an inserted nodule is too dark inside or "
              "at its edge.",
              "", "| where | texture | inserted mean HU | phantom mean HU, same nodules | inserted core / rim | "
              "phantom core / rim | inserted |", "| --- | --- | --- | --- | --- | --- | --- |"]
    for where, entry in [("test slices", report["texture"]), *[(f"{k} mm", v) for k, v in report["other_spacings"].items()]]:
        for level, v in entry["levels"].items():
            parts = [" / ".join(_fmt(v.get(f"{who}_{part}_hu"), ".0f") for part in ("core", "rim"))
                     for who in ("inserted", "phantom")]
            native = v.get("phantom_native_mean_hu")  # absent from a section of an earlier version
            phantom = _fmt(v["phantom_mean_hu"], ".0f") + (f" ({native:.0f})" if native is not None else "")
            lines.append(f"| {where} | {level} | {_fmt(v['inserted_mean_hu'], '.0f')} | {phantom} "
                         f"| {parts[0]} | {parts[1]} | {v['inserted']} |")
    edge = edge_profile_markdown(report.get("edge_profile") or {}, "##")  # absent from a report of an earlier version
    if edge:
        lines += ["", *edge]
    sp = report["speed"]
    lines += ["", f"## Speed ({sp.get('torch_threads', '?')} torch threads, median of {sp.get('repeats', 1)} timings "
              "each, in the same run)", "",
              f"- local insertion {sp['insert_seconds']:.2f} s, whole slice "
              f"{sp['whole_slice_seconds']:.2f} s at {s['steps']} DDIM steps: {sp['whole_slice_over_insert']:.1f}x"]
    if "unet_step_window_seconds" in sp:
        area = (512 / sp["window_px"]) ** 2
        lines += [f"- where the ratio stops short of the {area:.0f}x of the areas ({sp['window_px']} px window): one "
                  f"U-Net step {sp['unet_step_window_seconds'] * 1000:.1f} ms on the window, "
                  f"{sp['unet_step_whole_seconds'] * 1000:.0f} ms on the whole slice "
                  f"({sp['unet_step_whole_seconds'] / sp['unet_step_window_seconds']:.1f}x); insertion also encodes "
                  f"the window's own image ({sp['encode_window_seconds'] * 1000:.0f} ms, once), which generation does "
                  "not"]
    return "\n".join(lines) + "\n"
