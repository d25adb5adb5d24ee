"""Local in-painting multi-classifier guidance (LSDM thesis, section 3.4.1): the only place that enables grad.

At a reverse step with latent ``z_t``:

1. crop the latent around the nodule (``Crop(z_t)``, e.g. 16 x 16 latent px at 512 px images);
2. decode the crop with the frozen decoder and score it with each selected classifier at ``t``;
3. take the gradient of each classifier's loss (cross-entropy for binary malignancy, MSE for the
   lobulation / spiculation / texture regressions) w.r.t. the latent crop;
4. keep it only where the in-painting mask allows: the thesis's ``M`` marks the known region around
   the nodule (``M = 1 - maxpool(nodule)`` in latent space), and the gradient is multiplied by
   ``1 - M``, i.e. it acts on the max-pooled nodule area only;
5. lobulation, spiculation and texture gradients are summed on the same latent; malignancy is then
   evaluated on the latent already moved by that sum, and its gradient is added.

The result, times the guidance scale ``s``, is the score ``grad log p(y | z_t)`` that the sampler adds
to the reverse-diffusion mean. ``s = 0`` computes nothing, so it gives exactly the unguided sample.

Calibrated targets (:class:`TargetCalibration`, an addition to the thesis): a regression trained with MSE
predicts towards the mean, so on real nodules rated 5 it says about 4 and on those rated 1 about 2. Asked for
the rating itself, guidance pushes past every real nodule of that level (the bright, saturated cores of
texture 5). With a calibration, a requested level ``v`` at timestep ``t`` becomes what the classifier predicts,
on average, for real nodules of level ``v`` at ``t``: guidance moves the nodule to where such nodules are, not
beyond them.

Example:
    >>> guidance = ClassifierGuidance(decoder, classifiers, targets={"malignancy": 5}, box=box,
    ...                               nodule_mask=mask, scale=1.0)  # doctest: +SKIP
    >>> score = guidance(z_t, t)  # doctest: +SKIP
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["LatentBox", "ClassifierGuidance", "TargetCalibration", "feature_loss", "latent_nodule_mask",
           "MALIGNANCY"]

MALIGNANCY = "malignancy"


@dataclass(frozen=True)
class LatentBox:
    """A square window of the latent: rows and cols in latent pixels."""

    top: int
    left: int
    size: int

    @property
    def rows(self) -> slice:
        return slice(self.top, self.top + self.size)

    @property
    def cols(self) -> slice:
        return slice(self.left, self.left + self.size)

    @classmethod
    def around(cls, centre_row: float, centre_col: float, size: int, latent_shape: tuple[int, int],
               factor: int) -> LatentBox:
        """The ``size`` x ``size`` window centred on an image-pixel position, moved inside the latent."""
        height, width = latent_shape
        if size > min(height, width):
            raise ValueError(f"crop of {size} latent px does not fit a latent of {height} x {width}")
        top = int(round(centre_row / factor - size / 2))
        left = int(round(centre_col / factor - size / 2))
        return cls(min(max(top, 0), height - size), min(max(left, 0), width - size), size)


@dataclass(frozen=True)
class TargetCalibration:
    """A regression classifier's mean prediction on real nodules of each level, at each of a few timesteps.

    Args:
        timesteps: increasing diffusion timesteps of the table's rows.
        levels: increasing rating levels of its columns (the levels the calibration data had).
        means: ``means[i][j]``, the mean prediction at ``timesteps[i]`` for nodules of ``levels[j]``.
        counts: nodules per level behind the means.

    Example:
        >>> table = TargetCalibration((0, 999), (1.0, 5.0), ((1.8, 4.2), (3.0, 3.1)), (10, 10))
        >>> table.target(torch.tensor([5.0, 3.0]), torch.tensor([0, 999])).tolist()
        [4.199999809265137, 3.049999952316284]
    """

    timesteps: tuple[int, ...]
    levels: tuple[float, ...]
    means: tuple[tuple[float, ...], ...]
    counts: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        shape = np.asarray(self.means, dtype=float).shape
        if not self.timesteps or not self.levels or shape != (len(self.timesteps), len(self.levels)):
            raise ValueError(f"calibration means must be {len(self.timesteps)} timesteps x {len(self.levels)} "
                             f"levels, got shape {shape}")
        for name, values in (("timesteps", self.timesteps), ("levels", self.levels)):
            if any(b <= a for a, b in zip(values, values[1:])):
                raise ValueError(f"calibration {name} must increase, got {list(values)}")
        if not np.isfinite(np.asarray(self.means, dtype=float)).all():
            raise ValueError("calibration means must be finite")

    def target(self, requested: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """The calibrated target of each requested level at each sample's timestep (linear in both; outside the
        table, its nearest edge)."""
        means = np.asarray(self.means, dtype=float)
        out = []
        for level, t in zip(requested.detach().cpu().double().numpy(), timesteps.detach().cpu().double().numpy()):
            row = [np.interp(t, self.timesteps, means[:, j]) for j in range(len(self.levels))]
            out.append(np.interp(level, self.levels, row))
        return torch.tensor(out, dtype=torch.float32, device=requested.device)

    def to_dict(self) -> dict:
        return {"timesteps": list(self.timesteps), "levels": list(self.levels),
                "means": [list(row) for row in self.means], "counts": list(self.counts)}

    @classmethod
    def from_dict(cls, data: Mapping) -> TargetCalibration:
        try:
            return cls(tuple(int(t) for t in data["timesteps"]), tuple(float(v) for v in data["levels"]),
                       tuple(tuple(float(m) for m in row) for row in data["means"]),
                       tuple(int(c) for c in data.get("counts", ())))
        except (KeyError, TypeError) as error:
            raise ValueError(f"a calibration needs timesteps, levels and means, got {dict(data)!r}") from error


def latent_nodule_mask(nodule_mask: torch.Tensor, factor: int) -> torch.Tensor:
    """Max-pool an image-resolution nodule mask (B, 1, H, W) to latent resolution (B, 1, H/f, W/f)."""
    return F.max_pool2d(nodule_mask.float(), kernel_size=factor, stride=factor)


def feature_loss(feature: str, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Loss of one classifier's output: cross-entropy for malignancy (target 1..5 -> benign <= 2 / malignant >= 3),
    mean squared error for the 1..5 regressions. Summed over the batch (each sample's gradient is its own)."""
    if feature == MALIGNANCY:
        return F.cross_entropy(output, (target >= 3).long(), reduction="sum")
    return F.mse_loss(output.reshape(-1), target.float().reshape(-1), reduction="sum")


