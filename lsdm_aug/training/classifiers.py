"""Stage 3: the four feature classifiers, trained on ``Crop(Decoder(z_t))`` with the frozen decoder in the loop.

For each nodule of the training split, the latent window around its centre (``crop_px / f`` latent
pixels) is noised to a random timestep, decoded by the frozen decoder and scored by the classifier
with that timestep. Nodules are drawn label-balanced (each malignancy class, or each rounded
1..5 level of a regression feature, equally often) and an EMA of the weights (thesis: 0.9999, with
a warm-up) is what gets saved. Optionally, nodules with an indeterminate malignancy rating are left
out of the malignancy classifier's training (``train_classifiers.malignancy_ambiguous``) and the
decoded crops are flipped and rotated (``train_classifiers.augment``). At the end the regressions are
calibrated (:mod:`lsdm_aug.training.calibration`): their mean prediction per level, the guidance targets.

Validation reports, at t = 0, 200 and 500, the malignancy accuracy and balanced accuracy on every
held-out nodule and the balanced accuracy on the clear ones (outside the ambiguous range), and the
regressions' mean absolute error and its level-balanced mean (mean over the rounded 1..5 levels; a
network that ignores its input and predicts the balanced mean 3 scores 1.2).

Example:
    >>> train_classifiers(load_recipe("phantom-smoke"), "prepared/phantom-64", "models/smoke")  # doctest: +SKIP
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from lsdm_aug.config import Recipe, rating_level
from lsdm_aug.data.prepared import PreparedDataset
from lsdm_aug.models.checkpoint import load_training_state, save_training_state, save_weights
from lsdm_aug.models.classifiers import build_classifier, classifier_file
from lsdm_aug.progress import make_progress
from lsdm_aug.sampling.guidance import MALIGNANCY, LatentBox, feature_loss
from lsdm_aug.sampling.schedulers import training_scheduler
from lsdm_aug.training.calibration import calibrate_classifiers
from lsdm_aug.training.common import EMA, DistributedContext, load_split_arrays
from lsdm_aug.training.diffusion import LatentData, load_autoencoder

__all__ = ["train_classifiers", "NoduleCrops", "balanced_levels", "ambiguous_malignancy", "augment"]

STATE_FILE = "classifiers_state.safetensors"


def balanced_levels(feature: str, ratings: np.ndarray) -> np.ndarray:
    """The label whose values are drawn equally often: benign/malignant for malignancy, the rounded level otherwise."""
    if feature == MALIGNANCY:
        return (ratings >= 3).astype(int)
    return rating_level(ratings)


class NoduleCrops:
    """The nodules of one split with the latent window around each, ready to noise, decode and score.

    Args:
        data: the split's latents (see :class:`~lsdm_aug.training.diffusion.LatentData`).
        features: the split's ``features.csv`` rows (``case_id``, ``centre_row``, ``centre_col``, ratings).
        case_ids: case id of each latent, in order.
        crop_latent_px: window size in latent pixels.
        factor: autoencoder downsampling.
        malignancy_ambiguous: ``[low, high]`` malignancy ratings never drawn for the malignancy classifier.
    """

    def __init__(self, data: LatentData, features: pd.DataFrame, case_ids: list[str], crop_latent_px: int,
                 factor: int, malignancy_ambiguous: tuple[float, ...] = ()) -> None:
        position = {case_id: i for i, case_id in enumerate(case_ids)}
        rows = features[features.case_id.isin(position)].reset_index(drop=True)
        if rows.empty:
            raise ValueError("no nodules in this split to train the classifiers on")
        shape = tuple(data.latents.shape[-2:])
        boxes = [LatentBox.around(r.centre_row, r.centre_col, crop_latent_px, shape, factor) for r in rows.itertuples()]
        self.crops = torch.stack([data.latents[position[r.case_id], :, b.rows, b.cols]
                                  for r, b in zip(rows.itertuples(), boxes)])
        self.ratings = rows
        self.ambiguous = ambiguous_malignancy(rows[MALIGNANCY].to_numpy(), malignancy_ambiguous)

    def __len__(self) -> int:
        return len(self.crops)

    def balanced_index(self, feature: str, count: int, generator: torch.Generator) -> torch.Tensor:
        """``count`` nodules, each label (see :func:`balanced_levels`) drawn equally often.

        For malignancy, nodules in the ambiguous range are never drawn."""
        levels = balanced_levels(feature, self.ratings[feature].to_numpy())
        if feature == MALIGNANCY and self.ambiguous.any():
            levels = np.where(self.ambiguous, -1, levels)
        present = np.unique(levels[levels >= 0])
        chosen = present[torch.randint(len(present), (count,), generator=generator).numpy()]
        index = [np.flatnonzero(levels == level) for level in chosen]
        return torch.tensor([ix[torch.randint(len(ix), (1,), generator=generator).item()] for ix in index])

    def targets(self, feature: str, index: torch.Tensor) -> torch.Tensor:
        return torch.tensor(self.ratings[feature].to_numpy()[index.numpy()], dtype=torch.float32)


def ambiguous_malignancy(ratings: np.ndarray, band: tuple[float, ...]) -> np.ndarray:
    """Which malignancy ratings fall in the closed range ``band = (low, high)`` (none when empty)."""
    if not band:
        return np.zeros(len(ratings), dtype=bool)
    low, high = band
    return (ratings >= low) & (ratings <= high)


def augment(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """The batch flipped left-right (half the time) and rotated by a random multiple of 90 degrees."""
    turns = int(torch.randint(4, (1,), generator=generator))
    images = torch.rot90(images, turns, dims=(-2, -1))
    return images.flip(-1) if torch.rand(1, generator=generator).item() < 0.5 else images


def _balanced_accuracy(predicted: torch.Tensor, truth: torch.Tensor) -> float:
    """Mean of the per-class recalls of a binary prediction (classes missing from ``truth`` are skipped)."""
    recalls = [float((predicted[truth == c] == c).float().mean()) for c in (0, 1) if bool((truth == c).any())]
    return float(np.mean(recalls)) if recalls else float("nan")


def _malignancy_scores(feature: str, output: torch.Tensor, target: torch.Tensor, clear: torch.Tensor,
                       t: int) -> dict[str, float]:
    truth, predicted = (target >= 3).long(), output.argmax(1)
    return {f"{feature}_accuracy_t{t}": float((predicted == truth).float().mean()),
            f"{feature}_balanced_accuracy_t{t}": _balanced_accuracy(predicted, truth),
            f"{feature}_clear_balanced_accuracy_t{t}": _balanced_accuracy(predicted[clear], truth[clear])}


def _regression_scores(feature: str, output: torch.Tensor, target: torch.Tensor, t: int) -> dict[str, float]:
    error = (output.reshape(-1) - target).abs()
    levels = torch.from_numpy(balanced_levels(feature, target.cpu().numpy())).to(error.device)
    per_level = [float(error[levels == level].mean()) for level in levels.unique()]
    return {f"{feature}_mae_t{t}": float(error.mean()), f"{feature}_balanced_mae_t{t}": float(np.mean(per_level))}


def _noisy_decoded(crops: torch.Tensor, timesteps: torch.Tensor, decode, scheduler, generator) -> torch.Tensor:
    noise = torch.randn(crops.shape, generator=generator).to(crops)
    with torch.no_grad():
        return decode(scheduler.add_noise(crops, noise, timesteps))


@torch.no_grad()
def _validate(networks: dict[str, torch.nn.Module], crops: NoduleCrops, decode, scheduler) -> dict[str, float]:
    """Accuracies (malignancy) or mean absolute errors (regressions) at t = 0, 200 and 500 on held-out nodules."""
    generator = torch.Generator().manual_seed(99)
    device = crops.crops.device
    clear = torch.from_numpy(~crops.ambiguous).to(device)
    result = {}
    for feature, network in networks.items():
        for t in (0, 200, 500):
            timesteps = torch.full((len(crops),), t, dtype=torch.long, device=device)
            output = network(_noisy_decoded(crops.crops, timesteps, decode, scheduler, generator), timesteps)
            target = crops.targets(feature, torch.arange(len(crops))).to(device)
            if feature == MALIGNANCY:
                result.update(_malignancy_scores(feature, output, target, clear, t))
            else:
                result.update(_regression_scores(feature, output, target, t))
    return result


def train_classifiers(recipe: Recipe, data_dir: str | Path, model_dir: str | Path, device: str | None = None,
                      seed: int = 0, progress: bool = True) -> dict[str, Any]:
    """Train (or resume) the feature classifiers of ``recipe`` in ``model_dir`` (which holds the autoencoder)."""
    context = DistributedContext.from_environment(device)
    settings, model_dir = recipe.train_classifiers, Path(model_dir)
    autoencoder, scale = load_autoencoder(model_dir, recipe, context.device)
    factor = recipe.autoencoder.downsampling
    crop_latent = recipe.classifiers.crop_px // factor

    def decode(latent: torch.Tensor) -> torch.Tensor:
        return autoencoder.decode(latent / scale)

    splits = {}
    for split in ("train", "validation"):
        dataset = PreparedDataset(data_dir, split=split)
        data = LatentData.encode(load_split_arrays(data_dir, split), autoencoder, scale, semantic=False)
        splits[split] = NoduleCrops(data, dataset.features, dataset.case_ids(), crop_latent, factor,
                                    settings.malignancy_ambiguous)
        splits[split].crops = splits[split].crops.to(context.device)
    torch.manual_seed(seed)
    features = list(recipe.classifiers.features)
    networks = {f: build_classifier(recipe.classifiers, f).to(context.device) for f in features}
    optimizers = {f: torch.optim.AdamW(n.parameters(), lr=settings.learning_rate) for f, n in networks.items()}
    emas = {f: EMA(n, settings.ema_decay) for f, n in networks.items()}
    start, history = 0, []
    state_path = model_dir / STATE_FILE
    if state_path.exists():
        meta = load_training_state(state_path, {**networks, **{f"ema_{f}": e.model for f, e in emas.items()}}, optimizers)
        start, history = int(meta["step"]), list(meta["history"])
        for f, e in emas.items():
            e.updates = int(meta["ema_updates"])
    wrapped = {f: context.wrap(n) for f, n in networks.items()}
    scheduler = training_scheduler(recipe.diffusion)
    generator = torch.Generator().manual_seed(seed * 1_000_003 + context.rank * 7919 + start)
    train, started = splits["train"], time.perf_counter()
    with make_progress() as bar:
        task = bar.add_task("classifiers", total=settings.steps, completed=start, rate="",
                            visible=progress and context.is_main)
        for step in range(start, settings.steps):
            losses = []
            for feature in features:
                index = train.balanced_index(feature, settings.batch_size, generator)
                timesteps = torch.randint(0, settings.max_timestep, (len(index),), generator=generator).to(context.device)
                images = _noisy_decoded(train.crops[index.to(train.crops.device)], timesteps, decode, scheduler, generator)
                if settings.augment:
                    images = augment(images, generator)
                loss = feature_loss(feature, wrapped[feature](images, timesteps),
                                    train.targets(feature, index).to(context.device)) / len(index)
                optimizers[feature].zero_grad(set_to_none=True)
                loss.backward()
                optimizers[feature].step()
                emas[feature].update(wrapped[feature])
                losses.append(loss.item())
            bar.update(task, advance=1, rate="loss " + " ".join(f"{v:.3f}" for v in losses))
            done = step + 1
            if done % settings.validate_every == 0 or done == settings.steps:
                if context.is_main:
                    ema_models = {f: e.model for f, e in emas.items()}
                    history.append({"step": done, "seconds": round(time.perf_counter() - started, 1),
                                    **_validate(ema_models, splits["validation"], decode, scheduler)})
                    bar.console.print(f"step {done}: " + ", ".join(f"{k} {v:.3f}" for k, v in history[-1].items()
                                                                     if k != "step"))
                    for feature, ema_model in ema_models.items():
                        save_weights(model_dir / classifier_file(feature), ema_model,
                                     {"component": "classifier", "feature": feature, "recipe": recipe.name,
                                      "classifiers": recipe.to_dict()["classifiers"], "steps": done,
                                      "ema_decay": settings.ema_decay, "validation": history[-1]})
                    save_training_state(state_path, {**networks, **{f"ema_{f}": e.model for f, e in emas.items()}},
                                        optimizers, {"step": done, "history": history,
                                                     "ema_updates": emas[features[0]].updates})
                context.barrier()
    context.close()
    if context.is_main and history:
        calibrate_classifiers(recipe, data_dir, model_dir, str(context.device), seed)
    return history[-1] if history else {}
