"""``nnUNetTrainerNoduleSynth``: nnU-Net's trainer with NoduleSynth prepended to the training transforms.

Found by nnU-Net through ``nnUNet_extTrainer`` (see :mod:`lsdm_aug.nnunet`). Only
``get_training_transforms`` changes (as nnU-Net's own ``nnUNetTrainerDA5`` does), plus optional trainer
attributes from ``LSDM_AUG_NNUNET``: the epoch budget (``num_epochs``, ``num_iterations_per_epoch``,
``num_val_iterations_per_epoch``), the share of patches forced to hold foreground
(``oversample_foreground_percent``, nnU-Net's 0.33, as its ``nnUNetTrainer_probabilisticOversampling_*``
variants change it), the optimizer (``optimizer``: ``"sgd"``, nnU-Net's default, or ``"adamw"``, its
``nnUNetTrainerAdam`` variant; ``initial_lr``), the spatial augmentation's scaling (``p_scaling``, ``scaling``),
where a patch forced to hold foreground puts it (``random_crop``, below) and the seed.

``random_crop``: nnU-Net centres each patch forced to hold foreground on a foreground voxel (its loader cuts the
larger, pre-rotation patch around the voxel and the spatial transform takes the final patch from that one's
centre). A lesion smaller than the patch then sits at the centre of nearly every positive patch, and a network
learns that: at prediction, where a lesion falls between the sliding window's tile centres, it is not found.
With ``random_crop`` true the spatial transform takes the final patch at a random place inside the larger one
(batchgenerators' own ``random_crop``, its centre at least half a patch from the border), so the voxel lands up
to (larger - final) / 2 px off the centre, about a third of the patch for nnU-Net's 2D rotation range.

A seed makes a run repeatable: it seeds the initial weights and, through seeds handed to nnU-Net's
background augmenters (which nnU-Net starts unseeded, so their patch sampling and augmentation differ
between runs), every training batch. Same seed, same ``nnUNet_n_proc_DA``, same weights on CPU.
"""

from __future__ import annotations

import json
import os
import random
from collections.abc import Sequence
from unittest import mock

import numpy as np
import torch
from batchgenerators.dataloading.nondet_multi_threaded_augmenter import NonDetMultiThreadedAugmenter
from batchgeneratorsv2.transforms.spatial.spatial import SpatialTransform
from batchgeneratorsv2.transforms.utils.compose import ComposeTransforms
from nnunetv2.training.nnUNetTrainer import nnUNetTrainer as nnunet_trainer_module
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

from lsdm_aug.nnunet.plans import check_lung_window
from lsdm_aug.transforms.nnunet import NoduleSynthTransform

_BUDGET_KEYS = ("num_epochs", "num_iterations_per_epoch", "num_val_iterations_per_epoch")
_FRACTION_KEYS = ("oversample_foreground_percent",)
_OPTIMIZER_KEYS = ("optimizer", "initial_lr")
_AUGMENTATION_KEYS = ("p_scaling", "scaling", "random_crop")
OPTIMIZERS = ("sgd", "adamw")


def _settings() -> dict:
    text = os.environ.get("LSDM_AUG_NNUNET", "").strip()
    if not text:
        return {}
    try:
        settings = json.loads(text)
    except json.JSONDecodeError as error:
        raise ValueError(f"LSDM_AUG_NNUNET must be a JSON object, got {text!r}: {error}") from error
    if not isinstance(settings, dict):
        raise ValueError(f"LSDM_AUG_NNUNET must be a JSON object, got {text!r}")
    return settings


def nodule_label_value(foreground_labels: list[int] | None, requested: int | None) -> int:
    """The segmentation value of inserted nodules: the one foreground label of a single-label dataset, or the
    user's ``label_value`` (``LSDM_AUG_NNUNET``), which must be one of the dataset's labels.

    Example:
        >>> nodule_label_value([1], None), nodule_label_value([1, 2], 2)
        (1, 2)
    """
    labels = sorted(int(v) for v in (foreground_labels or [1]))
    if requested is None:
        if len(labels) > 1:
            raise ValueError(f"the dataset has foreground labels {labels}: set label_value in LSDM_AUG_NNUNET to the "
                             "nodule's label (e.g. {\"label_value\": 2})")
        return labels[0]
    if int(requested) not in labels:
        raise ValueError(f"label_value {requested} is not among the dataset's foreground labels {labels}")
    return int(requested)


