"""The U-Net's feature conditioning (for classifier-free guidance) and its training on latent windows."""

from __future__ import annotations

import json

import pytest
import torch

from lsdm_aug.config import CONDITIONING_FEATURES, FEATURES, DiffusionConfig, RecipeError, recipe_from_dict
from lsdm_aug.models.checkpoint import load_weights
from lsdm_aug.models.unet import (FeatureEmbedding, SemanticCondition, build_unet, feature_levels,
                                  is_feature_conditioned, predict_noise, semantic_onehot)
from lsdm_aug.training.common import initialise_from
from lsdm_aug.training.diffusion import (LatentCrops, LatentData, UNET_FILE, drop_features,
                                       nodule_weighted_mse, parameter_groups)

TINY = dict(channels=(16, 16, 32), attention_levels=(False, False, False), norm_num_groups=8,
            spade_intermediate_channels=8, num_head_channels=8)


def _condition(batch: int, features: torch.Tensor | None = None) -> SemanticCondition:
    maps = torch.randint(0, 8, (batch, 1, 32, 32))
    return SemanticCondition(torch.randn(batch, 3, 8, 8), semantic_onehot(maps), features)


def test_feature_levels_round_half_up_and_mark_absent_features_as_not_given():
    assert feature_levels({"malignancy": 2.5, "texture": 4.49}).tolist() == [[3, 0, 0, 4]]
    assert feature_levels(None, count=2).tolist() == [[0, 0, 0, 0]] * 2
    with pytest.raises(ValueError, match="spiculated"):
        feature_levels({"spiculated": 3})
    with pytest.raises(ValueError, match="lobulation must be in 1..5, got 7"):
        feature_levels({"lobulation": 7})


