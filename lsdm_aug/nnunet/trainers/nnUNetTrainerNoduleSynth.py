"""``nnUNetTrainerNoduleSynth``: nnU-Net's trainer with NoduleSynth prepended to the training transforms.

Found by nnU-Net through ``nnUNet_extTrainer`` (see :mod:`lsdm_aug.nnunet`). Only
``get_training_transforms`` changes (as nnU-Net's own ``nnUNetTrainerDA5`` does), plus the optional
epoch budget and seed from ``LSDM_AUG_NNUNET``.
"""

from __future__ import annotations

import json
import os
import random

import numpy as np
import torch
from batchgeneratorsv2.transforms.utils.compose import ComposeTransforms
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

from lsdm_aug.transforms.nnunet import NoduleSynthTransform

_BUDGET_KEYS = ("num_epochs", "num_iterations_per_epoch", "num_val_iterations_per_epoch")


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


class nnUNetTrainerNoduleSynth(nnUNetTrainer):  # noqa: N801 - nnU-Net's naming
    """nnU-Net trainer that inserts synthetic nodules with controlled features into training patches."""

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")) -> None:
        super().__init__(plans, configuration, fold, dataset_json, device)
        settings = _settings()
        if "seed" in settings:  # the benchmark's seeds: initial weights, sampling and augmentation draws
            seed = int(settings.pop("seed"))
            random.seed(seed)
            np.random.seed(seed)
            torch.manual_seed(seed)
        for key in _BUDGET_KEYS:
            if key in settings:
                setattr(self, key, int(settings[key]))
        self.nodule_synth_settings = {k: v for k, v in settings.items() if k not in _BUDGET_KEYS}

    def get_training_transforms(self, patch_size, rotation_for_DA, deep_supervision_scales, mirror_axes,
                                do_dummy_2d_data_aug, use_mask_for_norm=None, is_cascaded=False,
                                foreground_labels=None, regions=None, ignore_label=None):
        base = nnUNetTrainer.get_training_transforms(
            patch_size, rotation_for_DA, deep_supervision_scales, mirror_axes, do_dummy_2d_data_aug,
            use_mask_for_norm, is_cascaded, foreground_labels, regions, ignore_label)
        properties = self.plans_manager.foreground_intensity_properties_per_channel["0"]
        synth = NoduleSynthTransform(spacing_mm=self.configuration_manager.spacing, hu_mean=properties["mean"],
                                     hu_std=properties["std"], label_value=max(foreground_labels or [1]),
                                     **{"device": "cpu", **self.nodule_synth_settings})
        return ComposeTransforms([synth, *base.transforms])
