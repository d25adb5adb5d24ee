"""The in-project feature extractor: trains on prepared slices, round-trips its weights, and its FID and
perceptual distance behave as distances."""

from __future__ import annotations

import pytest
import torch

from lsdm_aug.metrics.features import SliceFeatures, frechet_distance, slice_targets, train_slice_features
from lsdm_aug.training.common import load_split_arrays


def test_slice_targets_are_label_shares_and_nodule_presence():
    maps = torch.zeros(2, 1, 4, 4, dtype=torch.long)
    maps[0, 0, :2] = 4
    maps[1, 0, 0, 0] = 7
    targets = slice_targets(maps)
    assert targets.shape == (2, 9)
    assert targets[0, 4] == 0.5 and targets[0, 0] == 0.5 and targets[0, 8] == 0
    assert targets[1, 7] == 1 / 16 and targets[1, 8] == 1
    assert torch.allclose(targets[:, :8].sum(1), torch.ones(2))


@pytest.fixture(scope="module")
def extractor(tmp_path_factory, phantom_dataset):
    path = train_slice_features(phantom_dataset, tmp_path_factory.mktemp("features") / "slice.safetensors", steps=30,
                                batch_size=8)
    return path, SliceFeatures.from_file(path)


def test_training_writes_weights_that_load_and_predict_the_make_up(extractor, phantom_dataset):
    from lsdm_aug.models.checkpoint import read_config

    path, network = extractor
    config = read_config(path)
    assert config["component"] == "slice_features" and config["steps"] == 30
    untrained = SliceFeatures()
    from lsdm_aug.metrics.features import _loss, _split

    images, targets = _split(phantom_dataset, "train")
    with torch.no_grad():
        assert _loss(network(images), targets) < _loss(untrained.eval()(images), targets)


def test_frechet_and_perceptual_distances(extractor, phantom_dataset):
    _, network = extractor
    images = torch.from_numpy(load_split_arrays(phantom_dataset, "train")["image"]).float().unsqueeze(1)
    features = network.embed(images)
    half = len(features) // 2
    assert frechet_distance(features, features) == pytest.approx(0.0, abs=1e-6)
    noisy = network.embed((images + 0.5 * torch.randn(images.shape, generator=torch.Generator().manual_seed(0))))
    assert frechet_distance(features[:half], noisy[:half]) > frechet_distance(features[:half], features[half:])
    distance = network.distance(images[:4], images[:4])
    assert torch.allclose(distance, torch.zeros(4), atol=1e-6)
    assert (network.distance(images[:4], images[4:8]) > 0).all()
    with pytest.raises(ValueError, match=">= 2 samples per set"):
        frechet_distance(features[:1], features)
