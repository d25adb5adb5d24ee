"""Local multi-classifier guidance, checked against closed forms with linear stub classifiers."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lsdm_aug.sampling.guidance import (ClassifierGuidance, LatentBox, TargetCalibration, feature_loss,
                                       latent_nodule_mask)

LATENT_SCALE = 2.0
BOX = LatentBox(top=2, left=3, size=4)


class LinearScore(torch.nn.Module):
    """``a = sum(weight * image)``; malignancy gives logits ``(0, a)``, a regression gives ``a``."""

    def __init__(self, weight: torch.Tensor, logits: bool) -> None:
        super().__init__()
        self.weight, self.logits, self.calls = weight, logits, []

    def forward(self, image: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        self.calls.append((image.detach().clone(), timesteps.clone()))
        score = (image * self.weight).sum(dim=(1, 2, 3))
        return torch.stack([torch.zeros_like(score), score], 1) if self.logits else score[:, None]


def decode(latent: torch.Tensor) -> torch.Tensor:
    """A linear 'decoder': the channel sum, at latent resolution."""
    return latent.sum(1, keepdim=True)


@pytest.fixture
def setup():
    generator = torch.Generator().manual_seed(0)
    weights = {f: 0.3 * torch.randn(1, 1, 4, 4, generator=generator) for f in ("malignancy", "lobulation", "spiculation")}
    classifiers = {f: LinearScore(w, logits=f == "malignancy") for f, w in weights.items()}
    latent = torch.randn(1, 3, 8, 10, generator=generator)
    mask = torch.zeros(1, 1, 4, 4)
    mask[..., 1:3, 0:3] = 1
    return classifiers, weights, latent, mask


def score_of(weight: torch.Tensor, crop: torch.Tensor) -> torch.Tensor:
    return (decode(crop / LATENT_SCALE) * weight).sum()


def expected_score(weights, targets, crop, mask, scale, malignancy_at_crop=False):
    """s * (g_shape + g_malignancy(crop + s * g_shape)), each g = -dLoss/dcrop * mask, written out by hand.

    ``malignancy_at_crop`` gives the wrong variant (malignancy judged on the unmoved crop), for contrast."""
    g_shape = torch.zeros_like(crop)
    for feature in ("lobulation", "spiculation"):
        if feature in targets:
            residual = score_of(weights[feature], crop) - targets[feature]  # d (a - y)^2 / da = 2 (a - y)
            g_shape = g_shape - 2 * residual * weights[feature] / LATENT_SCALE * mask
    guided = crop + scale * g_shape
    a = score_of(weights["malignancy"], crop if malignancy_at_crop else guided)
    # cross-entropy of logits (0, a): d/da = sigmoid(a) - [malignant]
    d_loss_d_a = torch.sigmoid(a) - (1.0 if targets["malignancy"] >= 3 else 0.0)
    g_malignancy = -d_loss_d_a * weights["malignancy"] / LATENT_SCALE * mask
    return scale * (g_shape + g_malignancy), guided


def guidance(classifiers, targets, mask, scale):
    return ClassifierGuidance(decode, classifiers, targets, BOX, mask, scale=scale, latent_scale=LATENT_SCALE)


def test_feature_loss_is_cross_entropy_for_malignancy_with_benign_up_to_2():
    logits = torch.randn(5, 2, generator=torch.Generator().manual_seed(1))
    ratings = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0])
    expected = F.cross_entropy(logits, torch.tensor([0, 0, 1, 1, 1]), reduction="sum")
    assert torch.allclose(feature_loss("malignancy", logits, ratings), expected)


@pytest.mark.parametrize("feature", ["lobulation", "spiculation", "texture"])
def test_feature_loss_is_squared_error_for_the_regressions(feature):
    output = torch.tensor([[1.5], [4.0]])
    assert torch.isclose(feature_loss(feature, output, torch.tensor([2.0, 1.0])), torch.tensor(0.25 + 9.0))


def test_scale_zero_gives_exact_zeros_without_calling_a_classifier(setup):
    classifiers, _, latent, mask = setup
    score = guidance(classifiers, {"malignancy": 5, "lobulation": 4}, mask, 0.0)(latent, torch.tensor([500]))
    assert torch.equal(score, torch.zeros_like(latent))
    assert all(not c.calls for c in classifiers.values())


def test_score_is_nonzero_only_on_the_nodule_inside_the_box(setup):
    classifiers, _, latent, mask = setup
    score = guidance(classifiers, {"malignancy": 5, "lobulation": 4, "spiculation": 1}, mask, 1.5)(
        latent, torch.tensor([500]))
    inside = torch.zeros_like(latent, dtype=torch.bool)
    inside[..., BOX.rows, BOX.cols] = mask.bool().expand(1, 3, 4, 4)
    assert torch.all(score[~inside] == 0)
    assert torch.all(score[inside] != 0)


@pytest.mark.parametrize("malignancy", [5, 1])
def test_malignancy_is_judged_on_the_latent_moved_by_the_shape_gradient(setup, malignancy):
    classifiers, weights, latent, mask = setup
    targets = {"malignancy": malignancy, "lobulation": 5, "spiculation": 2}
    scale = 2.0
    timesteps = torch.tensor([321])
    score = guidance(classifiers, targets, mask, scale)(latent, timesteps)
    crop = latent[..., BOX.rows, BOX.cols]
    expected, guided = expected_score(weights, targets, crop, mask, scale)
    assert torch.allclose(score[..., BOX.rows, BOX.cols], expected, atol=1e-6)

    # the malignancy classifier saw the decoded moved latent, not the decoded crop, at the sampler's timestep
    (seen, seen_t), = classifiers["malignancy"].calls
    assert torch.allclose(seen, decode(guided / LATENT_SCALE), atol=1e-6)
    assert not torch.allclose(seen, decode(crop / LATENT_SCALE), atol=1e-3)
    assert torch.equal(seen_t, timesteps)
    (shape_seen, _), = classifiers["lobulation"].calls
    assert torch.allclose(shape_seen, decode(crop / LATENT_SCALE))

    # judging malignancy at the unmoved crop would give a measurably different score
    wrong, _ = expected_score(weights, targets, crop, mask, scale, malignancy_at_crop=True)
    assert (score[..., BOX.rows, BOX.cols] - wrong).abs().max() > 1e-3


def test_malignancy_alone_is_judged_on_the_crop(setup):
    classifiers, weights, latent, mask = setup
    score = guidance(classifiers, {"malignancy": 4}, mask, 3.0)(latent, torch.tensor([10]))
    crop = latent[..., BOX.rows, BOX.cols]
    expected, guided = expected_score(weights, {"malignancy": 4}, crop, mask, 3.0)
    assert torch.equal(guided, crop)
    assert torch.allclose(score[..., BOX.rows, BOX.cols], expected, atol=1e-6)
    assert not classifiers["lobulation"].calls


def test_shape_gradients_add_up(setup):
    classifiers, weights, latent, mask = setup
    t = torch.tensor([100])
    both = guidance(classifiers, {"lobulation": 5, "spiculation": 1}, mask, 1.0)(latent, t)
    one = guidance(classifiers, {"lobulation": 5}, mask, 1.0)(latent, t)
    other = guidance(classifiers, {"spiculation": 1}, mask, 1.0)(latent, t)
    assert torch.allclose(both, one + other, atol=1e-6)


@pytest.mark.parametrize(("targets", "scale", "message"), [
    ({"texture": 3}, 1.0, r"no classifier for \['texture'\]"),
    ({"roundness": 3}, 1.0, r"no classifier for \['roundness'\]"),
    ({"malignancy": 0}, 1.0, r"malignancy must be in 1\.\.5, got 0$"),
    ({"malignancy": 6}, 1.0, r"malignancy must be in 1\.\.5, got 6$"),
    ({"lobulation": 5.5}, 1.0, r"lobulation must be in 1\.\.5, got 5\.5$"),
    ({"malignancy": 3}, -0.5, r"scale must be >= 0, got -0\.5$"),
])
def test_bad_targets_and_scales_are_named(setup, targets, scale, message):
    classifiers, _, _, mask = setup
    with pytest.raises(ValueError, match=message):
        guidance(classifiers, targets, mask, scale)


def test_latent_nodule_mask_keeps_a_one_pixel_nodule():
    mask = torch.zeros(1, 1, 16, 16)
    mask[0, 0, 5, 9] = 1
    pooled = latent_nodule_mask(mask, 4)
    assert pooled.shape == (1, 1, 4, 4)
    assert pooled[0, 0, 1, 2] == 1 and pooled.sum() == 1


def test_latent_box_is_centred_and_kept_inside():
    assert LatentBox.around(32, 32, 4, (16, 16), 4) == LatentBox(6, 6, 4)
    assert LatentBox.around(0, 63, 4, (16, 16), 4) == LatentBox(0, 12, 4)
    box = LatentBox(1, 2, 3)
    assert (box.rows, box.cols) == (slice(1, 4), slice(2, 5))
    with pytest.raises(ValueError, match="17"):
        LatentBox.around(0, 0, 17, (16, 16), 4)


def test_a_batch_with_a_box_and_a_target_per_sample_scores_each_sample_as_alone(setup):
    classifiers, _, latent, mask = setup
    other_box = LatentBox(top=3, left=5, size=4)
    second = torch.randn(1, 3, 8, 10, generator=torch.Generator().manual_seed(3))
    targets = [{"malignancy": 5, "lobulation": 4}, {"malignancy": 1, "lobulation": 2}]
    alone = [ClassifierGuidance(decode, classifiers, t, b, mask, scale=2.0, latent_scale=LATENT_SCALE)(
        z, torch.tensor([300])) for t, b, z in zip(targets, (BOX, other_box), (latent, second))]
    batch = ClassifierGuidance(decode, classifiers, {f: [t[f] for t in targets] for f in targets[0]},
                               [BOX, other_box], torch.cat([mask, mask]), scale=2.0, latent_scale=LATENT_SCALE)
    together = batch(torch.cat([latent, second]), torch.tensor([300, 300]))
    assert torch.allclose(together[0:1], alone[0], atol=1e-6) and torch.allclose(together[1:2], alone[1], atol=1e-6)
    assert not torch.allclose(alone[0], alone[1])


def test_boxes_of_different_sizes_in_one_batch_are_refused(setup):
    classifiers, _, _, mask = setup
    with pytest.raises(ValueError, match="one size"):
        ClassifierGuidance(decode, classifiers, {"malignancy": 5}, [BOX, LatentBox(0, 0, 2)], mask)


# ---- calibrated targets ------------------------------------------------------------------------------------------

TABLE = TargetCalibration(timesteps=(0, 500, 999), levels=(1.0, 3.0, 5.0),
                          means=((1.8, 3.0, 4.2), (2.6, 3.0, 3.4), (3.0, 3.0, 3.1)), counts=(4, 4, 4))


def test_calibration_gives_the_table_at_its_points_and_interpolates_between():
    at_points = TABLE.target(torch.tensor([1.0, 5.0, 3.0]), torch.tensor([0, 500, 999]))
    assert torch.allclose(at_points, torch.tensor([1.8, 3.4, 3.0]))
    between = TABLE.target(torch.tensor([4.0]), torch.tensor([250]))  # level 4: mid of 3 and 5; t 250: mid
    assert torch.allclose(between, torch.tensor([(3.0 + 4.2 + 3.0 + 3.4) / 4]))
    assert torch.allclose(TABLE.target(torch.tensor([5.0]), torch.tensor([1200])), torch.tensor([3.1]))


def test_calibration_survives_its_dictionary():
    assert TargetCalibration.from_dict(TABLE.to_dict()) == TABLE


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"means": ((1.0, 2.0),)}, r"3 timesteps x 3 levels, got shape \(1, 2\)"),
    ({"timesteps": (0, 999, 500)}, r"timesteps must increase, got \[0, 999, 500\]"),
    ({"levels": (1.0, 1.0, 5.0)}, r"levels must increase"),
    ({"means": ((1.0, float("nan"), 3.0),) * 3}, r"finite"),
])
def test_bad_calibrations_are_named(kwargs, message):
    fields = {"timesteps": TABLE.timesteps, "levels": TABLE.levels, "means": TABLE.means} | kwargs
    with pytest.raises(ValueError, match=message):
        TargetCalibration(**fields)
    with pytest.raises(ValueError, match="timesteps, levels and means"):
        TargetCalibration.from_dict({"levels": [1, 2]})


def test_a_calibrated_regression_is_guided_to_the_classifiers_mean_for_that_level(setup):
    """The closed form with the calibrated target in place of the rating; malignancy keeps its class."""
    classifiers, weights, latent, mask = setup
    t = torch.tensor([500])
    crop = latent[..., BOX.rows, BOX.cols]
    calibrated = ClassifierGuidance(decode, classifiers, {"lobulation": 5, "malignancy": 5}, BOX, mask, scale=1.0,
                                    latent_scale=LATENT_SCALE,
                                    calibrations={"lobulation": TABLE, "malignancy": TABLE})(latent, t)
    expected, _ = expected_score(weights, {"lobulation": 3.4, "malignancy": 5}, crop, mask, 1.0)
    assert torch.allclose(calibrated[..., BOX.rows, BOX.cols], expected, atol=1e-6)
    raw = guidance(classifiers, {"lobulation": 5, "malignancy": 5}, mask, 1.0)(latent, t)
    assert (raw - calibrated).abs().max() > 1e-3


def test_no_push_where_the_classifier_already_says_the_calibrated_level(setup):
    classifiers, weights, latent, mask = setup
    crop = latent[..., BOX.rows, BOX.cols]
    said = float(score_of(weights["spiculation"], crop))
    flat = TargetCalibration((0, 999), (1.0, 5.0), ((said, said), (said, said)))
    score = ClassifierGuidance(decode, classifiers, {"spiculation": 5}, BOX, mask, scale=2.0,
                               latent_scale=LATENT_SCALE, calibrations={"spiculation": flat})(latent, torch.tensor([7]))
    assert score.abs().max() < 1e-5