class ClassifierGuidance:
    """The guidance score of selected feature classifiers on a nodule's latent window.

    Args:
        decode: frozen decoder, latent (already divided by the scale factor) -> image.
        classifiers: feature name -> network taking ``(image_crop, timesteps)``.
        box: the latent window around the nodule, or one window (all of one size) per sample of a batch.
        nodule_mask: (B, 1, size, size) max-pooled nodule mask of the window (1 on the nodule).
        targets: feature name -> requested value 1..5, or one value per sample of a batch (any subset of the
            classifiers).
        scale: the guidance scale ``s``.
        latent_scale: the autoencoder's latent scale factor (the sampler works on scaled latents).
        calibrations: feature name -> :class:`TargetCalibration` for regressions whose requested level is turned
            into the classifier's mean prediction for real nodules of that level (others use the level itself).
    """

    def __init__(self, decode: Callable[[torch.Tensor], torch.Tensor], classifiers: Mapping[str, torch.nn.Module],
                 targets: Mapping[str, float | Sequence[float]], box: LatentBox | Sequence[LatentBox],
                 nodule_mask: torch.Tensor, scale: float = 1.0, latent_scale: float = 1.0,
                 calibrations: Mapping[str, TargetCalibration] | None = None) -> None:
        unknown = sorted(set(targets) - set(classifiers))
        if unknown:
            raise ValueError(f"no classifier for {unknown}; available: {sorted(classifiers)}")
        for feature, value in targets.items():
            for item in (value if isinstance(value, Sequence) else [value]):
                if not 1 <= float(item) <= 5:
                    raise ValueError(f"{feature} must be in 1..5, got {item!r}")
        if scale < 0:
            raise ValueError(f"guidance scale must be >= 0, got {scale!r}")
        boxes = [box] if isinstance(box, LatentBox) else list(box)
        if len({b.size for b in boxes}) != 1:
            raise ValueError(f"all boxes of a batch must have one size, got {sorted({b.size for b in boxes})}")
        self.decode, self.classifiers, self.targets = decode, classifiers, dict(targets)
        self.boxes, self.scale, self.latent_scale = boxes, float(scale), float(latent_scale)
        self.gradient_mask = nodule_mask.float()  # 1 - M: the nodule area
        self.calibrations = {f: c for f, c in (calibrations or {}).items() if f != MALIGNANCY}

    @property
    def active(self) -> bool:
        return self.scale > 0 and bool(self.targets)

    def _target(self, feature: str, timesteps: torch.Tensor) -> torch.Tensor:
        """The requested levels of a batch, calibrated at ``timesteps`` when the feature has a calibration."""
        value, count = self.targets[feature], len(timesteps)
        values = [float(v) for v in value] if isinstance(value, Sequence) else [float(value)] * count
        if len(values) != count:
            raise ValueError(f"{feature}: {len(values)} targets for a batch of {count}")
        requested = torch.tensor(values, device=timesteps.device)
        if feature in self.calibrations:
            return self.calibrations[feature].target(requested, timesteps)
        return requested

    def _gradient(self, features: list[str], crop: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        with torch.enable_grad():
            crop = crop.detach().requires_grad_(True)
            image = self.decode(crop / self.latent_scale)
            loss = sum(feature_loss(f, self.classifiers[f](image, timesteps), self._target(f, timesteps))
                       for f in features)
            (gradient,) = torch.autograd.grad(loss, crop)
        return -gradient * self.gradient_mask  # the score: down the loss

    def _crop(self, latent: torch.Tensor) -> torch.Tensor:
        """The nodule window of each sample (one box for all, or one box per sample)."""
        if len(self.boxes) == 1:
            return latent[..., self.boxes[0].rows, self.boxes[0].cols]
        if len(self.boxes) != len(latent):
            raise ValueError(f"{len(self.boxes)} boxes for a batch of {len(latent)}")
        return torch.stack([z[:, b.rows, b.cols] for z, b in zip(latent, self.boxes)])

    def __call__(self, latent: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """``s * grad log p(y | z_t)`` over the whole latent (zero outside the nodule window)."""
        score = torch.zeros_like(latent)
        if not self.active:
            return score
        crop = self._crop(latent)
        shape_features = [f for f in self.targets if f != MALIGNANCY]
        gradient = self._gradient(shape_features, crop, timesteps) if shape_features else torch.zeros_like(crop)
        if MALIGNANCY in self.targets:
            guided = crop + self.scale * gradient  # malignancy is judged on the already guided latent
            gradient = gradient + self._gradient([MALIGNANCY], guided, timesteps)
        if len(self.boxes) == 1:
            score[..., self.boxes[0].rows, self.boxes[0].cols] = self.scale * gradient
        else:
            for i, b in enumerate(self.boxes):
                score[i, :, b.rows, b.cols] = self.scale * gradient[i]
        return score
