"""An independent nodule evaluator: judges generated nodules without having guided them.

A small MONAI ``Classifier`` trained on **clean** crops of real phantom slices (never on generated
or noisy ones), low (rating <= 2) against high (>= 4) on one feature: by default malignancy (benign
vs malignant), or lobulation, spiculation or texture. It scores generated nodules for the control
AUC, and its penultimate features give the nodule-crop Fréchet distance.

Example:
    >>> evaluator = NoduleEvaluator.train("prepared/phantom-128", steps=600)  # doctest: +SKIP
    >>> evaluator.malignant_probability(crops)  # doctest: +SKIP
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from monai.networks.nets import Classifier

from lsdm_aug.data.prepared import PreparedDataset
from lsdm_aug.metrics.auc import labelled_auc

__all__ = ["NoduleEvaluator", "nodule_crops"]


def nodule_crops(images: np.ndarray, centres: list[tuple[float, float]], crop_px: int) -> np.ndarray:
    """(N, crop, crop) crops of (N, H, W) images centred on each (row, col), shifted to stay inside."""
    crops = []
    for image, (row, col) in zip(images, centres):
        top = int(np.clip(round(row - crop_px / 2), 0, image.shape[0] - crop_px))
        left = int(np.clip(round(col - crop_px / 2), 0, image.shape[1] - crop_px))
        crops.append(image[top:top + crop_px, left:left + crop_px])
    return np.stack(crops).astype(np.float32)


def _labelled_crops(dataset: PreparedDataset, crop_px: int, feature: str) -> tuple[np.ndarray, np.ndarray]:
    rows = dataset.features[(dataset.features[feature] <= 2) | (dataset.features[feature] >= 4)]
    if rows.empty:
        return np.zeros((0, crop_px, crop_px), np.float32), np.zeros(0, np.int64)
    images = np.stack([dataset[case_id]["image"] for case_id in rows.case_id])
    crops = nodule_crops(images, list(zip(rows.centre_row, rows.centre_col)), crop_px)
    return crops, (rows[feature].to_numpy() >= 4).astype(np.int64)


def _network(crop_px: int) -> Classifier:
    return Classifier(in_shape=(1, crop_px, crop_px), classes=2, channels=(16, 32, 64), strides=(2, 2, 2), dropout=0.1)


class NoduleEvaluator:
    """Low-vs-high scorer of one feature on nodule crops (malignancy: benign vs malignant), trained on clean
    phantom crops.

    Args:
        network: a trained MONAI ``Classifier`` with 2 outputs.
        crop_px: crop size it was trained on.
        feature: the feature it judges.

    Example:
        >>> evaluator, report = NoduleEvaluator.train("prepared/phantom-128", feature="texture")  # doctest: +SKIP
        >>> evaluator.high_probability(crops)  # doctest: +SKIP
    """

    def __init__(self, network: Classifier, crop_px: int, feature: str = "malignancy") -> None:
        self.network, self.crop_px, self.feature = network.eval(), crop_px, feature

    @classmethod
    def train(cls, data_dir: str | Path, crop_px: int = 32, steps: int = 600, batch_size: int = 64,
              seed: int = 0, feature: str = "malignancy") -> tuple[NoduleEvaluator, dict[str, float]]:
        """Train on the train split (class-balanced batches, flips as augmentation); report validation AUC."""
        from lsdm_aug.config import FEATURES

        if feature not in FEATURES:
            raise ValueError(f"feature must be one of {FEATURES}, got {feature!r}")
        torch.manual_seed(seed)
        generator = torch.Generator().manual_seed(seed)
        crops, labels = _labelled_crops(PreparedDataset(data_dir, split="train"), crop_px, feature)
        network = _network(crop_px)
        optimizer = torch.optim.AdamW(network.parameters(), lr=1e-3, weight_decay=1e-4)
        x, y = torch.from_numpy(crops).unsqueeze(1), torch.from_numpy(labels)
        by_class = [torch.nonzero(y == c).flatten() for c in (0, 1)]
        if min(len(ix) for ix in by_class) == 0:
            raise ValueError(f"{feature}: the train split needs nodules rated <= 2 and >= 4, has "
                             f"{len(by_class[0])} and {len(by_class[1])}")
        for _ in range(steps):
            picks = [ix[torch.randint(len(ix), (batch_size // 2,), generator=generator)] for ix in by_class]
            index = torch.cat(picks)
            batch = x[index]
            if torch.rand(1, generator=generator) < 0.5:
                batch = batch.flip(-1)
            loss = F.cross_entropy(network(batch), y[index])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        evaluator = cls(network, crop_px, feature)
        val_crops, val_labels = _labelled_crops(PreparedDataset(data_dir, split="validation"), crop_px, feature)
        scores = evaluator.high_probability(val_crops)
        auc = float("nan")  # a validation split without both classes has no AUC
        if len(np.unique(val_labels)) == 2:
            auc = labelled_auc(val_labels, scores)
        return evaluator, {"feature": feature, "validation_auc": auc, "train_nodules": int(len(labels)),
                           "validation_nodules": int(len(val_labels))}

    def save(self, path: str | Path, report: dict[str, Any]) -> None:
        """Weights (safetensors) and ``report`` with the crop size and feature (JSON beside them)."""
        from lsdm_aug.models.checkpoint import save_weights

        save_weights(path, self.network, {"crop_px": self.crop_px, "feature": self.feature, "report": report})

    @classmethod
    def load(cls, path: str | Path) -> tuple[NoduleEvaluator, dict[str, Any]]:
        """An evaluator written by :meth:`save`, and its training report."""
        from lsdm_aug.models.checkpoint import load_weights, read_config

        config = read_config(path)
        network = _network(int(config["crop_px"]))
        load_weights(path, network)
        return cls(network, int(config["crop_px"]), config["feature"]), config["report"]

    @torch.no_grad()
    def high_probability(self, crops: np.ndarray) -> np.ndarray:
        """P(rating >= 4) of each (crop, crop) crop (for malignancy: P(malignant))."""
        logits = self.network(torch.from_numpy(np.asarray(crops, np.float32)).unsqueeze(1))
        return torch.softmax(logits, dim=1)[:, 1].numpy()

    def malignant_probability(self, crops: np.ndarray) -> np.ndarray:
        """P(malignant) of each crop (an evaluator trained on malignancy)."""
        if self.feature != "malignancy":
            raise ValueError(f"this evaluator judges {self.feature}, not malignancy; use high_probability")
        return self.high_probability(crops)

    @torch.no_grad()
    def features(self, crops: np.ndarray) -> torch.Tensor:
        """Penultimate (flattened convolutional) features, for Fréchet distances."""
        x = torch.from_numpy(np.asarray(crops, np.float32)).unsqueeze(1)
        return self.network.net(x).flatten(1)