def test_feature_embedding_checks_its_input():
    embedding = FeatureEmbedding(FEATURES, 8)
    assert tuple(embedding.weight.shape) == (24, 8)  # the layout of U-Nets saved before calcification
    with pytest.raises(ValueError, match=r"\(batch, 4\)"):
        embedding(torch.zeros(2, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="0 \\(not given\\) or 1.."):
        embedding(torch.tensor([[6, 0, 0, 0]]))
    with pytest.raises(ValueError, match="unknown features \\['calcified'\\]"):
        FeatureEmbedding(("malignancy", "calcified"), 8)


def test_calcification_has_six_levels_and_its_own_table():
    embedding = FeatureEmbedding(CONDITIONING_FEATURES, 4)
    assert CONDITIONING_FEATURES[-1] == "calcification" and tuple(embedding.weight.shape) == (31, 4)
    with torch.no_grad():
        embedding.weight.copy_(torch.arange(31.0)[:, None].repeat(1, 4))
    # rows: malignancy 0..5, lobulation 6..11, spiculation 12..17, texture 18..23, calcification 24..30
    assert embedding(torch.tensor([[0, 0, 0, 0, 6]]))[0, 0].item() == 0 + 6 + 12 + 18 + 30
    with pytest.raises(ValueError, match="1.."):
        embedding(torch.tensor([[6, 0, 0, 0, 0]]))  # malignancy has five levels
    assert feature_levels({"calcification": 6, "texture": 5}, names=CONDITIONING_FEATURES).tolist() == [[0, 0, 0, 5, 6]]
    with pytest.raises(ValueError, match="calcification must be in 1..6, got 7"):
        feature_levels({"calcification": 7}, names=CONDITIONING_FEATURES)
    with pytest.raises(ValueError, match="unknown features \\['calcification'\\]"):
        feature_levels({"calcification": 6})  # not among the four guided features


def test_a_warm_start_keeps_the_trained_tables_when_calcification_is_appended(tmp_path):
    from lsdm_aug.models.checkpoint import save_weights

    torch.manual_seed(0)
    source = build_unet(DiffusionConfig(**TINY, feature_conditioning=True), latent_channels=3).eval()
    for parameter in source.parameters():
        torch.nn.init.normal_(parameter, std=0.1)
    save_weights(tmp_path / UNET_FILE, source, {"component": "unet"})
    target = build_unet(DiffusionConfig(**TINY, feature_conditioning=True, conditioned_features=CONDITIONING_FEATURES),
                        latent_channels=3).eval()
    assert initialise_from(target, str(tmp_path), UNET_FILE) == []
    weight = target.class_embedding.weight.detach()
    assert torch.equal(weight[:24], source.class_embedding.weight.detach()) and not weight[24:].any()
    four = feature_levels({"malignancy": 5, "texture": 1}, count=2)
    five = torch.cat([four, torch.zeros(2, 1, dtype=torch.long)], 1)  # calcification not given: its null row 0
    latent, t, condition = torch.randn(2, 3, 8, 8), torch.tensor([10, 900]), _condition(2)
    assert torch.allclose(predict_noise(target, latent, t, condition.with_features(five)),
                          predict_noise(source, latent, t, condition.with_features(four)))


def test_conditioned_features_must_be_known_and_distinct():
    for bad in (["malignancy", "calcified"], ["texture", "texture"]):
        with pytest.raises(RecipeError, match="diffusion.conditioned_features"):
            recipe_from_dict({"diffusion": {"feature_conditioning": True, "conditioned_features": bad}})


def test_features_change_the_noise_prediction_and_not_given_is_the_null_token():
    torch.manual_seed(0)
    unet = build_unet(DiffusionConfig(**TINY, feature_conditioning=True), latent_channels=3).eval()
    assert is_feature_conditioned(unet)
    for parameter in unet.parameters():  # MONAI zero-initialises the output convolution
        torch.nn.init.normal_(parameter, std=0.1)
    condition = _condition(1)
    latent, t = torch.randn(1, 3, 8, 8), torch.tensor([100])
    none_given = predict_noise(unet, latent, t, condition)
    nulls = predict_noise(unet, latent, t, condition.with_features(torch.zeros(1, 4, dtype=torch.long)))
    malignant = predict_noise(unet, latent, t, condition.with_features(feature_levels({"malignancy": 5})))
    benign = predict_noise(unet, latent, t, condition.with_features(feature_levels({"malignancy": 1})))
    assert torch.equal(none_given, nulls)
    assert not torch.allclose(malignant, benign)


def test_a_gained_feature_embedding_starts_at_zero_so_a_warm_start_predicts_as_its_source(tmp_path):
    from lsdm_aug.models.checkpoint import save_weights

    torch.manual_seed(0)
    source = build_unet(DiffusionConfig(**TINY), latent_channels=3).eval()
    for parameter in source.parameters():
        torch.nn.init.normal_(parameter, std=0.1)
    save_weights(tmp_path / UNET_FILE, source, {"component": "unet"})
    target = build_unet(DiffusionConfig(**TINY, feature_conditioning=True), latent_channels=3).eval()
    left = initialise_from(target, str(tmp_path), UNET_FILE)
    assert left == ["class_embedding.weight"]
    condition = _condition(2, feature_levels({"malignancy": 5, "spiculation": 2}, count=2))
    latent, t = torch.randn(2, 3, 8, 8), torch.tensor([10, 900])
    assert torch.allclose(predict_noise(target, latent, t, condition), predict_noise(source, latent, t, condition))


def test_feature_conditioning_needs_the_spade_unet():
    with pytest.raises(RecipeError, match="feature_conditioning"):
        recipe_from_dict({"diffusion": {"spade": False, "feature_conditioning": True}})


@pytest.mark.parametrize(("key", "value"), [("crop_px", 30), ("nodule_share", 1.5), ("feature_dropout", -0.1),
                                            ("feature_lr_scale", 0.0), ("nodule_loss_weight", 0.5)])
def test_bad_diffusion_training_settings_name_the_key(key, value):
    with pytest.raises(RecipeError, match=f"train_diffusion.{key}"):
        recipe_from_dict({"train_diffusion": {key: value}})


def test_the_feature_embedding_gets_its_own_learning_rate():
    unet = build_unet(DiffusionConfig(**TINY, feature_conditioning=True), 3)
    with torch.no_grad():  # MONAI zero-initialises the output convolution: no gradient reaches the embedding
        for name, parameter in unet.named_parameters():
            if not name.startswith("class_embedding"):
                parameter.add_(torch.randn_like(parameter) * 0.05)
    rest, embedding = parameter_groups(unet, 2e-4, 50.0)
    assert rest["lr"] == 2e-4 and embedding["lr"] == pytest.approx(1e-2)
    assert len(embedding["params"]) == 1 and embedding["params"][0] is unet.class_embedding.weight
    assert len(rest["params"]) + 1 == len(list(unet.parameters()))  # every parameter in exactly one group
    optimizer = torch.optim.AdamW([rest, embedding])
    predict_noise(unet, torch.randn(2, 3, 8, 8), torch.tensor([10, 500]),
                  _condition(2, torch.tensor([[5, 1, 1, 5], [1, 0, 0, 1]]))).pow(2).mean().backward()
    optimizer.step()  # one Adam step moves each embedding element by about its group's rate
    moved = unet.class_embedding.weight.detach().abs()
    assert moved.max() == pytest.approx(1e-2, rel=0.05)
    plain = build_unet(DiffusionConfig(**TINY), 3)
    assert [g["lr"] for g in parameter_groups(plain, 2e-4, 50.0)] == [2e-4]  # no embedding, one group


def test_drop_features_drops_all_or_each_at_the_given_rates():
    levels = torch.tensor([[5, 4, 3, 2]]).repeat(40000, 1)
    dropped = drop_features(levels, 0.15, 0.15, torch.Generator().manual_seed(0))
    all_dropped = (dropped == 0).all(1).float().mean().item()
    each_dropped = (dropped == 0).float().mean(0)
    assert abs(all_dropped - (0.15 + 0.85 * 0.15**4)) < 0.01
    assert torch.allclose(each_dropped, torch.full((4,), 0.15 + 0.85 * 0.15), atol=0.01)
    kept = dropped[(dropped != 0).all(1)]
    assert (kept == levels[0]).all()  # a kept feature keeps its level


def _crops(nodule_share: float) -> LatentCrops:
    latents = torch.randn(2, 3, 32, 32)
    maps = torch.zeros(2, 1, 128, 128, dtype=torch.uint8)
    masks = torch.zeros(2, 128, 128, dtype=torch.uint8)
    masks[0, 100:110, 20:30] = 1  # slice 0: one nodule, bottom left; slice 1: none
    maps[0, 0][masks[0] == 1] = 7
    data = LatentData(latents, torch.randn(2, 3, 32, 32), maps)
    levels = [feature_levels({"malignancy": 5, "lobulation": 2, "spiculation": 1, "texture": 4}),
              torch.zeros(0, 4, dtype=torch.long)]
    return LatentCrops(data, masks, levels, crop_latent_px=8, factor=4, nodule_share=nodule_share)


def test_latent_windows_carry_the_levels_of_the_nodule_they_show():
    crops = _crops(nodule_share=1.0)
    latent, condition = crops.draw(64, torch.Generator().manual_seed(0))
    assert latent.shape == (64, 3, 8, 8) and condition.onehot.shape == (64, 8, 32, 32)
    assert condition.latent.shape == (64, 3, 8, 8)
    shows_nodule = condition.onehot[:, 7].flatten(1).any(1)
    given = (condition.features != 0).any(1)
    assert torch.equal(shows_nodule, given)  # levels exactly where a nodule is in the window
    assert (condition.features[given] == torch.tensor([5, 2, 1, 4])).all()
    # slice 0's windows are all placed around its nodule, so about half the windows (slice 0's) show it
    assert 0.3 < given.float().mean() < 0.7


def test_windows_without_the_nodule_share_are_uniform():
    latent, condition = _crops(nodule_share=0.0).draw(200, torch.Generator().manual_seed(1))
    shows = condition.onehot[:, 7].flatten(1).any(1).float().mean()
    assert shows < 0.25  # a 10 px nodule is in few uniform 32 px windows of a 128 px slice


def test_a_crop_trained_feature_conditioned_unet_records_its_window_and_spacing(smoke_models, smoke_recipe):
    unet = build_unet(smoke_recipe.diffusion, smoke_recipe.autoencoder.latent_channels)
    config = load_weights(smoke_models / UNET_FILE, unet)
    assert is_feature_conditioned(unet)
    assert unet.class_embedding.weight.abs().sum() > 0  # the embedding learned from zero
    assert config["crop_px"] == 32
    assert set(config["spacing_mm"]) == {"median", "p05", "p95", "min", "max"}
    assert 4.0 < config["spacing_mm"]["median"] < 7.0  # 64 px phantom slices: 330-390 mm field of view
    assert json.loads((smoke_models / "autoencoder.json").read_text())["spacing_mm"] == config["spacing_mm"]


def test_nodule_weighted_mse_is_plain_mse_at_weight_one_and_weighs_the_dilated_nodule_footprint():
    maps = torch.zeros(1, 1, 32, 32, dtype=torch.long)
    maps[..., 12:16, 12:16] = 7  # one malignant nodule: latent pixel (3, 3) at factor 4
    onehot = semantic_onehot(maps)
    prediction, noise = torch.randn(1, 3, 8, 8), torch.randn(1, 3, 8, 8)
    assert torch.allclose(nodule_weighted_mse(prediction, noise, onehot, 1.0), torch.nn.functional.mse_loss(prediction, noise))
    on_nodule, beside, far = (torch.zeros(1, 3, 8, 8) for _ in range(3))
    on_nodule[..., 3, 3], beside[..., 4, 4], far[..., 7, 0] = 1.0, 1.0, 1.0
    zero = torch.zeros(1, 3, 8, 8)
    losses = [float(nodule_weighted_mse(error, zero, onehot, 10.0)) for error in (on_nodule, beside, far)]
    assert losses[0] == pytest.approx(losses[1])  # the footprint is dilated by one latent pixel
    assert losses[0] == pytest.approx(10 * losses[2])
    weights_sum = 9 * 10 + (64 - 9)  # 3 x 3 footprint at weight 10, the rest at 1
    assert losses[2] == pytest.approx(1.0 / weights_sum)
