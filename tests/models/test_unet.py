"""The SPADE U-Net: max-pooled SPADE maps keep a one-pixel nodule, doubled input channels, one-hot maps."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from monai.networks.blocks.spade_norm import SPADE

from lsdm_aug.config import load_recipe
from lsdm_aug.models.unet import (MaxPoolSPADE, SemanticCondition, build_unet, predict_noise, semantic_onehot,
                                  semantic_to_unit)

NODULE = 7
LUNG = 4
NODULE_PIXEL = (5, 9)  # not on the nearest-neighbour grid of a 16x reduction (rows/cols 0, 16, 32, 48)


@pytest.fixture(scope="module")
def unet():
    torch.manual_seed(0)
    recipe = load_recipe("phantom-smoke")
    return build_unet(recipe.diffusion, recipe.autoencoder.latent_channels).eval()


def lung_map(with_nodule: bool, size: int = 64) -> torch.Tensor:
    semantic_map = torch.full((1, 1, size, size), LUNG, dtype=torch.long)
    if with_nodule:
        semantic_map[0, 0, NODULE_PIXEL[0], NODULE_PIXEL[1]] = NODULE
    return semantic_map


def spade_inputs(unet, semantic_map: torch.Tensor) -> list[tuple[tuple[int, ...], torch.Tensor]]:
    """(feature size, map the block's convolutions saw) of every SPADE during one forward pass."""
    seen = []
    hooks = [block.mlp_shared.register_forward_pre_hook(lambda module, args: seen.append(args[0]))
             for block in unet.modules() if isinstance(block, SPADE)]
    sizes = []
    hooks += [block.register_forward_pre_hook(lambda module, args: sizes.append(tuple(args[0].shape[2:])))
              for block in unet.modules() if isinstance(block, SPADE)]
    try:
        with torch.no_grad():
            latent = torch.zeros(1, 3, semantic_map.shape[-2] // 4, semantic_map.shape[-1] // 4)
            condition = SemanticCondition(latent=latent, onehot=semantic_onehot(semantic_map))
            predict_noise(unet, latent, torch.tensor([500]), condition)
    finally:
        for hook in hooks:
            hook.remove()
    return list(zip(sizes, seen))


def test_every_spade_of_the_unet_is_max_pooled(unet):
    spades = [m for m in unet.modules() if isinstance(m, SPADE)]
    assert spades
    assert all(type(m) is MaxPoolSPADE for m in spades)


def test_input_channels_are_twice_the_latent_channels(unet):
    assert unet.in_channels == 6
    assert unet.conv_in.conv.in_channels == 6
    assert unet.out_channels == 3


def test_a_one_pixel_nodule_reaches_the_lowest_resolution_inside_the_unet(unet):
    inputs = spade_inputs(unet, lung_map(with_nodule=True))
    lowest = min(size for size, _ in inputs)
    assert lowest == (4, 4)  # 64 px map, latent 16, two downsamplings
    for size, segmap in inputs:
        assert tuple(segmap.shape[2:]) == size
        assert segmap[0, NODULE].sum() >= 1, f"the nodule is lost at {size}"
    lowest_maps = [segmap for size, segmap in inputs if size == lowest]
    for segmap in lowest_maps:
        assert segmap[0, NODULE, NODULE_PIXEL[0] // 16, NODULE_PIXEL[1] // 16] == 1
        assert segmap[0, LUNG].eq(1).all()  # the lung still covers every window


def test_max_pooling_keeps_the_nodule_where_monai_nearest_resize_drops_it(unet):
    onehot = semantic_onehot(lung_map(with_nodule=True))
    pooled = F.adaptive_max_pool2d(onehot, (4, 4))
    nearest = F.interpolate(onehot, size=(4, 4), mode="nearest")
    assert pooled[0, NODULE].sum() == 1 and nearest[0, NODULE].sum() == 0

    # the same SPADE block, once as ours and once as MONAI's: only ours responds to the nodule
    block = next(m for m in unet.modules() if isinstance(m, MaxPoolSPADE))
    monai_block = copy.deepcopy(block)
    monai_block.__class__ = SPADE
    torch.manual_seed(1)
    features = torch.randn(1, block.mlp_gamma.conv.out_channels, 4, 4)
    without = semantic_onehot(lung_map(with_nodule=False))
    with torch.no_grad():
        assert not torch.allclose(block(features, onehot), block(features, without))
        assert torch.equal(monai_block(features, onehot), monai_block(features, without))
        # at the map's own resolution both blocks agree (no pooling needed)
        full = torch.randn(1, features.shape[1], 64, 64)
        assert torch.equal(block(full, onehot), monai_block(full, onehot))


def test_semantic_onehot_shapes_and_values():
    labels = torch.arange(8).reshape(1, 2, 4).repeat(2, 1, 1)
    for semantic_map in (labels, labels[:, None]):
        onehot = semantic_onehot(semantic_map)
        assert onehot.shape == (2, 8, 2, 4) and onehot.dtype == torch.float32
        assert torch.equal(onehot.sum(1), torch.ones(2, 2, 4))
        assert torch.equal(onehot.argmax(1), labels)


@pytest.mark.parametrize("bad", [8, -1, 255])
def test_semantic_onehot_refuses_labels_outside_0_to_7(bad):
    semantic_map = torch.zeros(1, 1, 4, 4, dtype=torch.long)
    semantic_map[0, 0, 1, 1] = bad
    with pytest.raises(ValueError, match=str(bad)):
        semantic_onehot(semantic_map)


def test_semantic_to_unit_spans_minus_one_to_one():
    unit = semantic_to_unit(torch.tensor([[[0, 7], [4, 1]]]))
    assert unit.shape == (1, 1, 2, 2)
    assert unit[0, 0, 0, 0] == -1 and unit[0, 0, 0, 1] == 1
    assert torch.isclose(unit[0, 0, 1, 0], torch.tensor(4 / 7 * 2 - 1))


def test_condition_crop_takes_the_matching_image_window():
    latent = torch.arange(16.0).reshape(1, 1, 4, 4)
    onehot = torch.arange(256.0).reshape(1, 1, 16, 16)
    window = SemanticCondition(latent, onehot).crop(slice(1, 3), slice(2, 4), factor=4)
    assert torch.equal(window.latent, latent[..., 1:3, 2:4])
    assert torch.equal(window.onehot, onehot[..., 4:12, 8:16])
    assert window.repeat(3).latent.shape == (3, 1, 2, 2)


def test_the_ldm_baseline_has_no_spade_and_still_sees_the_map():
    from monai.networks.nets import DiffusionModelUNet

    from lsdm_aug.config import DiffusionConfig
    from lsdm_aug.models.unet import SemanticCondition, build_unet, predict_noise, semantic_onehot

    config = DiffusionConfig(channels=(16, 16, 32), attention_levels=(False, False, False), norm_num_groups=8,
                             spade=False)
    unet = build_unet(config, latent_channels=3).eval()
    assert type(unet) is DiffusionModelUNet and not any(isinstance(m, SPADE) for m in unet.modules())
    for parameter in unet.out.parameters():  # MONAI zero-initialises the output convolution
        torch.nn.init.normal_(parameter, generator=torch.Generator().manual_seed(0))
    semantic = torch.zeros(1, 1, 32, 32, dtype=torch.long)
    first = SemanticCondition(torch.zeros(1, 3, 8, 8), semantic_onehot(semantic))
    second = SemanticCondition(torch.ones(1, 3, 8, 8), semantic_onehot(semantic))
    with torch.no_grad():
        a = predict_noise(unet, torch.zeros(1, 3, 8, 8), torch.tensor([10]), first)
        b = predict_noise(unet, torch.zeros(1, 3, 8, 8), torch.tensor([10]), second)
    assert a.shape == (1, 3, 8, 8) and not torch.equal(a, b)  # conditioned through the concatenated map


def _random_unet():
    """A smoke U-Net with every weight perturbed (MONAI zero-initialises the output layer: its noise would be 0)."""
    torch.manual_seed(0)
    recipe = load_recipe("phantom-smoke")
    unet = build_unet(recipe.diffusion, recipe.autoencoder.latent_channels).eval()
    with torch.no_grad():
        for parameter in unet.parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))
    return unet


def _modulation_calls(unet) -> list[int]:
    calls = []
    for block in unet.modules():
        if isinstance(block, SPADE):
            block.mlp_shared.register_forward_hook(lambda module, args, out: calls.append(1))
    return calls


def _noise(unet, condition, latent, timestep: int = 500) -> torch.Tensor:
    return predict_noise(unet, latent, torch.tensor([timestep]), condition)


def test_spade_modulation_is_kept_across_steps_with_the_same_map_and_gives_the_same_noise():
    unet = _random_unet()
    fresh = copy.deepcopy(unet)
    calls = _modulation_calls(unet)
    spades = len([m for m in unet.modules() if isinstance(m, SPADE)])
    condition = SemanticCondition(latent=torch.randn(1, 3, 16, 16), onehot=semantic_onehot(lung_map(True)))
    with torch.no_grad():
        for timestep in (900, 500, 100):  # one map, the steps of a sampler
            latent = torch.randn(1, 3, 16, 16)
            kept = _noise(unet, condition, latent, timestep)
            assert kept.abs().max() > 0.01
            # a deep copy holds its own weights: it cannot reuse anything, and must agree bit for bit
            other = SemanticCondition(latent=condition.latent, onehot=condition.onehot.clone())
            assert torch.equal(kept, _noise(fresh, other, latent, timestep))
    assert len(calls) == spades  # the map's convolutions ran once, not at every step
    with torch.no_grad():
        _noise(unet, SemanticCondition(latent=condition.latent, onehot=semantic_onehot(lung_map(False))),
               torch.randn(1, 3, 16, 16))
    assert len(calls) == 2 * spades  # another map: computed again


def test_spade_modulation_is_recomputed_in_training_under_autograd_and_after_new_weights():
    unet = _random_unet()
    calls = _modulation_calls(unet)
    spades = len([m for m in unet.modules() if isinstance(m, SPADE)])
    condition = SemanticCondition(latent=torch.randn(1, 3, 16, 16), onehot=semantic_onehot(lung_map(True)))
    latent = torch.randn(1, 3, 16, 16)
    with torch.no_grad():
        before = _noise(unet, condition, latent)
        state = {k: v + 0.01 if "mlp_gamma" in k else v for k, v in unet.state_dict().items()}
        unet.load_state_dict(state)
        after = _noise(unet, condition, latent)
    assert len(calls) == 2 * spades and not torch.equal(before, after)  # new weights: not the kept modulation
    _noise(unet, condition, latent)  # autograd on
    unet.train()
    with torch.no_grad():
        _noise(unet, condition, latent)
    assert len(calls) == 4 * spades


def test_spade_modulation_is_recomputed_after_the_unet_is_converted():
    unet = _random_unet()
    condition = SemanticCondition(latent=torch.randn(1, 3, 16, 16), onehot=semantic_onehot(lung_map(True)))
    latent = torch.randn(1, 3, 16, 16)
    with torch.no_grad():
        _noise(unet, condition, latent)  # the modulation is kept
        unet.half().float()  # new tensors under every weight (rounded), no in-place update to see
        converted = _noise(unet, condition, latent)
        fresh = copy.deepcopy(unet)
        other = SemanticCondition(latent=condition.latent, onehot=condition.onehot.clone())
        assert torch.equal(converted, _noise(fresh, other, latent))
