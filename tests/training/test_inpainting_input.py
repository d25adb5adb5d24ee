"""The U-Net's in-painting input: the known latent and its mask as more input channels, trained on windows that
carry a known region as the edit path gives one, and passed by the pipeline's edits."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from lsdm_aug.config import DiffusionConfig, RecipeError, recipe_from_dict
from lsdm_aug.models.checkpoint import save_weights
from lsdm_aug.models.unet import (SemanticCondition, build_unet, feature_levels, inpainting_context, predict_noise,
                                  semantic_onehot, takes_inpainting_context)
from lsdm_aug.training.common import initialise_from
from lsdm_aug.training.diffusion import LatentCrops, LatentData, UNET_FILE

TINY = dict(channels=(16, 16, 32), attention_levels=(False, False, False), norm_num_groups=8,
            spade_intermediate_channels=8, num_head_channels=8, feature_conditioning=True)


def _condition(batch: int, known: torch.Tensor | None = None) -> SemanticCondition:
    maps = torch.randint(0, 8, (batch, 1, 32, 32), generator=torch.Generator().manual_seed(1))
    return SemanticCondition(torch.randn(batch, 3, 8, 8, generator=torch.Generator().manual_seed(2)),
                             semantic_onehot(maps), feature_levels({"texture": 5}, count=batch), known)


def _randomised(unet: torch.nn.Module) -> torch.nn.Module:
    """Every weight drawn at random (MONAI zero-initialises the output convolution: it would hide the input)."""
    torch.manual_seed(0)
    with torch.no_grad():
        for parameter in unet.parameters():
            torch.nn.init.normal_(parameter, std=0.1)
    return unet.eval()


def test_the_inpainting_unet_takes_the_latent_channels_and_a_mask_more():
    plain = build_unet(DiffusionConfig(**TINY), latent_channels=3)
    inpainting = build_unet(DiffusionConfig(**TINY, inpainting_input=True), latent_channels=3)
    assert plain.conv_in.conv.in_channels == 6 and not takes_inpainting_context(plain)
    assert inpainting.conv_in.conv.in_channels == 10 and takes_inpainting_context(inpainting)


def test_the_unet_reads_the_known_latent_and_nothing_known_is_all_zeros():
    unet = _randomised(build_unet(DiffusionConfig(**TINY, inpainting_input=True), latent_channels=3))
    latent, t = torch.randn(2, 3, 8, 8), torch.tensor([10, 900])
    mask = torch.ones(2, 1, 8, 8)
    mask[..., 2:6, 2:6] = 0
    with torch.no_grad():
        nothing = predict_noise(unet, latent, t, _condition(2))
        zeros = predict_noise(unet, latent, t, _condition(2, torch.zeros(2, 4, 8, 8)))
        known = predict_noise(unet, latent, t, _condition(2, inpainting_context(torch.randn(2, 3, 8, 8), mask)))
    assert torch.equal(nothing, zeros)
    assert not torch.allclose(nothing, known, atol=1e-4)


def test_a_warm_start_from_a_plain_unet_predicts_as_its_source_until_trained(tmp_path):
    source = _randomised(build_unet(DiffusionConfig(**TINY), latent_channels=3))
    save_weights(tmp_path / UNET_FILE, source, {"component": "unet"})
    target = build_unet(DiffusionConfig(**TINY, inpainting_input=True), latent_channels=3).eval()
    assert initialise_from(target, str(tmp_path), UNET_FILE) == []  # the grown input layer is loaded, not left
    weight = target.conv_in.conv.weight
    assert torch.equal(weight[:, :6], source.conv_in.conv.weight) and not weight[:, 6:].any()
    latent, t = torch.randn(2, 3, 8, 8), torch.tensor([10, 900])
    context = inpainting_context(torch.randn(2, 3, 8, 8), torch.ones(2, 1, 8, 8))
    with torch.no_grad():
        expected = predict_noise(source, latent, t, _condition(2))
        assert torch.allclose(predict_noise(target, latent, t, _condition(2, context)), expected, atol=1e-6)


def test_the_known_region_travels_with_the_condition():
    context = torch.randn(2, 4, 8, 8)
    condition = _condition(2, context)
    assert torch.equal(condition.crop(slice(2, 6), slice(0, 4), 4).known, context[..., 2:6, 0:4])
    assert torch.equal(condition.repeat(3).known, context.repeat(3, 1, 1, 1))
    assert torch.equal(condition.with_features(None).known, context)  # the null pass of CFG keeps what is known
    mixed = SemanticCondition.cat([condition, _condition(1)])
    assert torch.equal(mixed.known[:2], context) and not mixed.known[2:].any()
    assert SemanticCondition.cat([_condition(1), _condition(1)]).known is None


def test_inpainting_context_refuses_a_mask_of_another_shape():
    with pytest.raises(ValueError, match=r"known_mask must be \(B, 1, h, w\)"):
        inpainting_context(torch.zeros(1, 3, 8, 8), torch.zeros(1, 1, 4, 4))


def _crops() -> LatentCrops:
    latents = torch.randn(2, 3, 32, 32)
    maps = torch.zeros(2, 1, 128, 128, dtype=torch.uint8)
    masks = torch.zeros(2, 128, 128, dtype=torch.uint8)
    masks[0, 100:110, 20:30] = 1  # slice 0: one nodule; slice 1: none
    maps[0, 0][masks[0] == 1] = 7
    levels = [feature_levels({"malignancy": 5, "texture": 4}), torch.zeros(0, 4, dtype=torch.long)]
    return LatentCrops(LatentData(latents, torch.randn(2, 3, 32, 32), maps), masks, levels, crop_latent_px=8,
                       factor=4, nodule_share=1.0)


def test_windows_given_a_known_region_hide_the_shown_nodule_and_keep_the_rest():
    crops = _crops()
    latent, condition = crops.draw(64, torch.Generator().manual_seed(0), inpainting_share=1.0)
    known_mask = condition.known[:, 3:]
    assert torch.equal(condition.known[:, :3], latent * known_mask)  # the clean latent where known, 0 elsewhere
    nodule = F.max_pool2d(condition.onehot[:, 7:8], 4)  # the nodule's latent footprint
    shows = nodule.flatten(1).any(1)
    assert shows.any() and (~shows).any()
    assert not (known_mask * nodule).any()  # nothing of the shown nodule is known
    grown = F.max_pool2d(nodule, 5, stride=1, padding=2)  # at most 4 image px of dilation: 1 latent px further
    assert (known_mask[shows] + grown[shows] >= 1).all()  # everything further out is known
    unknown = (1 - known_mask).flatten(1).sum(1)
    assert (unknown[~shows] > 0).all() and (unknown < 64).all()  # no nodule shown: a disc is to be generated


def test_windows_without_inpainting_share_draw_as_before_and_know_nothing():
    crops = _crops()
    before = crops.draw(16, torch.Generator().manual_seed(3))
    same = crops.draw(16, torch.Generator().manual_seed(3), inpainting_share=0.0)
    assert before[1].known is None and same[1].known is None
    assert torch.equal(before[0], same[0]) and torch.equal(before[1].onehot, same[1].onehot)
    latent, condition = crops.draw(200, torch.Generator().manual_seed(4), inpainting_share=0.5)
    given = condition.known[:, 3].flatten(1).any(1).float().mean()
    assert 0.35 < float(given) < 0.65


def test_inpainting_training_needs_the_inpainting_unet():
    with pytest.raises(RecipeError, match="needs diffusion.inpainting_input"):
        recipe_from_dict({"train_diffusion": {"inpainting_share": 0.5}})
    with pytest.raises(RecipeError, match="train_diffusion.inpainting_share"):
        recipe_from_dict({"diffusion": {"inpainting_input": True}, "train_diffusion": {"inpainting_share": 1.5}})


def test_the_edit_path_hands_an_inpainting_unet_the_known_latent_around_the_nodule(smoke_models, monkeypatch):
    import dataclasses

    from lsdm_aug import pipeline as pipeline_module
    from lsdm_aug.pipeline import LSDMPipeline

    smoke = LSDMPipeline.from_pretrained(smoke_models, device="cpu")
    unet = _randomised(build_unet(dataclasses.replace(smoke.recipe.diffusion, inpainting_input=True), 3))
    pipe = LSDMPipeline(smoke.recipe, smoke.autoencoder, unet, smoke.classifiers, smoke.scale_factor, "cpu",
                        spacing_mm=smoke.spacing_mm, window_px=smoke.window_px)
    seen = []
    real_sample = pipeline_module.sample_latents

    def recording(unet, scheduler, condition, **kwargs):
        seen.append((condition.known, kwargs["known"]))
        return real_sample(unet, scheduler, condition, **kwargs)

    monkeypatch.setattr(pipeline_module, "sample_latents", recording)
    image = np.full((64, 64), -0.8, np.float32)
    semantic = np.full((64, 64), 4, np.uint8)
    outline = np.zeros((8, 8), bool)
    outline[2:6, 2:6] = True
    result = pipe.insert(image, semantic, outline, centre=(32, 32), features={"texture": 5},
                         spacing_mm=pipe.spacing_mm, steps=2, guidance_scale=0.0, seed=0)
    (context, known), = seen
    assert torch.equal(context[:, 3:], known.mask)  # the mask the sampler keeps is the one the U-Net is told
    assert torch.equal(context[:, :3], known.latent * known.mask)
    assert 0 < float(known.mask.mean()) < 1
    assert result.image.shape == image.shape
