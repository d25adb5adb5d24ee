"""lsdm-aug: lung-nodule data for segmentation and detection training, with latent semantic diffusion (LSDM).

The public API is re-exported here and imported on first use, so ``import lsdm_aug`` (and the
``lsdm-aug --help`` it backs) stays instant.

Example:
    >>> from lsdm_aug import ChestPhantom, PhantomConfig
    >>> ChestPhantom(PhantomConfig(size=64)).slice(0).hu.shape
    (64, 64)
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "NoduleSynth": "lsdm_aug.transforms.monai",
    "NoduleSynthd": "lsdm_aug.transforms.monai",
    "NoduleSynthD": "lsdm_aug.transforms.monai",
    "NoduleSynthDict": "lsdm_aug.transforms.monai",
    "NoduleSynthBatchd": "lsdm_aug.transforms.monai",
    "NoduleBank": "lsdm_aug.bank",
    "LSDMPipeline": "lsdm_aug.pipeline",
    "load_recipe": "lsdm_aug.config",
    "ChestPhantom": "lsdm_aug.data.phantom",
    "PhantomConfig": "lsdm_aug.data.phantom",
    "prepare_phantom": "lsdm_aug.data.phantom",
    "prepare_lidc": "lsdm_aug.data.lidc_prepare",
    "PreparedDataset": "lsdm_aug.data.prepared",
    "SemanticLabel": "lsdm_aug.data.semantic",
    "semantic_map_from_hu": "lsdm_aug.data.semantic",
    "lung_mask_from_hu": "lsdm_aug.data.semantic",
    "load_nodule_table": "lsdm_aug.data.lidc",
    "NoduleMaskBank": "lsdm_aug.data.lidc",
}

__all__ = sorted(_EXPORTS) + ["__version__"]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'lsdm_aug' has no attribute {name!r}")
