"""Dataclasses for each LSDM component and stage, and :func:`load_recipe` for the YAML recipes.

A recipe names the image size and holds one section per component; unknown keys and wrong types
are errors that name the key and the allowed values, so a typo never trains the wrong model.

Example:
    >>> recipe = load_recipe("phantom-smoke")
    >>> recipe.autoencoder.latent_channels
    3
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml

__all__ = [
    "FEATURES",
    "RATING_LEVELS",
    "rating_level",
    "CONDITIONING_FEATURES",
    "AutoencoderConfig",
    "DiffusionConfig",
    "ClassifierConfig",
    "AutoencoderTraining",
    "DiffusionTraining",
    "ClassifierTraining",
    "Recipe",
    "load_recipe",
    "RecipeError",
    "RECIPES_DIR",
]

RECIPES_DIR = Path(__file__).resolve().parent / "recipes"
FEATURES = ("malignancy", "lobulation", "spiculation", "texture")  # the guided features (one classifier each)
#: Every feature a request may name, with its LIDC rating scale 1..n: the four guided ones and calcification
#: (1 popcorn, 2 laminated, 3 solid, 4 non-central, 5 central, 6 absent), which only a U-Net conditioned on it
#: steers (classifier-free guidance).
RATING_LEVELS = {"malignancy": 5, "lobulation": 5, "spiculation": 5, "texture": 5, "calcification": 6}
CONDITIONING_FEATURES = tuple(RATING_LEVELS)


def rating_level(value: float | np.ndarray, high: int = 5) -> int | np.ndarray:
    """The level 1..``high`` that a (mean) LIDC rating stands for: rounded half up, then clipped to the scale.

    Example:
        >>> rating_level(2.5), rating_level(np.array([0.7, 3.49, 5.2])).tolist(), rating_level(6.0, high=6)
        (3, [1, 3, 5], 6)
    """
    levels = np.clip(np.floor(np.asarray(value, dtype=float) + 0.5), 1, high).astype(int)
    return int(levels) if levels.ndim == 0 else levels


class RecipeError(ValueError):
    """A recipe key or value is not allowed; the message names it."""


@dataclass
class AutoencoderConfig:
    """KL autoencoder (MONAI ``AutoencoderKL``): downsampling 2^(levels-1), ``latent_channels`` channels.

    Example:
        >>> AutoencoderConfig(channels=(32, 64, 64)).downsampling
        4
    """

    channels: tuple[int, ...] = (32, 64, 64)
    num_res_blocks: int = 1
    latent_channels: int = 3
    norm_num_groups: int = 16
    attention: bool = False

    @property
    def downsampling(self) -> int:
        return 2 ** (len(self.channels) - 1)

    def validate(self) -> None:
        if any(c % self.norm_num_groups for c in self.channels):
            raise RecipeError(f"autoencoder.channels {self.channels} must be multiples of norm_num_groups "
                              f"{self.norm_num_groups}")


@dataclass
class DiffusionConfig:
    """Latent semantic diffusion U-Net (MONAI ``SPADEDiffusionModelUNet``) and its noise schedule.

    ``spade: false`` builds the LDM baseline instead: MONAI's plain ``DiffusionModelUNet``, conditioned
    only by the encoded map concatenated to the noisy latent. ``feature_conditioning`` adds the nodule
    feature vector (see :class:`lsdm_aug.models.unet.FeatureEmbedding`), for classifier-free guidance;
    ``conditioned_features`` names its features, in the order of the embedding's tables (a U-Net saved before the
    key existed is conditioned on the four guided ones).
    """

    channels: tuple[int, ...] = (32, 64, 64)
    num_res_blocks: int = 1
    attention_levels: tuple[bool, ...] = (False, False, True)
    num_head_channels: int = 32
    norm_num_groups: int = 16
    spade_intermediate_channels: int = 32
    num_train_timesteps: int = 1000
    beta_schedule: str = "linear_beta"
    beta_start: float = 0.0015
    beta_end: float = 0.0195
    spade: bool = True
    feature_conditioning: bool = False
    conditioned_features: tuple[str, ...] = FEATURES

    @property
    def downsampling(self) -> int:
        """How much the U-Net shrinks its input: a latent side must be a multiple of it.

        Example:
            >>> DiffusionConfig(channels=(32, 64, 64)).downsampling
            4
        """
        return 2 ** (len(self.channels) - 1)

    def validate(self) -> None:
        unknown = [f for f in self.conditioned_features if f not in CONDITIONING_FEATURES]
        if unknown or len(set(self.conditioned_features)) != len(self.conditioned_features):
            raise RecipeError(f"diffusion.conditioned_features must be distinct names among {CONDITIONING_FEATURES}, "
                              f"got {list(self.conditioned_features)}")
        if self.feature_conditioning and not self.spade:
            raise RecipeError("diffusion.feature_conditioning needs the SPADE U-Net (spade: true)")
        if len(self.attention_levels) != len(self.channels):
            raise RecipeError(f"diffusion.attention_levels needs one entry per level of channels {self.channels}, "
                              f"got {self.attention_levels}")
        if self.beta_schedule not in ("linear_beta", "scaled_linear_beta"):
            raise RecipeError(f"diffusion.beta_schedule must be 'linear_beta' or 'scaled_linear_beta', "
                              f"got {self.beta_schedule!r}")


@dataclass
class ClassifierConfig:
    """Feature classifiers fed ``Crop(Decoder(z_t))`` (MONAI ``DiffusionModelEncoder``)."""

    features: tuple[str, ...] = FEATURES
    channels: tuple[int, ...] = (16, 32, 32)
    num_res_blocks: int = 1
    norm_num_groups: int = 8
    crop_px: int = 32

    def validate(self) -> None:
        unknown = [f for f in self.features if f not in FEATURES]
        if unknown:
            raise RecipeError(f"classifiers.features must be among {FEATURES}, got {unknown}")


@dataclass
class SpadeGanConfig:
    """The SPADE GAN baseline (MONAI ``SPADENet`` generator, map -> slice; ``PatchDiscriminator`` on slice + map)."""

    channels: tuple[int, ...] = (32, 64, 128)
    spade_intermediate_channels: int = 32
    discriminator_channels: int = 32


@dataclass
class SpadeGanTraining:
    steps: int = 4000
    batch_size: int = 16
    learning_rate: float = 2e-4
    l1_weight: float = 10.0
    adversarial_weight: float = 1.0
    validate_every: int = 500


@dataclass
class AutoencoderTraining:
    """How the autoencoder trains; ``init_from`` starts from another model folder's autoencoder."""

    steps: int = 6000
    batch_size: int = 16
    crop_px: int = 64
    learning_rate: float = 5e-4
    kl_weight: float = 1e-6
    adversarial_weight: float = 0.01
    adversarial_start: int = 2000
    perceptual_weight: float = 0.0
    perceptual_weights_path: str | None = None
    perceptual_depth: int = 50
    validate_every: int = 500
    init_from: str | None = None


