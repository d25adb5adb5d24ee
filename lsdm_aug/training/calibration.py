"""Calibrated guidance targets: what each regression classifier predicts for real nodules of each level.

A classifier trained with MSE regresses towards the mean (on the shipped phantom model, real texture-5 nodules
score about 4 and texture-1 ones about 2), so guiding it to the requested rating itself pushes a nodule past
every real nodule of that level. :func:`calibrate_classifiers` measures, on a split's real nodules, each
regression classifier's mean prediction per rounded level at a few timesteps (noised latent crops decoded by the
frozen decoder, exactly what the classifier sees during guidance) and stores the table in the classifier's JSON
config (``calibration``), where :class:`~lsdm_aug.sampling.guidance.ClassifierGuidance` finds it through the
pipeline. ``train_classifiers`` calibrates at its end; ``lsdm-aug train calibrate`` calibrates a finished model.

Example:
    >>> tables = calibrate_classifiers(load_recipe("phantom-smoke"), "prepared/phantom-64",
    ...                                "models/smoke")  # doctest: +SKIP
    >>> tables["texture"].target(torch.tensor([5.0]), torch.tensor([0]))  # doctest: +SKIP
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from lsdm_aug.config import Recipe, rating_level
from lsdm_aug.data.prepared import PreparedDataset, atomic_write_text
from lsdm_aug.models.autoencoder import encode_mean
from lsdm_aug.models.checkpoint import CheckpointError, config_path, load_weights, read_config
from lsdm_aug.models.classifiers import build_classifier, classifier_file
from lsdm_aug.sampling.guidance import MALIGNANCY, LatentBox, TargetCalibration
from lsdm_aug.sampling.schedulers import training_scheduler
from lsdm_aug.training.common import select_device
from lsdm_aug.training.diffusion import load_autoencoder

__all__ = ["calibrate_classifiers", "calibrate", "calibration_timesteps", "write_calibration"]

CALIBRATION_POINTS = 11


def calibration_timesteps(num_train_timesteps: int, points: int = CALIBRATION_POINTS) -> tuple[int, ...]:
    """``points`` timesteps evenly from 0 to the last one, e.g. 0, 100, ..., 900, 999."""
    return tuple(sorted({int(round(t)) for t in np.linspace(0, num_train_timesteps - 1, points)}))


def _draw_nodules(features: pd.DataFrame, names: list[str], per_level: int, seed: int) -> pd.DataFrame:
    """Up to ``per_level`` nodules of each rounded level of each feature (one table: a nodule drawn for one
    feature is scored by all)."""
    rng = np.random.default_rng(seed)
    chosen: set[int] = set()
    for name in names:
        levels = rating_level(features[name].to_numpy())
        for level in np.unique(levels):
            index = np.flatnonzero(levels == level)
            chosen.update(rng.choice(index, min(per_level, len(index)), replace=False).tolist())
    return features.iloc[sorted(chosen)].reset_index(drop=True)


@torch.no_grad()
def _latent_crops(dataset: PreparedDataset, rows: pd.DataFrame, autoencoder: torch.nn.Module, scale: float,
                  crop_px: int, factor: int, device: torch.device) -> torch.Tensor:
    """The scaled latent crop (``crop_px / f`` latent px) around each nodule, encoded from an image window twice
    the crop's size (fully convolutional: the crop sees what it would see in the whole slice, nearly)."""
    crops = []
    for row in rows.itertuples():
        image = dataset[row.case_id]["image"]
        size = min(2 * crop_px, *image.shape) // factor * factor
        top = int(np.clip(round(row.centre_row - size / 2), 0, image.shape[0] - size)) // factor * factor
        left = int(np.clip(round(row.centre_col - size / 2), 0, image.shape[1] - size)) // factor * factor
        window = torch.as_tensor(image[top:top + size, left:left + size], dtype=torch.float32, device=device)
        latent = encode_mean(autoencoder, window[None, None]) * scale
        box = LatentBox.around(row.centre_row - top, row.centre_col - left, crop_px // factor,
                               tuple(latent.shape[-2:]), factor)
        crops.append(latent[0, :, box.rows, box.cols])
    return torch.stack(crops)


