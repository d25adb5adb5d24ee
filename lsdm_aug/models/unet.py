"""The latent semantic diffusion U-Net: MONAI ``SPADEDiffusionModelUNet`` with LSDM's conditioning.

* input: the noisy latent concatenated with the encoded semantic map (the map scaled to [-1, 1] and
  passed through the autoencoder's encoder), so ``in_channels = 2 * latent_channels``;
* SPADE: the one-hot 8-class map, **max-pooled** to each block's resolution (MONAI resizes with
  nearest neighbour, which drops a nodule smaller than the pooling window; max-pooling keeps it, as
  the thesis prescribes). :class:`MaxPoolSPADE` is swapped in for MONAI's ``SPADE`` after the net is
  built; it adds no parameters, so checkpoints stay MONAI-compatible.
* optionally (``feature_conditioning``, for classifier-free guidance, thesis section 8.2) the nodule's
  feature vector (``conditioned_features``: malignancy, lobulation, spiculation, texture, each 1..5, and
  calcification 1..6 in the native default; 0 = "not given"), through
  MONAI's class-embedding path: the U-Net is built with ``num_class_embeds`` and its ``class_embedding``
  is a :class:`FeatureEmbedding`, whose output MONAI adds to the time embedding of every block. An
  embedding added to the time embedding, not cross-attention: it reaches every resolution (cross-attention
  only reaches the attention levels), costs one lookup per sample rather than attention at each level,
  and a feature vector of four ratings is one global code of the nodule, not a sequence to attend over.

Example:
    >>> import torch
    >>> from lsdm_aug.config import DiffusionConfig
    >>> unet = build_unet(DiffusionConfig(channels=(16, 16, 32), attention_levels=(False, False, False),
    ...                                   norm_num_groups=8, spade_intermediate_channels=8), latent_channels=3)
    >>> semantic = torch.zeros(1, 1, 32, 32, dtype=torch.long)
    >>> condition = SemanticCondition(latent=torch.zeros(1, 3, 8, 8), onehot=semantic_onehot(semantic))
    >>> predict_noise(unet, torch.zeros(1, 3, 8, 8), torch.tensor([10]), condition).shape
    torch.Size([1, 3, 8, 8])
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from monai.networks.blocks.spade_norm import SPADE
from monai.networks.nets import DiffusionModelUNet, SPADEDiffusionModelUNet

from lsdm_aug.config import CONDITIONING_FEATURES, FEATURES, RATING_LEVELS, DiffusionConfig, rating_level
from lsdm_aug.data.semantic import NUM_LABELS

__all__ = ["MaxPoolSPADE", "FeatureEmbedding", "build_unet", "semantic_onehot", "semantic_to_unit",
           "SemanticCondition", "predict_noise", "is_feature_conditioned", "feature_levels", "conditioned_features",
           "NULL_LEVEL", "CONDITIONING_FEATURES"]

NULL_LEVEL = 0  # "not given": the learned null token of each feature


class MaxPoolSPADE(SPADE):
    """MONAI's SPADE, with the semantic map max-pooled (not nearest-resized) to the features' size.

    In inference (``eval()`` and no autograd) the modulation ``gamma``, ``beta`` that the map gives is kept
    while the same, unmodified map tensor comes back with features of the same size and the weights are
    unchanged: a sampler passes one map at every step, and recomputing these convolutions is otherwise 30 %
    of a U-Net call. The result is the same as computing them each time; training never keeps them.
    """

    def forward(self, x: torch.Tensor, segmap: torch.Tensor) -> torch.Tensor:
        size = tuple(x.shape[2:])
        if self.training or torch.is_grad_enabled():
            self._modulation = None
            gamma, beta = self._modulation_of(segmap, size)
        else:
            key = (segmap._version, size, self._weights_version())
            cached = getattr(self, "_modulation", None)
            if cached is not None and cached[0]() is segmap and cached[1] == key:
                gamma, beta = cached[2], cached[3]
            else:
                gamma, beta = self._modulation_of(segmap, size)
                self._modulation = (weakref.ref(segmap), key, gamma, beta)
        return self.param_free_norm(x.contiguous()) * (1 + gamma) + beta

    def _modulation_of(self, segmap: torch.Tensor, size: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
        """MONAI's SPADE conditioning on the max-pooled map: (gamma, beta)."""
        if tuple(segmap.shape[2:]) != size and all(s >= t for s, t in zip(segmap.shape[2:], size)):
            segmap = F.adaptive_max_pool2d(segmap, size) if segmap.ndim == 4 else F.adaptive_max_pool3d(segmap, size)
        actv = self.mlp_shared(F.interpolate(segmap, size=size, mode="nearest"))
        return self.mlp_gamma(actv), self.mlp_beta(actv)

    def _weights_version(self) -> int:
        """The sum of the modulation weights' version counters (an in-place update, e.g. EMA's, changes it)."""
        weights = self.__dict__.get("_weights")
        if weights is None:
            weights = self.__dict__["_weights"] = tuple(self.parameters())
        return sum(p._version for p in weights)

    def _apply(self, fn, recurse: bool = True):
        """``to()``, ``half()``, ...: the kept modulation and the weights' list are dropped."""
        self.__dict__.pop("_weights", None)
        self._modulation = None
        return super()._apply(fn, recurse)


