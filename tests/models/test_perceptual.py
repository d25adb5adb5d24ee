"""``PerceptualDistance`` on a locally written ResNet18 weight file (nothing is downloaded)."""

from __future__ import annotations

import re

import pytest
import torch
from monai.networks.nets import resnet18
from safetensors.torch import save_file

from lsdm_aug.models.checkpoint import CheckpointError
from lsdm_aug.models.perceptual import PerceptualDistance


@pytest.fixture(scope="module")
def resnet18_file(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("weights") / "resnet18.safetensors"
    save_file({k: v.contiguous() for k, v in resnet18(spatial_dims=2, n_input_channels=3).state_dict().items()},
              path)
    return path


def test_distance_is_zero_on_itself_and_grows_with_change(resnet18_file):
    distance = PerceptualDistance(resnet18_file, depth=18)
    images = torch.rand(3, 1, 64, 64) * 2 - 1
    assert torch.allclose(distance.distance(images, images), torch.zeros(3))
    small, large = distance.distance(images, images + 0.05), distance.distance(images, -images)
    assert small.shape == (3,) and bool((large > small).all()) and bool((small > 0).all())


def test_embed_gives_pooled_last_stage_features(resnet18_file):
    distance = PerceptualDistance(resnet18_file, depth=18)
    images = torch.rand(5, 1, 64, 64) * 2 - 1
    embedded = distance.embed(images, batch_size=2)
    assert embedded.shape == (5, 512)
    assert torch.allclose(embedded, distance.embed(images, batch_size=5), atol=1e-5)


def test_weights_written_as_a_state_dict_file_load_without_pickle(resnet18_file, tmp_path):
    from safetensors.torch import load_file

    path = tmp_path / "resnet18.pt"
    torch.save(load_file(resnet18_file), path)
    images = torch.rand(2, 1, 32, 32) * 2 - 1
    assert torch.allclose(PerceptualDistance(path, 18).embed(images), PerceptualDistance(resnet18_file, 18).embed(images))


def test_missing_unfit_and_bad_depth_are_named(resnet18_file, tmp_path):
    with pytest.raises(CheckpointError, match=re.escape(str(tmp_path / "none.safetensors"))):
        PerceptualDistance(tmp_path / "none.safetensors", 18)
    with pytest.raises(CheckpointError, match="do not fit a ResNet34"):
        PerceptualDistance(resnet18_file, 34)
    with pytest.raises(ValueError, match="depth must be one of \\[18, 34, 50\\], got 101"):
        PerceptualDistance(resnet18_file, 101)