@dataclass
class DiffusionTraining:
    """How the U-Net trains.

    ``crop_px`` (image pixels, a multiple of the downsampling; 0 = whole slices) is the training window,
    ``nodule_share`` the share of windows placed around a nodule. ``feature_dropout_all`` /
    ``feature_dropout`` drop the feature vector of a feature-conditioned U-Net (all four / each alone) for
    classifier-free guidance; ``feature_lr_scale`` multiplies the learning rate of the feature embedding alone
    (it starts at zero and, at the U-Net's rate, hardly moves in a few thousand CPU steps).
    ``nodule_loss_weight`` weighs the noise error on the nodules' latent footprint (dilated by one latent pixel)
    that many times the rest (1: the thesis's plain MSE): a nodule covers about 1 % of a 32 x 32 window, so with
    plain MSE the U-Net learns the nodule and its feature vector from a sliver of the gradient. ``init_from`` starts
    from another model folder's U-Net (keys that the other
    net lacks, such as the feature embedding, keep their initial values). ``max_train_slices`` (0: all) encodes
    only the first slices of the train split: at 512 px the frozen encoder costs about a second per slice on
    one CPU core, and crops of a few hundred whole slices already outnumber the training steps' samples.
    """

    steps: int = 8000
    batch_size: int = 16
    learning_rate: float = 2e-4
    ema_decay: float = 0.999
    validate_every: int = 1000
    crop_px: int = 0
    nodule_share: float = 0.5
    feature_dropout_all: float = 0.15
    feature_dropout: float = 0.15
    feature_lr_scale: float = 1.0
    nodule_loss_weight: float = 1.0
    init_from: str | None = None
    max_train_slices: int = 0

    def validate(self, downsampling: int) -> None:
        if self.max_train_slices < 0:
            raise RecipeError(f"train_diffusion.max_train_slices must be >= 0 (0: all), got {self.max_train_slices}")
        if self.crop_px < 0 or self.crop_px % downsampling:
            raise RecipeError(f"train_diffusion.crop_px must be 0 or a positive multiple of {downsampling}, "
                              f"got {self.crop_px}")
        if not self.feature_lr_scale > 0:
            raise RecipeError(f"train_diffusion.feature_lr_scale must be > 0, got {self.feature_lr_scale}")
        if not self.nodule_loss_weight >= 1:
            raise RecipeError(f"train_diffusion.nodule_loss_weight must be >= 1 (1: plain MSE), "
                              f"got {self.nodule_loss_weight}")
        for name in ("nodule_share", "feature_dropout_all", "feature_dropout"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise RecipeError(f"train_diffusion.{name} must be in [0, 1], got {getattr(self, name)}")


@dataclass
class ClassifierTraining:
    """How the feature classifiers train.

    ``malignancy_ambiguous`` is a closed range ``[low, high]`` of mean malignancy ratings left out of the
    malignancy classifier's training: ``[2.5, 3.5]`` trains benign (<= 2) against malignant (>= 4), as the
    independent evaluator does, because indeterminate nodules (mean rating 2.5..3.5, about half of them)
    can hardly be told from benign ones in the image. Empty: every nodule (benign <= 2.5, malignant >= 3).
    ``augment`` adds random flips and 90-degree rotations of the decoded crops.
    """

    steps: int = 2000
    batch_size: int = 32
    learning_rate: float = 3e-4
    ema_decay: float = 0.9999
    max_timestep: int = 1000
    validate_every: int = 500
    malignancy_ambiguous: tuple[float, ...] = ()
    augment: bool = False

    def validate(self) -> None:
        band = self.malignancy_ambiguous
        if band and (len(band) != 2 or not 1 <= band[0] <= band[1] <= 5):
            raise RecipeError(f"train_classifiers.malignancy_ambiguous must be [] or [low, high] within 1..5, "
                              f"got {list(band)}")
        if self.max_timestep < 1:
            raise RecipeError(f"train_classifiers.max_timestep must be >= 1, got {self.max_timestep}")


@dataclass
class Recipe:
    """A whole LSDM setting: image size, the three components and how each stage trains."""

    name: str = "custom"
    image_size: int = 128
    autoencoder: AutoencoderConfig = field(default_factory=AutoencoderConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    classifiers: ClassifierConfig = field(default_factory=ClassifierConfig)
    train_autoencoder: AutoencoderTraining = field(default_factory=AutoencoderTraining)
    train_diffusion: DiffusionTraining = field(default_factory=DiffusionTraining)
    train_classifiers: ClassifierTraining = field(default_factory=ClassifierTraining)
    spade_gan: SpadeGanConfig = field(default_factory=SpadeGanConfig)
    train_spade_gan: SpadeGanTraining = field(default_factory=SpadeGanTraining)

    @property
    def size_step(self) -> int:
        """Image pixels per U-Net size step: a window the networks take has a side that is a multiple of it
        (the autoencoder's downsampling times the U-Net's).

        Example:
            >>> Recipe(autoencoder=AutoencoderConfig(channels=(32, 64, 64)),
            ...        diffusion=DiffusionConfig(channels=(32, 64, 64))).size_step
            16
        """
        return self.autoencoder.downsampling * self.diffusion.downsampling

    def validate(self) -> Recipe:
        if self.image_size % self.autoencoder.downsampling:
            raise RecipeError(f"image_size {self.image_size} must be a multiple of the autoencoder's downsampling "
                              f"{self.autoencoder.downsampling}")
        for part in (self.autoencoder, self.diffusion, self.classifiers, self.train_classifiers):
            part.validate()
        self.train_diffusion.validate(self.autoencoder.downsampling)
        return self

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _coerce(value: Any, annotation: Any, key: str) -> Any:
    origin = typing.get_origin(annotation)
    if dataclasses.is_dataclass(annotation):
        return _build(annotation, value, key)
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise RecipeError(f"{key} must be a list, got {value!r}")
        item_type = typing.get_args(annotation)[0]
        return tuple(_coerce(v, item_type, f"{key}[{i}]") for i, v in enumerate(value))
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        if value is None:
            return None
        return _coerce(value, [a for a in typing.get_args(annotation) if a is not type(None)][0], key)
    if annotation is float:
        if isinstance(value, str):  # YAML 1.1 reads 1e-4 (no dot) as text
            try:
                return float(value)
            except ValueError:
                raise RecipeError(f"{key} must be a number, got {value!r}") from None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise RecipeError(f"{key} must be a number, got {value!r}")
        return float(value)
    if annotation in (int, str, bool) and not isinstance(value, annotation) or (
            annotation is int and isinstance(value, bool)):
        raise RecipeError(f"{key} must be {annotation.__name__}, got {value!r}")
    return value


def _build(cls: type, values: dict[str, Any] | None, prefix: str) -> Any:
    values = values or {}
    if not isinstance(values, dict):
        raise RecipeError(f"{prefix} must be a mapping, got {values!r}")
    hints = typing.get_type_hints(cls)
    allowed = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(values) - set(allowed))
    if unknown:
        raise RecipeError(f"unknown key {prefix + '.' if prefix else ''}{unknown[0]}; allowed: {', '.join(allowed)}")
    return cls(**{k: _coerce(v, hints[k], f"{prefix + '.' if prefix else ''}{k}") for k, v in values.items()})


def recipe_from_dict(values: dict[str, Any]) -> Recipe:
    """Build and validate a :class:`Recipe` from a (YAML-loaded) mapping."""
    return _build(Recipe, values, "").validate()


def load_recipe(name_or_path: str | Path) -> Recipe:
    """Load a recipe by name (``phantom-smoke``, ``phantom-128``, ``lidc-512``) or from a YAML file.

    Raises:
        RecipeError: unknown name, missing file, unknown key or wrong type (the message names it).
    """
    path = Path(name_or_path)
    if not path.suffix:
        path = RECIPES_DIR / f"{name_or_path}.yaml"
    if not path.is_file():
        known = sorted(p.stem for p in RECIPES_DIR.glob("*.yaml") if not p.stem.startswith("bench-"))
        raise RecipeError(f"recipe {str(name_or_path)!r} not found; built-in recipes: {', '.join(known)}")
    values = yaml.safe_load(path.read_text()) or {}
    values.setdefault("name", path.stem)
    return recipe_from_dict(values)