def spatial_scaling(settings: dict) -> dict[str, float | tuple[float, float]]:
    """The spatial augmentation's scaling from ``LSDM_AUG_NNUNET`` (``p_scaling`` in [0, 1], ``scaling`` a range
    of positive factors, low <= high); only the keys given, the rest stay nnU-Net's.

    Example:
        >>> spatial_scaling({"p_scaling": 0.5, "scaling": [0.6, 1.6]})
        {'p_scaling': 0.5, 'scaling': (0.6, 1.6)}
    """
    chosen: dict[str, float | tuple[float, float]] = {}
    if "p_scaling" in settings:
        chosen["p_scaling"] = float(settings["p_scaling"])
        if not 0.0 <= chosen["p_scaling"] <= 1.0:
            raise ValueError(f"p_scaling in LSDM_AUG_NNUNET must be in [0, 1], got {settings['p_scaling']!r}")
    if "scaling" in settings:
        value = settings["scaling"]
        if not (isinstance(value, (list, tuple)) and len(value) == 2 and 0 < float(value[0]) <= float(value[1])):
            raise ValueError(f"scaling in LSDM_AUG_NNUNET must be [low, high] with 0 < low <= high, got {value!r}")
        chosen["scaling"] = (float(value[0]), float(value[1]))
    return chosen


def axial_axis(transpose_forward: Sequence[int], patch_dims: int) -> int:
    """Where z went in nnU-Net's patches: nnU-Net reads every image as (z, y, x) and then transposes it by the
    plans' ``transpose_forward`` (coarsest axis first). A 2D configuration must slice along z.

    Example:
        >>> axial_axis([0, 1, 2], 3), axial_axis([1, 0, 2], 3)
        (0, 1)
    """
    axis = list(transpose_forward).index(0)
    if patch_dims == 2 and axis != 0:
        raise ValueError(f"nnU-Net's 2d configuration slices this dataset along its axis {transpose_forward[0]} "
                         f"(transpose_forward {list(transpose_forward)}), not axially: NoduleSynth inserts into axial "
                         "slices; use 3d_fullres")
    return axis


def crop_anywhere(spatial: SpatialTransform) -> None:
    """Make nnU-Net's spatial transform take its final patch at a random place inside the loaded, larger one
    (batchgenerators' ``random_crop``; the patch centre at least half a patch from the border) instead of at its
    centre, where nnU-Net's loader put the foreground voxel of a patch forced to hold foreground.

    Example:
        >>> transform = SpatialTransform((64, 64), patch_center_dist_from_border=0, random_crop=False)
        >>> crop_anywhere(transform)
        >>> transform.random_crop, transform.patch_center_dist_from_border
        (True, [32.0, 32.0])
    """
    spatial.random_crop = True
    spatial.patch_center_dist_from_border = [size / 2 for size in spatial.patch_size]


