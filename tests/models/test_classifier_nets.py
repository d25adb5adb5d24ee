"""Feature classifiers: two logits for malignancy, one regression output for the other features."""

from __future__ import annotations

import pytest
import torch

from lsdm_aug.config import ClassifierConfig
from lsdm_aug.models.classifiers import build_classifier, output_channels

CONFIG = ClassifierConfig(channels=(8, 16, 16), norm_num_groups=8, crop_px=16)


@pytest.mark.parametrize(("feature", "outputs"),
                         [("malignancy", 2), ("lobulation", 1), ("spiculation", 1), ("texture", 1)])
def test_output_size_per_feature(feature, outputs):
    assert output_channels(feature) == outputs
    network = build_classifier(CONFIG, feature)
    with torch.no_grad():
        assert network(torch.zeros(3, 1, 16, 16), torch.tensor([0, 10, 999])).shape == (3, outputs)


def test_the_output_depends_on_the_timestep():
    torch.manual_seed(0)
    network = build_classifier(CONFIG, "malignancy").eval()
    with torch.no_grad():  # MONAI zero-initialises each residual branch; move off that start, as training does
        for parameter in network.parameters():
            parameter.add_(0.1 * torch.randn_like(parameter))
    crops = torch.randn(1, 1, 16, 16)
    with torch.no_grad():
        assert not torch.allclose(network(crops, torch.tensor([0])), network(crops, torch.tensor([900])))


def test_unknown_feature_is_named():
    with pytest.raises(ValueError, match="'roundness'"):
        build_classifier(CONFIG, "roundness")