@torch.no_grad()
def calibrate(classifiers: Mapping[str, torch.nn.Module], decode, crops: torch.Tensor,
              ratings: Mapping[str, np.ndarray], timesteps: tuple[int, ...], scheduler, seed: int = 0,
              batch_size: int = 64) -> dict[str, TargetCalibration]:
    """Each classifier's mean prediction per rounded level of its ``ratings`` at each of ``timesteps``, on the
    scaled latent ``crops`` noised (one draw per crop and timestep, from ``seed``) and decoded once for all.

    Example:
        >>> tables = calibrate({"texture": net}, decode, crops, {"texture": ratings}, (0, 500, 999),
        ...                    scheduler)  # doctest: +SKIP
    """
    for feature, values in ratings.items():
        if len(values) != len(crops) or not len(crops):
            raise ValueError(f"{feature}: need one rating per crop and at least one crop, got {len(crops)} crops "
                             f"and {len(values)} ratings")
    generator = torch.Generator().manual_seed(seed)
    predictions: dict[str, list[np.ndarray]] = {feature: [] for feature in classifiers}
    for t in timesteps:
        per_step: dict[str, list[torch.Tensor]] = {feature: [] for feature in classifiers}
        for start in range(0, len(crops), batch_size):
            batch = crops[start:start + batch_size]
            steps = torch.full((len(batch),), int(t), dtype=torch.long, device=batch.device)
            noise = torch.randn(batch.shape, generator=generator).to(batch)
            images = decode(scheduler.add_noise(batch, noise, steps))
            for feature, classifier in classifiers.items():
                per_step[feature].append(classifier(images, steps).reshape(-1).cpu())
        for feature in classifiers:
            predictions[feature].append(torch.cat(per_step[feature]).double().numpy())
    return {feature: _table(np.stack(predictions[feature]), ratings[feature], timesteps) for feature in classifiers}


def _table(predictions: np.ndarray, ratings: np.ndarray, timesteps: tuple[int, ...]) -> TargetCalibration:
    """(timesteps, nodules) predictions -> their mean per rounded level of ``ratings``."""
    levels = rating_level(ratings)
    present = np.unique(levels)
    means = tuple(tuple(float(row[levels == level].mean()) for level in present) for row in predictions)
    return TargetCalibration(tuple(int(t) for t in timesteps), tuple(float(v) for v in present), means,
                             tuple(int((levels == level).sum()) for level in present))


def write_calibration(path: str | Path, calibration: TargetCalibration) -> None:
    """Store ``calibration`` in the JSON config beside the classifier weights at ``path`` (atomically)."""
    config = read_config(path)
    config["calibration"] = calibration.to_dict()
    atomic_write_text(config_path(path), json.dumps(config, indent=2))


def calibrate_classifiers(recipe: Recipe, data_dir: str | Path, model_dir: str | Path, device: str | None = None,
                          seed: int = 0, split: str = "train", per_level: int = 32) -> dict[str, TargetCalibration]:
    """Calibrate every regression classifier of ``model_dir`` (malignancy is a classification: it keeps its
    cross-entropy on the benign / malignant class) on ``split`` of ``data_dir`` and store the tables.

    Raises:
        ValueError: ``per_level`` < 1, or a split without nodules.
        CheckpointError: a classifier of the recipe missing from ``model_dir``.
    """
    if per_level < 1:
        raise ValueError(f"per_level must be >= 1, got {per_level!r}")
    names = [f for f in recipe.classifiers.features if f != MALIGNANCY]
    if not names:
        return {}
    torch_device = select_device(device)
    paths = {f: Path(model_dir) / classifier_file(f) for f in names}
    for feature, path in paths.items():
        if not path.is_file():
            raise CheckpointError(f"no {feature} classifier to calibrate: {str(path)!r} is missing")
    dataset = PreparedDataset(data_dir, split=split)
    if dataset.features.empty:
        raise ValueError(f"split {split!r} of {str(data_dir)!r} has no nodules to calibrate on")
    rows = _draw_nodules(dataset.features, names, per_level, seed)
    autoencoder, scale = load_autoencoder(model_dir, recipe, torch_device)
    factor = recipe.autoencoder.downsampling
    crops = _latent_crops(dataset, rows, autoencoder, scale, recipe.classifiers.crop_px, factor, torch_device)
    timesteps = calibration_timesteps(recipe.diffusion.num_train_timesteps)
    scheduler = training_scheduler(recipe.diffusion)
    classifiers = {}
    for feature, path in paths.items():
        classifiers[feature] = build_classifier(recipe.classifiers, feature)
        load_weights(path, classifiers[feature])
        classifiers[feature] = classifiers[feature].to(torch_device).eval()
    tables = calibrate(classifiers, lambda z: autoencoder.decode(z / scale), crops,
                       {f: rows[f].to_numpy() for f in names}, timesteps, scheduler, seed)
    for feature, table in tables.items():
        write_calibration(paths[feature], table)
    return tables