class nnUNetTrainerNoduleSynth(nnUNetTrainer):  # noqa: N801 - nnU-Net's naming
    """nnU-Net trainer that inserts synthetic nodules with controlled features into training patches."""

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")) -> None:
        super().__init__(plans, configuration, fold, dataset_json, device)
        settings = _settings()
        seed = settings.pop("seed", None)
        self.seed = None if seed is None else int(seed)
        if self.seed is not None:  # initial weights here; sampling and augmentation in get_dataloaders
            random.seed(self.seed)
            np.random.seed(self.seed)
            torch.manual_seed(self.seed)
        for key in _BUDGET_KEYS:
            if key in settings:
                setattr(self, key, int(settings[key]))
        for key in _FRACTION_KEYS:
            if key in settings:
                value = float(settings[key])
                if not 0.0 <= value <= 1.0:
                    raise ValueError(f"{key} in LSDM_AUG_NNUNET must be in [0, 1], got {settings[key]!r}")
                setattr(self, key, value)
        self.optimizer_name = str(settings.get("optimizer", "sgd"))
        if self.optimizer_name not in OPTIMIZERS:
            raise ValueError(f"optimizer in LSDM_AUG_NNUNET must be one of {OPTIMIZERS}, got {self.optimizer_name!r}")
        if "initial_lr" in settings:
            self.initial_lr = float(settings["initial_lr"])
            if not self.initial_lr > 0:
                raise ValueError(f"initial_lr in LSDM_AUG_NNUNET must be > 0, got {settings['initial_lr']!r}")
        self.progress_plot_every = int(settings.get("progress_plot_every", 1))
        if self.progress_plot_every < 1:
            raise ValueError(f"progress_plot_every in LSDM_AUG_NNUNET must be >= 1, got "
                             f"{settings['progress_plot_every']!r}")
        self.spatial_scaling = spatial_scaling(settings)
        self.random_crop = settings.get("random_crop", False)
        if not isinstance(self.random_crop, bool):
            raise ValueError(f"random_crop in LSDM_AUG_NNUNET must be true or false, got {self.random_crop!r}")
        trainer_keys = _BUDGET_KEYS + _FRACTION_KEYS + _OPTIMIZER_KEYS + _AUGMENTATION_KEYS + ("progress_plot_every",)
        self.nodule_synth_settings = {k: v for k, v in settings.items() if k not in trainer_keys}

    def get_training_transforms(self, patch_size, rotation_for_DA, deep_supervision_scales, mirror_axes,
                                do_dummy_2d_data_aug, use_mask_for_norm=None, is_cascaded=False,
                                foreground_labels=None, regions=None, ignore_label=None):
        base = nnUNetTrainer.get_training_transforms(
            patch_size, rotation_for_DA, deep_supervision_scales, mirror_axes, do_dummy_2d_data_aug,
            use_mask_for_norm, is_cascaded, foreground_labels, regions, ignore_label)
        properties = self.plans_manager.foreground_intensity_properties_per_channel["0"]
        settings = dict(self.nodule_synth_settings)
        label_value = nodule_label_value(foreground_labels, settings.pop("label_value", None))
        if settings.get("slice_thickness_mm") is not None:  # 2.5D: every channel is a CT slice with its own statistics
            channels = self.plans_manager.foreground_intensity_properties_per_channel
            settings["channel_stats"] = [(channels[c]["mean"], channels[c]["std"]) for c in sorted(channels, key=int)]
        synth = NoduleSynthTransform(spacing_mm=self.configuration_manager.spacing, hu_mean=properties["mean"],
                                     hu_std=properties["std"], label_value=label_value,
                                     axial_axis=axial_axis(self.plans_manager.transpose_forward, len(patch_size)),
                                     **{"device": "cpu", **settings})
        if synth.prob > 0 and synth.synthesizer.mode == "insert":  # insertion looks for lung in the patch
            check_lung_window(properties)
        for transform in base.transforms:
            if isinstance(transform, SpatialTransform):
                for key, value in self.spatial_scaling.items():
                    setattr(transform, key, value)
                if self.random_crop:
                    crop_anywhere(transform)
        return ComposeTransforms([synth, *base.transforms])

    def on_epoch_end(self):
        """nnU-Net's epoch end, its progress plot drawn every ``progress_plot_every`` epochs and at the last."""
        last = self.current_epoch == self.num_epochs - 1
        if last or (self.current_epoch + 1) % self.progress_plot_every == 0:
            return super().on_epoch_end()
        with mock.patch.object(self.logger, "plot_progress_png"):
            return super().on_epoch_end()

    def configure_optimizers(self):
        """nnU-Net's SGD, or with ``optimizer: adamw`` its ``nnUNetTrainerAdam`` (AdamW, amsgrad, poly decay)."""
        if self.optimizer_name == "adamw":
            from nnunetv2.training.nnUNetTrainer.variants.optimizer.nnUNetTrainerAdam import nnUNetTrainerAdam

            return nnUNetTrainerAdam.configure_optimizers(self)
        return super().configure_optimizers()

    def get_dataloaders(self):
        """nnU-Net's loaders; with a seed, its background augmenters get seeds drawn from the seeded NumPy state
        (nnU-Net passes ``seeds=None``: each worker then reseeds itself from the operating system)."""
        if self.seed is None:
            return super().get_dataloaders()
        with mock.patch.object(nnunet_trainer_module, "NonDetMultiThreadedAugmenter", _SeededAugmenter):
            return super().get_dataloaders()


class _SeededAugmenter(NonDetMultiThreadedAugmenter):
    """nnU-Net's background augmenter with one seed per worker, drawn from the (seeded) global NumPy state."""

    def __init__(self, data_loader, transform, num_processes, *args, seeds=None, **kwargs) -> None:
        seeds = [int(s) for s in np.random.randint(0, 2**31 - 1, num_processes)] if seeds is None else seeds
        super().__init__(data_loader, transform, num_processes, *args, seeds=seeds, **kwargs)
