"""``LSDMPipeline`` on the smoke models: loading, reproducible generation, guidance, and local edits that
leave every pixel outside their footprint bit-identical."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch
from scipy import ndimage

from lsdm_aug.config import FEATURES
from lsdm_aug.data.prepared import PreparedDataset
from lsdm_aug.models.checkpoint import CheckpointError
from lsdm_aug.pipeline import LSDMPipeline
from lsdm_aug.sampling.sampler import sample_latents
from lsdm_aug.sampling.schedulers import build_scheduler

STEPS = 4
LUNG = 4
NODULE_LABELS = (5, 6, 7)


@pytest.fixture(scope="module")
def pipe(smoke_models) -> LSDMPipeline:
    return LSDMPipeline.from_pretrained(smoke_models, device="cpu")


@pytest.fixture(scope="module")
def cases(phantom_dataset):
    """The slice with the largest nodule, and a slice without nodules."""
    dataset = PreparedDataset(phantom_dataset)
    items = [dataset[i] for i in range(len(dataset))]
    with_nodule = max(items, key=lambda item: int(item["nodule_mask"].sum()))
    without = next(item for item in items if not item["nodule_mask"].any())
    assert with_nodule["nodule_mask"].any() and np.isin(with_nodule["semantic_map"], NODULE_LABELS).any()
    return {"nodule": with_nodule, "free": without}


def lung_site(semantic_map: np.ndarray, margin: int = 4) -> tuple[int, int]:
    """A lung pixel with at least ``margin`` px of lung all round."""
    inner = ndimage.binary_erosion(semantic_map == LUNG, iterations=margin)
    rows, cols = np.nonzero(inner)
    assert len(rows), "no lung site in this slice"
    middle = len(rows) // 2
    return int(rows[middle]), int(cols[middle])


def disk_outline() -> np.ndarray:
    """A 6 x 6 px round nodule in a 12 x 12 array with an empty border (the border is not part of it)."""
    rows, cols = np.mgrid[:6, :6]
    disk = (rows - 2.5) ** 2 + (cols - 2.5) ** 2 <= 9
    outline = np.zeros((12, 12), bool)
    outline[3:9, 3:9] = disk
    return outline


def placed(outline: np.ndarray, centre: tuple[int, int], shape) -> np.ndarray:
    """Where a 6 x 6 outline centred at ``centre`` should land."""
    mask = np.zeros(shape, bool)
    mask[centre[0] - 3:centre[0] + 3, centre[1] - 3:centre[1] + 3] = outline[3:9, 3:9]
    return mask


# ---- loading -----------------------------------------------------------------------------------------------

def test_from_pretrained_loads_every_component(pipe, smoke_models):
    assert sorted(pipe.classifiers) == sorted(FEATURES)
    assert pipe.recipe.image_size == 64 and pipe.factor == 4
    assert pipe.scale_factor == json.loads((smoke_models / "autoencoder.json").read_text())["scale_factor"]
    assert re.fullmatch(rf"{smoke_models.name}@6/6#[0-9a-f]{{8}}", pipe.model_id)
    from safetensors.torch import load_file

    saved = load_file(smoke_models / "unet.safetensors")
    for key, value in pipe.unet.state_dict().items():
        assert torch.equal(value, saved[key]), key


def _with_edit_window(models, window) -> None:
    config = json.loads((models / "unet.json").read_text())
    config["edit_window_px"] = window
    (models / "unet.json").write_text(json.dumps(config))


def test_a_model_folder_sets_its_edit_window_and_its_digest_tells_it_apart(copy_models, smoke_models, cases):
    models = copy_models()
    _with_edit_window(models, 48)
    pipe, plain = LSDMPipeline.from_pretrained(models), LSDMPipeline.from_pretrained(smoke_models)
    assert (pipe.window_px, plain.window_px) == (48, 32)  # without the key: the U-Net's training crop
    assert pipe.model_id.split("#")[1] != plain.model_id.split("#")[1]  # other nodules by default: another model id
    case = cases["free"]
    region = np.zeros(case["image"].shape, bool)
    region[30:34, 30:34] = True
    window = pipe._plan(case["image"], case["semantic_map"], region, case["spacing_mm"], 2.0)
    assert window.grid.size_model_px == 48


@pytest.mark.parametrize("window", [40, 8, True, 48.0])
def test_an_edit_window_the_networks_cannot_take_is_named(copy_models, window):
    models = copy_models()
    _with_edit_window(models, window)
    with pytest.raises(ValueError, match=rf"edit window {re.escape(repr(window))} px; allowed: a multiple of 16 px"):
        LSDMPipeline.from_pretrained(models)


def test_from_pretrained_on_a_missing_folder_is_named(tmp_path):
    missing = tmp_path / "no-such-model"
    with pytest.raises(CheckpointError, match=re.escape(str(missing))):
        LSDMPipeline.from_pretrained(missing)


def test_from_pretrained_with_a_corrupt_unet_names_the_file(copy_models):
    models = copy_models()
    (models / "unet.safetensors").write_bytes(b"\x00" * 64)
    with pytest.raises(CheckpointError, match=re.escape(str(models / "unet.safetensors"))):
        LSDMPipeline.from_pretrained(models)


def test_from_pretrained_without_the_unet_names_what_is_missing(copy_models):
    models = copy_models()
    (models / "unet.json").unlink()
    with pytest.raises(CheckpointError, match=re.escape(str(models / "unet.json"))):
        LSDMPipeline.from_pretrained(models)


# ---- generation --------------------------------------------------------------------------------------------

def test_generate_is_reproducible_by_seed(pipe, cases):
    semantic_map = cases["nodule"]["semantic_map"]
    first = pipe.generate(semantic_map, steps=STEPS, seed=3, spacing_mm=pipe.spacing_mm)
    assert first.shape == (1, 64, 64) and first.dtype == np.float32
    assert first.min() >= -1 and first.max() <= 1
    assert np.array_equal(first, pipe.generate(semantic_map, steps=STEPS, seed=3, spacing_mm=pipe.spacing_mm))
    assert not np.array_equal(first, pipe.generate(semantic_map, steps=STEPS, seed=4, spacing_mm=pipe.spacing_mm))


def test_generate_takes_a_batch_of_maps(pipe, cases):
    maps = np.stack([cases["nodule"]["semantic_map"], cases["free"]["semantic_map"]])
    images = pipe.generate(maps, steps=2, seed=0, sampler="ddpm", spacing_mm=pipe.spacing_mm)
    assert images.shape == (2, 64, 64)
    assert not np.array_equal(images[0], images[1])



def test_a_ddim_batch_gives_what_one_by_one_generation_gives(pipe, cases):
    """Guided and unguided maps and different feature sets mixed, one dict per map: batching changes nothing
    with DDIM, and the first map is what a call with that map alone gives."""
    nodule, free = cases["nodule"]["semantic_map"], cases["free"]["semantic_map"]
    maps = np.stack([nodule, free, nodule, nodule])
    requested = [{"malignancy": 5.0}, {"malignancy": 1.0}, {"malignancy": 1.0}, {"texture": 1.0}]
    batched = pipe.generate(maps, requested, steps=STEPS, guidance_scale=20.0, seed=5, batch_size=4, spacing_mm=pipe.spacing_mm)
    one_by_one = pipe.generate(maps, requested, steps=STEPS, guidance_scale=20.0, seed=5, batch_size=1, spacing_mm=pipe.spacing_mm)
    np.testing.assert_allclose(batched, one_by_one, atol=2e-5)
    alone = pipe.generate(maps[:1], requested[:1], steps=STEPS, guidance_scale=20.0, seed=5, spacing_mm=pipe.spacing_mm)
    np.testing.assert_allclose(batched[:1], alone, atol=2e-5)
    assert not np.allclose(batched[0], batched[2], atol=1e-3)  # same map, different noise and target


def test_feature_list_must_match_the_maps(pipe, cases):
    maps = np.stack([cases["nodule"]["semantic_map"]] * 2)
    with pytest.raises(ValueError, match="1 feature dicts for 2 semantic maps"):
        pipe.generate(maps, [{"malignancy": 5.0}], steps=STEPS, spacing_mm=pipe.spacing_mm)
    with pytest.raises(ValueError, match="batch_size must be >= 1, got 0"):
        pipe.generate(maps, steps=STEPS, batch_size=0, spacing_mm=pipe.spacing_mm)

def test_guidance_scale_zero_is_exactly_no_guidance(pipe, cases):
    """s = 0 and w = 0: exactly the sample with no features asked, at any default w."""
    semantic_map = cases["nodule"]["semantic_map"]
    plain = pipe.generate(semantic_map, steps=STEPS, seed=1, spacing_mm=pipe.spacing_mm)
    unguided = pipe.generate(semantic_map, features={"malignancy": 5, "spiculation": 4}, guidance_scale=0.0,
                             cfg_scale=0.0, steps=STEPS, seed=1, spacing_mm=pipe.spacing_mm)
    assert np.array_equal(plain, unguided)
    assert np.array_equal(plain, pipe.generate(semantic_map, steps=STEPS, seed=1, cfg_scale=3.0, spacing_mm=pipe.spacing_mm))


def test_cfg_scale_one_is_plain_conditional_sampling_and_others_differ(pipe, cases):
    semantic_map = cases["nodule"]["semantic_map"]
    assert pipe.feature_conditioned
    features = {"malignancy": 5, "texture": 1}
    conditional = pipe.generate(semantic_map, features=features, guidance_scale=0.0, cfg_scale=1.0, steps=STEPS, seed=1, spacing_mm=pipe.spacing_mm)
    null = pipe.generate(semantic_map, guidance_scale=0.0, steps=STEPS, seed=1, spacing_mm=pipe.spacing_mm)
    strong = pipe.generate(semantic_map, features=features, guidance_scale=0.0, cfg_scale=4.0, steps=STEPS, seed=1, spacing_mm=pipe.spacing_mm)
    assert not np.array_equal(conditional, null) and not np.allclose(strong, conditional)
    scheduler = build_scheduler(pipe.recipe.diffusion, "ddim", STEPS)
    maps = torch.as_tensor(semantic_map)[None, None].long()
    noise = torch.randn((1, 3, *[s // pipe.factor for s in semantic_map.shape]), generator=torch.Generator().manual_seed(1))
    latent = sample_latents(pipe.unet, scheduler, pipe.condition(maps, [features]), initial_noise=noise)
    by_hand = pipe.decode(latent).clamp(-1, 1)[0, 0].numpy()
    assert np.allclose(conditional[0], by_hand, atol=1e-5)  # the one loop with the features, nothing else


@pytest.mark.parametrize("subset", [{"malignancy": 2}, {"lobulation": 5}, {"spiculation": 1, "texture": 5},
                                    {"malignancy": 4, "lobulation": 1, "spiculation": 5, "texture": 3}])
def test_any_subset_of_features_conditions_the_sample(pipe, cases, subset):
    semantic_map = cases["nodule"]["semantic_map"]
    null = pipe.generate(semantic_map, guidance_scale=0.0, steps=STEPS, seed=2, spacing_mm=pipe.spacing_mm)
    assert not np.array_equal(pipe.generate(semantic_map, features=subset, guidance_scale=0.0, steps=STEPS, seed=2, spacing_mm=pipe.spacing_mm), null)


def test_cfg_scale_is_checked(pipe, cases):
    with pytest.raises(ValueError, match="cfg_scale must be a number >= 0, got -2"):
        pipe.generate(cases["nodule"]["semantic_map"], features={"malignancy": 5}, cfg_scale=-2, steps=STEPS, spacing_mm=pipe.spacing_mm)


def test_guidance_changes_the_sample(pipe, cases):
    semantic_map = cases["nodule"]["semantic_map"]
    plain = pipe.generate(semantic_map, steps=STEPS, seed=1, spacing_mm=pipe.spacing_mm)
    guided = pipe.generate(semantic_map, features={"malignancy": 5, "spiculation": 4}, guidance_scale=20.0,
                           steps=STEPS, seed=1, spacing_mm=pipe.spacing_mm)
    assert not np.array_equal(plain, guided)
    assert np.isfinite(guided).all()


def test_a_map_without_nodules_has_nothing_to_guide(pipe, cases):
    semantic_map = cases["free"]["semantic_map"]
    assert np.array_equal(pipe.generate(semantic_map, steps=STEPS, seed=2, spacing_mm=pipe.spacing_mm),
                          pipe.generate(semantic_map, features={"malignancy": 1}, guidance_scale=20.0,
                                        steps=STEPS, seed=2, spacing_mm=pipe.spacing_mm))


@pytest.mark.parametrize(("features", "named"), [
    ({"malignancy": 0}, "got 0"), ({"malignancy": 6}, "got 6"), ({"roundness": 3}, "'roundness'"),
    ({"texture": "solid"}, "'solid'"),
])
def test_bad_features_are_named(pipe, cases, features, named):
    case = cases["free"]
    with pytest.raises(ValueError, match=re.escape(named)):
        pipe.generate(case["semantic_map"], features=features, steps=STEPS, spacing_mm=pipe.spacing_mm)
    with pytest.raises(ValueError, match=re.escape(named)):
        pipe.insert(case["image"], case["semantic_map"], disk_outline(), centre=lung_site(case["semantic_map"]),
                    features=features, steps=STEPS, spacing_mm=pipe.spacing_mm)


def test_bad_sampler_and_steps_are_named(pipe, cases):
    with pytest.raises(ValueError, match="'euler'"):
        pipe.generate(cases["free"]["semantic_map"], steps=STEPS, sampler="euler", spacing_mm=pipe.spacing_mm)
    with pytest.raises(ValueError, match="got 1001"):
        pipe.generate(cases["free"]["semantic_map"], steps=1001, spacing_mm=pipe.spacing_mm)


# ---- local edits -------------------------------------------------------------------------------------------

@pytest.mark.parametrize(("malignancy", "label"), [(1, 5), (3, 6), (5, 7), (None, 6)])
def test_insert_changes_only_its_footprint(pipe, cases, malignancy, label):
    case = cases["free"]
    image, semantic_map = case["image"].copy(), case["semantic_map"].copy()
    centre = lung_site(semantic_map)
    features = {} if malignancy is None else {"malignancy": malignancy}
    result = pipe.insert(image, semantic_map, disk_outline(), centre=centre, features=features, steps=STEPS, seed=0, spacing_mm=pipe.spacing_mm)
    region = placed(disk_outline(), centre, image.shape)

    assert np.array_equal(result.nodule_mask.astype(bool), region)
    assert result.image.shape == image.shape and result.image.dtype == np.float32
    footprint = result.footprint.astype(bool)
    assert footprint[region].all()
    assert np.array_equal(result.image[~footprint], image[~footprint])  # bit for bit
    assert not np.array_equal(result.image[region], image[region])
    assert np.all(result.semantic_map[region] == label)
    assert np.array_equal(result.semantic_map[~region], semantic_map[~region])
    assert result.record["mode"] == "insert" and result.record["area_px"] == int(region.sum())
    # the inputs are left alone
    assert np.array_equal(image, case["image"]) and np.array_equal(semantic_map, case["semantic_map"])


def test_insert_is_reproducible_by_seed(pipe, cases):
    case = cases["free"]
    centre = lung_site(case["semantic_map"])
    first, second, other = (pipe.insert(case["image"], case["semantic_map"], disk_outline(), centre=centre,
                                        features={"malignancy": 4}, steps=STEPS, seed=seed, spacing_mm=pipe.spacing_mm) for seed in (5, 5, 6))
    assert np.array_equal(first.image, second.image)
    assert not np.array_equal(first.image, other.image)


def test_insert_outside_the_image_is_refused(pipe, cases):
    case = cases["free"]
    with pytest.raises(ValueError, match="does not fit"):
        pipe.insert(case["image"], case["semantic_map"], disk_outline(), centre=(1, 1), steps=STEPS, spacing_mm=pipe.spacing_mm)


def test_replace_relabels_the_nodule_and_keeps_the_rest(pipe, cases):
    case = cases["nodule"]
    region = case["nodule_mask"] > 0
    result = pipe.replace(case["image"], case["semantic_map"], region, features={"malignancy": 5}, steps=STEPS,
                          seed=0, spacing_mm=pipe.spacing_mm)
    footprint = result.footprint.astype(bool)
    assert footprint[region].all()
    assert np.all(result.semantic_map[region] == 7)
    assert np.array_equal(result.semantic_map[~region], case["semantic_map"][~region])
    assert np.array_equal(result.image[~footprint], case["image"][~footprint])
    assert np.array_equal(result.nodule_mask.astype(bool), region)


def test_remove_relabels_the_nodule_as_lung(pipe, cases):
    case = cases["nodule"]
    region = case["nodule_mask"] > 0
    result = pipe.remove(case["image"], case["semantic_map"], region, steps=STEPS, seed=0, spacing_mm=pipe.spacing_mm)
    footprint = result.footprint.astype(bool)
    assert np.all(result.semantic_map[region] == LUNG)
    assert np.array_equal(np.isin(case["semantic_map"], NODULE_LABELS), region)  # the mask covers every nodule
    assert not np.isin(result.semantic_map, NODULE_LABELS).any()
    assert np.array_equal(result.semantic_map[~region], case["semantic_map"][~region])
    assert not result.nodule_mask.any()
    assert np.array_equal(result.image[~footprint], case["image"][~footprint])
    assert result.record["mode"] == "remove"


def test_edits_need_a_nodule(pipe, cases):
    case = cases["free"]
    empty = np.zeros_like(case["nodule_mask"], bool)
    with pytest.raises(ValueError, match="empty"):
        pipe.remove(case["image"], case["semantic_map"], empty, spacing_mm=pipe.spacing_mm)
    with pytest.raises(ValueError, match="empty"):
        pipe.replace(case["image"], case["semantic_map"], empty, spacing_mm=pipe.spacing_mm)
    with pytest.raises(ValueError, match="empty"):
        pipe.insert(case["image"], case["semantic_map"], np.zeros((4, 4), bool), centre=(32, 32), spacing_mm=pipe.spacing_mm)


def test_an_outline_larger_than_the_edit_window_is_refused_or_fully_inserted(pipe, cases):
    """A 40 px nodule on a 64 px slice: either a clear error, or every pixel labelled nodule is regenerated."""
    case = cases["free"]
    try:
        result = pipe.insert(case["image"], case["semantic_map"], np.ones((40, 40), bool), centre=(32, 32),
                             steps=2, spacing_mm=pipe.spacing_mm)
    except ValueError as error:
        assert "40" in str(error)
        return
    region = result.nodule_mask.astype(bool)
    assert np.all(result.semantic_map[region] == 6)
    untouched = region & (result.image == case["image"])
    assert untouched.sum() == 0, f"{untouched.sum()} of {region.sum()} nodule pixels kept the original image"


def test_insert_batch_gives_each_item_what_insert_gives_alone(pipe, cases):
    case = cases["free"]
    image, semantic_map = case["image"], case["semantic_map"]
    site = lung_site(semantic_map)
    other = lung_site(np.fliplr(semantic_map))
    centres = [site, (other[0], semantic_map.shape[1] - 1 - other[1])]
    features = [{"malignancy": 5, "texture": 4}, {"malignancy": 1, "texture": 2}]
    batch = pipe.insert_batch([image, image], [semantic_map, semantic_map], [disk_outline()] * 2, centres, features,
                              seeds=[3, 4], steps=STEPS, guidance_scale=2.0, spacing_mm=[pipe.spacing_mm] * 2)
    for result, centre, item, seed in zip(batch, centres, features, (3, 4)):
        alone = pipe.insert(image, semantic_map, disk_outline(), centre=centre, features=item, steps=STEPS,
                            guidance_scale=2.0, seed=seed, spacing_mm=pipe.spacing_mm)
        assert np.allclose(result.image, alone.image, atol=1e-5)
        assert np.array_equal(result.nodule_mask, alone.nodule_mask)
        assert np.array_equal(result.footprint, alone.footprint)
    assert not np.array_equal(batch[0].image, batch[1].image)


def test_insert_batch_needs_one_set_of_feature_names_and_matching_lengths(pipe, cases):
    case = cases["free"]
    centre = lung_site(case["semantic_map"])
    with pytest.raises(ValueError, match="same features"):
        pipe.insert_batch([case["image"]] * 2, [case["semantic_map"]] * 2, [disk_outline()] * 2, [centre] * 2,
                          [{"malignancy": 5}, {"texture": 2}], seeds=[0, 1], steps=STEPS, spacing_mm=[pipe.spacing_mm] * 2)
    with pytest.raises(ValueError, match="one length"):
        pipe.insert_batch([case["image"]] * 2, [case["semantic_map"]], [disk_outline()] * 2, [centre] * 2,
                          [{}, {}], seeds=[0, 1], steps=STEPS, spacing_mm=[pipe.spacing_mm] * 2)


def test_features_nothing_can_steer_are_refused(pipe, cases):
    semantic_map = cases["nodule"]["semantic_map"]
    without = LSDMPipeline(pipe.recipe, pipe.autoencoder, pipe.unet, {"malignancy": pipe.classifiers["malignancy"]},
                           pipe.scale_factor, "cpu", spacing_mm=pipe.spacing_mm)
    with pytest.raises(ValueError, match=r"cannot steer \['texture'\] at guidance_scale 1 and cfg_scale 0"):
        without.generate(semantic_map, {"malignancy": 5, "texture": 1}, spacing_mm=pipe.spacing_mm, steps=STEPS,
                         cfg_scale=0.0)
    # classifier-free guidance steers it; both scales 0 is an unguided request on purpose
    without.generate(semantic_map, {"texture": 1}, spacing_mm=pipe.spacing_mm, steps=STEPS, cfg_scale=2.0)
    without.generate(semantic_map, {"texture": 1}, spacing_mm=pipe.spacing_mm, steps=STEPS, guidance_scale=0.0,
                     cfg_scale=0.0)


def test_calcification_is_steered_by_a_unet_conditioned_on_it_and_refused_by_others(pipe, cases):
    import dataclasses

    from lsdm_aug.models.unet import build_unet, conditioned_features

    semantic_map = cases["nodule"]["semantic_map"]
    assert "calcification" in conditioned_features(pipe.unet)
    absent = pipe.generate(semantic_map, {"malignancy": 2, "calcification": 6}, spacing_mm=pipe.spacing_mm,
                           steps=STEPS, seed=0, cfg_scale=1.0)
    popcorn = pipe.generate(semantic_map, {"malignancy": 2, "calcification": 1}, spacing_mm=pipe.spacing_mm,
                            steps=STEPS, seed=0, cfg_scale=1.0)
    assert absent.shape == popcorn.shape
    with pytest.raises(ValueError, match=r"cannot steer \['calcification'\] at guidance_scale 1 and cfg_scale 0"):
        pipe.generate(semantic_map, {"calcification": 6}, spacing_mm=pipe.spacing_mm, steps=STEPS, cfg_scale=0.0)
    with pytest.raises(ValueError, match="calcification must be in 1..6, got 7"):
        pipe.generate(semantic_map, {"calcification": 7}, spacing_mm=pipe.spacing_mm, steps=STEPS)
    four = build_unet(dataclasses.replace(pipe.recipe.diffusion, conditioned_features=FEATURES), 3)
    older = LSDMPipeline(pipe.recipe, pipe.autoencoder, four, pipe.classifiers, pipe.scale_factor, "cpu",
                         spacing_mm=pipe.spacing_mm)
    with pytest.raises(ValueError, match=r"cannot steer \['calcification'\].*feature conditioning: \['malignancy'"):
        older.generate(semantic_map, {"calcification": 6}, spacing_mm=pipe.spacing_mm, steps=STEPS, cfg_scale=1.0)
    older.generate(semantic_map, {"malignancy": 4}, spacing_mm=pipe.spacing_mm, steps=STEPS, cfg_scale=1.0)


# ---- saturated draws ------------------------------------------------------------------------------------------

def _twin(pipe: LSDMPipeline, max_redraws: int) -> LSDMPipeline:
    """The same networks with another ``max_redraws``."""
    return LSDMPipeline(pipe.recipe, pipe.autoencoder, pipe.unet, pipe.classifiers, pipe.scale_factor, "cpu",
                        spacing_mm=pipe.spacing_mm, window_px=pipe.window_px, calibrations=pipe.calibrations,
                        max_redraws=max_redraws)


def _saturated_first(count: int):
    """A stand-in for ``is_saturated`` that calls the first ``count`` draws it is shown saturated."""
    calls = []

    def check(image, region):
        calls.append(1)
        return len(calls) <= count
    return check


@pytest.mark.parametrize(("saturated_draws", "redraws", "still"), [(1, 1, False), (2, 2, False), (5, 2, True)])
def test_a_saturated_draw_told_not_calcified_is_drawn_again_with_the_next_seed(
        pipe, cases, monkeypatch, saturated_draws, redraws, still):
    from lsdm_aug import pipeline as module
    from lsdm_aug.editing import redraw_seed

    case = cases["free"]
    centre = lung_site(case["semantic_map"])
    ask = {"image": case["image"], "semantic_map": case["semantic_map"], "nodule_outline": disk_outline(),
           "centre": centre, "features": {"malignancy": 4}, "steps": STEPS, "spacing_mm": pipe.spacing_mm,
           "conditioning": {"calcification": 6}}
    never = _twin(pipe, 0)
    monkeypatch.setattr(module, "is_saturated", _saturated_first(saturated_draws))
    result = _twin(pipe, 2).insert(**ask, seed=3)
    monkeypatch.undo()
    assert result.record["redraws"] == redraws and result.record["saturated"] is still
    assert result.record["seed"] == 3  # the request's seed; the redraw's is redraw_seed(3, redraws)
    expected = never.insert(**ask, seed=redraw_seed(3, redraws))
    assert np.array_equal(result.image, expected.image)
    assert not np.array_equal(result.image, never.insert(**ask, seed=3).image)


def test_requests_not_told_not_calcified_are_never_redrawn(pipe, cases, monkeypatch):
    from lsdm_aug import pipeline as module

    case = cases["free"]
    centre = lung_site(case["semantic_map"])
    monkeypatch.setattr(module, "is_saturated", lambda image, region: True)
    for told in (None, {"calcification": 1}):
        result = pipe.insert(case["image"], case["semantic_map"], disk_outline(), centre=centre,
                             features={"malignancy": 4}, steps=STEPS, seed=0, spacing_mm=pipe.spacing_mm,
                             conditioning=told)
        assert result.record["redraws"] == 0 and "saturated" not in result.record
    removed = pipe.remove(cases["nodule"]["image"], cases["nodule"]["semantic_map"],
                          cases["nodule"]["nodule_mask"] > 0, steps=STEPS, seed=0, spacing_mm=pipe.spacing_mm)
    assert "redraws" not in removed.record
    # a replacement asking "not calcified" itself is checked
    replaced = pipe.replace(cases["nodule"]["image"], cases["nodule"]["semantic_map"],
                            cases["nodule"]["nodule_mask"] > 0, features={"calcification": 6}, cfg_scale=1.0,
                            steps=STEPS, seed=0, spacing_mm=pipe.spacing_mm)
    assert replaced.record["redraws"] == 2 and replaced.record["saturated"] is True


def test_the_check_reads_the_inserted_nodule_of_the_returned_image(pipe, cases, monkeypatch):
    from lsdm_aug import pipeline as module
    from lsdm_aug.data.prepared import unit_to_hu
    from lsdm_aug.editing import SATURATED_HU, is_saturated

    shown = []

    def spy(image, region):
        shown.append((image.copy(), np.asarray(region).copy()))
        return is_saturated(image, region)
    monkeypatch.setattr(module, "is_saturated", spy)
    case = cases["free"]
    result = pipe.insert(case["image"], case["semantic_map"], disk_outline(), centre=lung_site(case["semantic_map"]),
                         features={"malignancy": 4}, steps=STEPS, seed=0, spacing_mm=pipe.spacing_mm,
                         conditioning={"calcification": 6})
    image, region = shown[-1]
    assert np.array_equal(region, result.nodule_mask > 0) and np.array_equal(image, result.image)
    p90 = np.percentile(unit_to_hu(result.image[result.nodule_mask > 0]), 90)
    assert result.record["saturated"] is bool(p90 >= SATURATED_HU)
    assert len(shown) == 1 + result.record["redraws"]


def test_without_classifier_free_guidance_nothing_is_told_so_nothing_is_redrawn(pipe, cases, monkeypatch):
    from lsdm_aug import pipeline as module

    monkeypatch.setattr(module, "is_saturated", lambda image, region: True)
    case = cases["free"]
    result = pipe.insert(case["image"], case["semantic_map"], disk_outline(), centre=lung_site(case["semantic_map"]),
                         features={"calcification": 6}, steps=STEPS, seed=0, spacing_mm=pipe.spacing_mm,
                         guidance_scale=0.0, cfg_scale=0.0)  # an unguided request on purpose: the U-Net hears nothing
    assert result.record["redraws"] == 0 and "saturated" not in result.record


@pytest.mark.parametrize("value", [-1, 1.5, "2", True])
def test_max_redraws_is_checked(pipe, value):
    with pytest.raises(ValueError, match=rf"max_redraws must be an int >= 0, got {re.escape(repr(value))}"):
        _twin(pipe, value)
