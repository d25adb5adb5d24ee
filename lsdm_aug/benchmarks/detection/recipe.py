"""The detection benchmark's settings: :class:`DetectionRecipe` and the shipped ``bench-detection-*`` recipes.

Example:
    >>> load_detection_recipe("bench-detection-phantom").image_size
    512
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lsdm_aug.benchmarks.recipes import load_benchmark_recipe
from lsdm_aug.data.phantom import SUPPORTED_SIZES
from lsdm_aug.data.prepared import HU_RANGE

__all__ = ["ARMS", "NNUNET_DEFAULTS", "DetectionRecipe", "load_detection_recipe"]

ARMS = ("real", "real+synthetic", "real+on-the-fly", "real+copy-paste", "real+synthetic-unguided")
# what nnU-Net's own trainer uses where a recipe leaves the setting null
NNUNET_DEFAULTS = {"initial_lr": 0.01, "oversample_foreground": 0.33, "p_scaling": 0.2, "scaling": (0.7, 1.4)}
TUPLE_KEYS = ("arms", "seeds", "features_per_stage", "ct_window", "patch_size", "curve_train_patients", "curve_arms",
              "scaling")


@dataclass
class DetectionRecipe:
    """The detection benchmark's settings (see :mod:`lsdm_aug.benchmarks.detection`).

    Real data come from the phantom (``prepared`` None: training patients 0 .. ``train_patients`` - 1, test
    patients from ``test_first_patient`` on, so every training-set size meets the same test set) or from a
    prepared dataset's train / test splits (e.g. LIDC). ``patch_size`` (None: nnU-Net's plan) and
    ``features_per_stage`` reduce nnU-Net's 2d plan; ``oversample_foreground`` is the share of training patches
    nnU-Net centres on foreground; ``optimizer`` / ``initial_lr``: nnU-Net's SGD or its AdamW variant;
    ``p_scaling`` / ``scaling``: the spatial augmentation's scaling (each None: nnU-Net's own,
    :data:`NNUNET_DEFAULTS`); ``random_crop``: a patch forced to hold a nodule has it anywhere within about a third
    of the patch from its centre instead of at the centre (nnU-Net's own: False; see
    :mod:`lsdm_aug.nnunet.trainers.nnUNetTrainerNoduleSynth`); ``progress_plot_every``: epochs between nnU-Net's progress plots (1: nnU-Net's
    every epoch); ``workers`` (arm, seed) runs share the CPU cores.
    ``tile_size``: nnU-Net's sliding window at prediction, in px (None: the training patch, nnU-Net's own); larger
    tiles give each prediction more context and keep lesions off the tile borders
    (:func:`lsdm_aug.nnunet.training.predict_folder`).
    ``curve_train_patients``: more real training-set sizes, each trained with ``curve_arms``.
    ``appearance_from_outline``: the LSDM cases and the on-the-fly arm (live or its bank) tell the U-Net the
    texture and calcification of each outline's real nodule (:class:`~lsdm_aug.transforms.core.NoduleSynthesizer`;
    default True, as the product's; no effect at w = 0, so not on the unguided arm).
    ``neighbour_slices`` > 0 makes the detector 2.5D: each case is a phantom slab (:mod:`lsdm_aug.data.phantom_slab`)
    whose middle slice is labelled and whose ``neighbour_slices`` slices on each side, ``slice_thickness_mm``
    apart, are extra input channels (one nnU-Net channel per slice); a vessel continues and shifts from
    slice to slice where a nodule stays and ends. Every arm works on slabs; the on-the-fly arm's bank nodules
    are made on phantom slices and spread over the slab's slices as their real source nodule spans them.

    Example:
        >>> DetectionRecipe(arms=("real", "real+synthetic"), seeds=(0,)).validate().num_epochs
        80
    """

    name: str = "bench-detection-phantom"
    image_size: int = 512
    model: str = "default"
    prepared: str | None = None
    train_patients: int = 8
    test_patients: int = 20
    test_first_patient: int = 1000
    slices_per_patient: int = 4
    nodule_free_fraction: float = 0.3
    data_seed: int = 100
    synthetic_count: int = 48
    synthetic_steps: int = 20
    guidance_scale: float = 1.0
    cfg_scale: float | None = None
    appearance_from_outline: bool = True
    on_the_fly: dict[str, Any] = field(default_factory=lambda: {"prob": 0.3, "malignancy": "balanced", "steps": 10})
    arms: tuple[str, ...] = ARMS
    seeds: tuple[int, ...] = (0, 1, 2, 3, 4)
    patch_size: tuple[int, ...] | None = None
    features_per_stage: tuple[int, ...] | None = (8, 16, 32, 64, 64, 64)
    batch_size: int | None = None
    ct_window: tuple[float, float] | None = HU_RANGE
    num_epochs: int = 80
    iterations_per_epoch: int = 25
    val_iterations_per_epoch: int = 2
    oversample_foreground: float | None = None
    optimizer: str = "sgd"
    initial_lr: float | None = None
    p_scaling: float | None = None
    scaling: tuple[float, float] | None = None
    random_crop: bool = False
    progress_plot_every: int = 10
    dataset_id: int = 900
    threshold: float = 0.5
    candidates_per_slice: int = 16
    operating_fps: float = 2.0
    test_time_mirroring: bool = True
    tile_step_size: float = 0.5
    tile_size: int | None = None
    device: str = "cpu"
    workers: int = 1
    bootstrap: int = 1000
    curve_train_patients: tuple[int, ...] = ()
    curve_arms: tuple[str, ...] = ("real", "real+synthetic")
    neighbour_slices: int = 0
    slice_thickness_mm: float = 2.0

    def validate(self) -> DetectionRecipe:
        for key, arms in (("arms", self.arms), ("curve_arms", self.curve_arms)):
            unknown = sorted(set(arms) - set(ARMS))
            if unknown or not arms:
                raise ValueError(f"{key} must be among {ARMS}, got {list(arms)}")
        if self.image_size not in SUPPORTED_SIZES:
            raise ValueError(f"image_size must be one of {SUPPORTED_SIZES}, got {self.image_size}")
        if not isinstance(self.appearance_from_outline, bool):
            raise ValueError(f"appearance_from_outline must be true or false, got {self.appearance_from_outline!r}")
        if min(self.train_patients, self.test_patients, self.slices_per_patient, len(self.seeds)) < 1:
            raise ValueError("train_patients, test_patients, slices_per_patient and seeds must be >= 1")
        largest = max((self.train_patients, *self.curve_train_patients))
        if self.prepared is None and self.test_first_patient < largest:
            raise ValueError(f"test_first_patient ({self.test_first_patient}) must be >= the largest training set "
                             f"({largest} patients): test patients would be training patients")
        if not 0 < self.threshold < 1:
            raise ValueError(f"threshold must be in (0, 1), got {self.threshold}")
        if self.candidates_per_slice < 0 or self.operating_fps <= 0:
            raise ValueError(f"candidates_per_slice must be >= 0 and operating_fps > 0, got "
                             f"{self.candidates_per_slice} and {self.operating_fps}")
        if self.ct_window is not None and not (len(self.ct_window) == 2 and self.ct_window[0] < self.ct_window[1]):
            raise ValueError(f"ct_window must be [low, high] HU with low < high (or null for nnU-Net's foreground "
                             f"percentiles), got {self.ct_window!r}")
        if self.patch_size is not None and (len(self.patch_size) != 2 or min(self.patch_size) < 16
                                            or any(p % 16 for p in self.patch_size)):
            raise ValueError(f"patch_size must be two multiples of 16 (>= 16) or null, got {self.patch_size!r}")
        if not 1 <= self.dataset_id <= 995:
            raise ValueError(f"dataset_id must be in 1..995 (ids id .. id+4 are used), got {self.dataset_id}")
        if self.workers < 1 or self.bootstrap < 0 or not 0 < self.tile_step_size <= 1:
            raise ValueError(f"workers must be >= 1, bootstrap >= 0 and tile_step_size in (0, 1], got "
                             f"{self.workers}, {self.bootstrap} and {self.tile_step_size}")
        if self.oversample_foreground is not None and not 0 <= self.oversample_foreground <= 1:
            raise ValueError(f"oversample_foreground must be in [0, 1] or null (nnU-Net's "
                             f"{NNUNET_DEFAULTS['oversample_foreground']}), got "
                             f"{self.oversample_foreground}")
        if self.optimizer not in ("sgd", "adamw") or (self.initial_lr is not None and not self.initial_lr > 0):
            raise ValueError(f"optimizer must be 'sgd' or 'adamw' and initial_lr > 0 or null (nnU-Net's "
                             f"{NNUNET_DEFAULTS['initial_lr']}), got "
                             f"{self.optimizer!r} and {self.initial_lr!r}")
        self._validate_augmentation()
        self._validate_slabs()
        if any(n < 1 for n in self.curve_train_patients):
            raise ValueError(f"curve_train_patients must be >= 1, got {list(self.curve_train_patients)}")
        return self

    def _validate_augmentation(self) -> None:
        if self.tile_size is not None and (isinstance(self.tile_size, bool) or not isinstance(self.tile_size, int)
                                           or self.tile_size < max(self.patch_size or (0,))):
            raise ValueError(f"tile_size must be null (the patch) or an int >= the patch size "
                             f"{list(self.patch_size or ())}, got {self.tile_size!r}")
        if not isinstance(self.random_crop, bool):
            raise ValueError(f"random_crop must be true or false (nnU-Net's: false), got {self.random_crop!r}")
        if self.p_scaling is not None and not 0 <= self.p_scaling <= 1:
            raise ValueError(f"p_scaling must be in [0, 1] or null (nnU-Net's {NNUNET_DEFAULTS['p_scaling']}), got "
                             f"{self.p_scaling!r}")
        if self.scaling is not None and not (len(self.scaling) == 2 and 0 < self.scaling[0] <= self.scaling[1]):
            raise ValueError(f"scaling must be [low, high] with 0 < low <= high or null (nnU-Net's "
                             f"{list(NNUNET_DEFAULTS['scaling'])}), got "
                             f"{self.scaling!r}")
        if self.progress_plot_every < 1:
            raise ValueError(f"progress_plot_every must be >= 1 (1: every epoch), got {self.progress_plot_every!r}")

    def _validate_slabs(self) -> None:
        from lsdm_aug.data.phantom_slab import MAX_SLICES, THICKNESS_RANGE_MM

        if not 0 <= self.neighbour_slices <= MAX_SLICES // 2:
            raise ValueError(f"neighbour_slices must be in 0..{MAX_SLICES // 2} (0: 2D), got {self.neighbour_slices!r}")
        if not THICKNESS_RANGE_MM[0] <= self.slice_thickness_mm <= THICKNESS_RANGE_MM[1]:
            raise ValueError(f"slice_thickness_mm must be in {list(THICKNESS_RANGE_MM)}, got {self.slice_thickness_mm!r}")
        if self.neighbour_slices and self.prepared is not None:
            raise ValueError(f"neighbour_slices > 0 needs phantom slabs; a prepared dataset ({self.prepared}) holds "
                             "single slices: set neighbour_slices: 0")

    @property
    def channels(self) -> int:
        """Input channels of each case: the labelled slice and its neighbours."""
        return 2 * self.neighbour_slices + 1


def load_detection_recipe(name_or_path: str | Path) -> DetectionRecipe:
    """A shipped recipe by name (``bench-detection-phantom``, ``bench-detection-lidc-512``, ...) or a YAML path."""
    return load_benchmark_recipe(DetectionRecipe, name_or_path, "detection", TUPLE_KEYS)