class FeatureEmbedding(torch.nn.Module):
    """The nodule feature vector as one embedding added to the U-Net's time embedding.

    Each feature has its own table: row 0 its learned null token ("not given"), rows 1..n its rating levels
    (n = :data:`~lsdm_aug.config.RATING_LEVELS`: 5, calcification 6); the features' embeddings are summed. The
    tables lie one after the other in ``weight``, in the order of ``features``, so a feature appended to a trained
    net's list adds rows at the end (a warm start keeps the trained rows). Zero-initialised, so a U-Net that gains
    it starts out computing exactly what it computed without it.

    Args:
        features: the features of the vector, in order (names of :data:`~lsdm_aug.config.CONDITIONING_FEATURES`).
        dim: the U-Net's time-embedding width.

    Example:
        >>> embedding = FeatureEmbedding(("malignancy", "lobulation", "spiculation", "texture", "calcification"), 8)
        >>> embedding(torch.tensor([[5, 0, 0, 1, 6]])).shape, tuple(embedding.weight.shape)
        (torch.Size([1, 8]), (31, 8))
    """

    def __init__(self, features: tuple[str, ...], dim: int) -> None:
        super().__init__()
        unknown = [f for f in features if f not in RATING_LEVELS]
        if unknown:
            raise ValueError(f"unknown features {unknown}; allowed: {list(CONDITIONING_FEATURES)}")
        self.features = tuple(features)
        self.num_features = len(self.features)
        self.register_buffer("_levels", torch.tensor([RATING_LEVELS[f] for f in self.features]), persistent=False)
        rows = torch.tensor([RATING_LEVELS[f] + 1 for f in self.features])
        self.register_buffer("_offsets", torch.cumsum(rows, 0) - rows, persistent=False)
        self.weight = torch.nn.Parameter(torch.zeros(int(rows.sum()), dim))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        if features.ndim != 2 or features.shape[1] != self.num_features:
            raise ValueError(f"features must be (batch, {self.num_features}) levels of {list(self.features)}, "
                             f"got {tuple(features.shape)}")
        features = features.long()
        if features.numel() and ((features < 0) | (features > self._levels)).any():
            tops = dict(zip(self.features, self._levels.tolist()))
            raise ValueError(f"feature levels must be 0 (not given) or 1..n with n per feature {tops}, "
                             f"got {features.min()}..{features.max()}")
        return F.embedding(features + self._offsets, self.weight).sum(1)


def feature_levels(features: dict[str, float] | None, count: int = 1,
                   names: tuple[str, ...] = FEATURES) -> torch.Tensor:
    """(count, len(names)) long levels of a feature dict for the features ``names`` (ratings rounded half up;
    absent -> 0, "not given").

    Example:
        >>> feature_levels({"malignancy": 4.5, "texture": 1})
        tensor([[5, 0, 0, 1]])
        >>> feature_levels({"calcification": 6}, names=("malignancy", "calcification"))
        tensor([[0, 6]])
    """
    features = features or {}
    unknown = sorted(set(features) - set(names))
    if unknown:
        raise ValueError(f"unknown features {unknown}; allowed: {list(names)}")
    row = []
    for name in names:
        value = features.get(name)
        if value is None:
            row.append(NULL_LEVEL)
            continue
        if not 1 <= float(value) <= RATING_LEVELS[name]:
            raise ValueError(f"{name} must be in 1..{RATING_LEVELS[name]}, got {value!r}")
        row.append(rating_level(float(value), RATING_LEVELS[name]))
    return torch.tensor([row] * count, dtype=torch.long)


def conditioned_features(unet: torch.nn.Module) -> tuple[str, ...]:
    """The features a U-Net takes (empty for one without feature conditioning)."""
    embedding = getattr(getattr(unet, "module", unet), "class_embedding", None)
    return embedding.features if isinstance(embedding, FeatureEmbedding) else ()


def build_unet(config: DiffusionConfig, latent_channels: int) -> SPADEDiffusionModelUNet | DiffusionModelUNet:
    """The SPADE diffusion U-Net of LSDM (noisy latent + encoded map in, noise out); with ``config.spade``
    false, the LDM baseline's plain U-Net (the map only concatenated)."""
    config.validate()
    levels = len(config.channels)
    if not config.spade:
        return DiffusionModelUNet(
            spatial_dims=2, in_channels=2 * latent_channels, out_channels=latent_channels,
            channels=tuple(config.channels), attention_levels=tuple(config.attention_levels),
            num_res_blocks=(config.num_res_blocks,) * levels, norm_num_groups=config.norm_num_groups,
            num_head_channels=config.num_head_channels)
    unet = SPADEDiffusionModelUNet(
        spatial_dims=2, in_channels=2 * latent_channels, out_channels=latent_channels, label_nc=NUM_LABELS,
        channels=tuple(config.channels), attention_levels=tuple(config.attention_levels),
        num_res_blocks=(config.num_res_blocks,) * levels, norm_num_groups=config.norm_num_groups,
        num_head_channels=config.num_head_channels, spade_intermediate_channels=config.spade_intermediate_channels,
        # any count opens MONAI's class-embedding path (the table is replaced); 6 keeps earlier versions' random stream
        num_class_embeds=6 if config.feature_conditioning else None)
    if config.feature_conditioning:
        unet.class_embedding = FeatureEmbedding(tuple(config.conditioned_features),
                                                unet.class_embedding.embedding_dim)
    for module in unet.modules():
        if type(module) is SPADE:
            module.__class__ = MaxPoolSPADE
    return unet


def semantic_onehot(semantic_map: torch.Tensor) -> torch.Tensor:
    """(B, 1, H, W) or (B, H, W) integer labels 0..7 -> (B, 8, H, W) float one-hot."""
    labels = semantic_map.long()
    if labels.ndim == 4:
        labels = labels[:, 0]
    if labels.numel() and (labels.min() < 0 or labels.max() >= NUM_LABELS):
        raise ValueError(f"semantic labels must be in 0..{NUM_LABELS - 1}, got {int(labels.min())}..{int(labels.max())}")
    return F.one_hot(labels, NUM_LABELS).permute(0, 3, 1, 2).float()


def semantic_to_unit(semantic_map: torch.Tensor) -> torch.Tensor:
    """Labels 0..7 scaled to [-1, 1], (B, 1, H, W) float: the image-like map the autoencoder encodes."""
    labels = semantic_map.float()
    if labels.ndim == 3:
        labels = labels[:, None]
    return labels / (NUM_LABELS - 1) * 2.0 - 1.0


@dataclass
class SemanticCondition:
    """What the U-Net is conditioned on: the encoded map (concatenated), the one-hot map (SPADE) and, for a
    feature-conditioned U-Net, the (B, 4) feature levels (0 = not given; ``None``: none given)."""

    latent: torch.Tensor
    onehot: torch.Tensor
    features: torch.Tensor | None = None

    def crop(self, rows: slice, cols: slice, factor: int) -> SemanticCondition:
        """The condition of a latent window (``rows``, ``cols`` in latent pixels; ``factor`` = downsampling)."""
        image_rows = slice(rows.start * factor, rows.stop * factor)
        image_cols = slice(cols.start * factor, cols.stop * factor)
        return SemanticCondition(self.latent[..., rows, cols], self.onehot[..., image_rows, image_cols], self.features)

    def repeat(self, times: int) -> SemanticCondition:
        features = None if self.features is None else self.features.repeat(times, 1)
        return SemanticCondition(self.latent.repeat(times, 1, 1, 1), self.onehot.repeat(times, 1, 1, 1), features)

    def with_features(self, features: torch.Tensor | None) -> SemanticCondition:
        """The same maps with other feature levels (``None``: not given)."""
        return SemanticCondition(self.latent, self.onehot, features)

    def levels(self, width: int | None = None) -> torch.Tensor:
        """(B, F) feature levels; zeros (not given) of ``width`` features where there are none."""
        if self.features is None:
            if width is None:
                raise ValueError("a condition without features needs the width of the feature vector")
            return torch.zeros(len(self.latent), width, dtype=torch.long, device=self.latent.device)
        return self.features.to(self.latent.device)

    @staticmethod
    def cat(conditions: list[SemanticCondition]) -> SemanticCondition:
        """Conditions stacked along the batch (the two passes of classifier-free guidance in one call)."""
        widths = {c.features.shape[1] for c in conditions if c.features is not None}
        if len(widths) > 1:
            raise ValueError(f"conditions with feature vectors of different widths {sorted(widths)}")
        features = None if not widths else torch.cat([c.levels(next(iter(widths))) for c in conditions])
        return SemanticCondition(torch.cat([c.latent for c in conditions]), torch.cat([c.onehot for c in conditions]),
                                 features)


def predict_noise(unet: torch.nn.Module, noisy_latent: torch.Tensor, timesteps: torch.Tensor,
                  condition: SemanticCondition) -> torch.Tensor:
    """epsilon_theta(Concat(z_t, E(m)), t) with SPADE fed the one-hot map (the LDM baseline: no SPADE), and the
    feature levels when the U-Net is feature-conditioned (none given: the null tokens)."""
    inputs = torch.cat([noisy_latent, condition.latent], dim=1)
    network = getattr(unet, "module", unet)
    if isinstance(network, DiffusionModelUNet):
        return unet(inputs, timesteps)
    if is_feature_conditioned(network):
        width = network.class_embedding.num_features
        return unet(inputs, timesteps, seg=condition.onehot, class_labels=condition.levels(width))
    return unet(inputs, timesteps, seg=condition.onehot)


def is_feature_conditioned(unet: torch.nn.Module) -> bool:
    """Whether ``unet`` takes the nodule feature vector (classifier-free guidance is possible)."""
    return isinstance(getattr(getattr(unet, "module", unet), "class_embedding", None), FeatureEmbedding)
