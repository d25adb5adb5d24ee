"""nnU-Net v2: the batchgeneratorsv2 NoduleSynth transform and the nnUNetTrainerNoduleSynth trainer."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from lsdm_aug.data.prepared import PreparedDataset, unit_to_hu
from lsdm_aug.transforms.nnunet import NoduleSynthTransform

HU_MEAN, HU_STD = -350.0, 420.0


@pytest.fixture(scope="module")
def normalized_sample(phantom_dataset):
    dataset = PreparedDataset(phantom_dataset)
    case = dataset[dataset.cases[dataset.cases.n_nodules == 0].case_id.iloc[0]]
    image = (unit_to_hu(case["image"]) - HU_MEAN) / HU_STD
    return torch.from_numpy(image)[None].float(), torch.zeros(1, *image.shape, dtype=torch.int16), case["spacing_mm"]


def test_transform_inserts_in_normalized_units_and_labels_the_nodule(normalized_sample, smoke_models):
    image, segmentation, spacing = normalized_sample
    np.random.seed(0)
    transform = NoduleSynthTransform((spacing, spacing), HU_MEAN, HU_STD, prob=1.0, model=str(smoke_models), steps=2,
                                     malignancy=5, label_value=1)
    out = transform(image=image.clone(), segmentation=segmentation.clone())
    inserted = out["segmentation"][0] > 0
    changed = out["image"][0] != image[0]
    assert inserted.any() and changed.any()
    assert changed.sum() < 0.2 * changed.numel()  # only the footprint
    assert out["segmentation"].dtype == torch.int16 and out["image"].dtype == torch.float32
    assert out["image"].abs().max() < 10  # still z-scored, not HU


def test_a_2_5d_patch_gets_one_nodule_over_its_channel_slices_labelled_on_the_middle_one(normalized_sample,
                                                                                        smoke_models):
    image, segmentation, spacing = normalized_sample
    patch = image.repeat(3, 1, 1)  # (channels = 3 neighbouring slices, y, x)
    transform = NoduleSynthTransform((spacing, spacing), HU_MEAN, HU_STD, prob=1.0, model=str(smoke_models), steps=2,
                                     malignancy=5, size_mm=12.0, slice_thickness_mm=2.0)
    inserted = 0
    for seed in range(4):
        np.random.seed(seed)
        out = transform(image=patch.clone(), segmentation=segmentation.clone())
        record = transform.last_record
        if record.get("changed_pixels", 0) == 0:
            continue
        inserted += 1
        assert record["centre_slice"] == 1 and 1 in record["slices"]
        changed = (out["image"] != patch).flatten(1).any(1).tolist()
        assert changed[1] and set(np.flatnonzero(changed)) <= set(record["slices"])
        labelled = out["segmentation"][0] > 0
        assert out["segmentation"].shape == segmentation.shape and labelled.any()
        assert (out["image"][1] != patch[1])[labelled].float().mean() > 0.9  # the middle slice's own nodule
    assert inserted >= 3
    with pytest.raises(ValueError, match="slice_thickness_mm .* needs a 2D patch spacing"):
        NoduleSynthTransform((2.5, spacing, spacing), HU_MEAN, HU_STD, slice_thickness_mm=2.0)


def test_2_5d_channels_normalised_apart_are_read_and_written_each_in_its_own_units(normalized_sample, smoke_models):
    """nnU-Net z-scores every channel with its own foreground statistics: channel 1 here with (20, 60)."""
    image, segmentation, spacing = normalized_sample
    hu = image[0] * HU_STD + HU_MEAN
    stats = [(HU_MEAN, HU_STD), (20.0, 60.0), (HU_MEAN, HU_STD)]
    patch = torch.stack([(hu - mean) / std for mean, std in stats]).float()
    transform = NoduleSynthTransform((spacing, spacing), HU_MEAN, HU_STD, prob=1.0, model=str(smoke_models), steps=2,
                                     malignancy=5, size_mm=12.0, slice_thickness_mm=2.0, channel_stats=stats)
    for seed in range(8):
        np.random.seed(seed)
        out = transform(image=patch.clone(), segmentation=segmentation.clone())
        if len(transform.last_record.get("slices", ())) < 3 or not transform.last_record["changed_pixels"]:
            continue  # the nodule must span the three slices
        changed = out["image"][1] != patch[1]
        assert changed.any() and torch.equal(out["image"][1][~changed], patch[1][~changed])
        both = changed & (out["image"][0] != patch[0])
        middle_hu = out["image"][1][both] * 60.0 + 20.0  # each channel in its own units
        top_hu = out["image"][0][both] * HU_STD + HU_MEAN
        assert both.sum() > 5 and abs(float(middle_hu.mean() - top_hu.mean())) < 300  # one nodule, one CT
        return
    pytest.fail("no draw spanned the three slices")


def test_bad_channel_statistics_are_refused():
    with pytest.raises(ValueError, match="channel_stats must be"):
        NoduleSynthTransform((0.7, 0.7), HU_MEAN, HU_STD, slice_thickness_mm=2.0, channel_stats=[(0.0, 0.0)])


def test_a_3d_patch_in_nnunet_axis_order_gets_nodules(normalized_sample, smoke_models):
    """nnU-Net's 3D patches are (C, z, y, x) with spacing (z, y, x): the nodule goes on consecutive z slices."""
    image, _, spacing = normalized_sample
    patch = image[0][None].repeat(24, 1, 1)[None]  # (1, z=24, y, x)
    transform = NoduleSynthTransform((2.5, spacing, spacing), HU_MEAN, HU_STD, prob=1.0, model=str(smoke_models),
                                     steps=2, malignancy=5, size_mm=10.0)
    inserted = 0
    for seed in range(4):
        np.random.seed(seed)
        out = transform(image=patch.clone(), segmentation=torch.zeros(patch.shape, dtype=torch.int16))
        record = transform.last_record
        if record.get("changed_pixels", 0) > 0:
            inserted += 1
            labelled = torch.nonzero(out["segmentation"][0].flatten(1).any(1)).flatten().tolist()
            assert labelled == list(range(labelled[0], labelled[-1] + 1)) and set(labelled) <= set(record["slices"])
            changed_z = torch.nonzero((out["image"][0] != patch[0]).flatten(1).any(1)).flatten().tolist()
            assert set(changed_z) <= set(record["slices"])
    assert inserted >= 3  # a stack of lung slices always has lung


def test_a_transposed_3d_patch_gets_its_nodule_along_the_axis_z_went_to(normalized_sample, smoke_models):
    """nnU-Net puts the coarsest axis first: with z second, the nodule's slices follow axis 1 of the patch."""
    image, _, spacing = normalized_sample
    patch = image[0][:, None, :].repeat(1, 12, 1)[None]  # (1, y, z=12, x)
    transform = NoduleSynthTransform((spacing, 1.0, spacing), HU_MEAN, HU_STD, prob=1.0, model=str(smoke_models),
                                     steps=2, malignancy=5, size_mm=10.0, axial_axis=1)
    inserted = 0
    for seed in range(3):
        np.random.seed(seed)
        out = transform(image=patch.clone(), segmentation=torch.zeros(patch.shape, dtype=torch.int16))
        if transform.last_record.get("changed_pixels", 0) > 0:
            inserted += 1
            labelled_z = torch.nonzero(out["segmentation"][0].movedim(1, 0).flatten(1).any(1)).flatten().tolist()
            assert labelled_z and set(labelled_z) <= set(transform.last_record["slices"])
    assert inserted >= 2


def test_non_square_in_plane_pixels_are_refused(normalized_sample, smoke_models):
    _, _, spacing = normalized_sample
    with pytest.raises(ValueError, match="in-plane pixels must be square"):  # when built, before any patch
        NoduleSynthTransform((spacing, 1.0, spacing), HU_MEAN, HU_STD, prob=1.0, model=str(smoke_models))


def test_a_2d_configuration_that_does_not_slice_axially_is_refused():
    from lsdm_aug.nnunet.trainers.nnUNetTrainerNoduleSynth import axial_axis

    assert axial_axis([2, 0, 1], 3) == 1
    with pytest.raises(ValueError, match="not axially"):
        axial_axis([1, 0, 2], 2)


def test_a_patch_whose_spacing_has_other_axes_is_refused(normalized_sample, smoke_models):
    image, segmentation, spacing = normalized_sample
    transform = NoduleSynthTransform((2.5, spacing, spacing), HU_MEAN, HU_STD, prob=1.0, model=str(smoke_models))
    with pytest.raises(ValueError, match="has 3 axes, the patch has 2"):
        transform(image=image.clone(), segmentation=segmentation.clone())


def test_transform_with_prob_zero_changes_nothing(normalized_sample, smoke_models):
    image, segmentation, spacing = normalized_sample
    transform = NoduleSynthTransform((spacing, spacing), HU_MEAN, HU_STD, prob=0.0, model=str(smoke_models))
    out = transform(image=image.clone(), segmentation=segmentation.clone())
    assert torch.equal(out["image"], image) and torch.equal(out["segmentation"], segmentation)
    with pytest.raises(ValueError, match="prob must be in \\[0, 1\\], got 1.5"):
        NoduleSynthTransform((1.0, 1.0), 0.0, 1.0, prob=1.5)


@pytest.fixture(scope="module")
def nnunet_dirs(tmp_path_factory, smoke_models):
    from lsdm_aug.synthesis import SynthesisRequest, synthesize

    root = tmp_path_factory.mktemp("nnunet")
    synthesize(root / "raw" / "Dataset988_LsdmTrain", SynthesisRequest(count=6, size=64, steps=2, model=str(smoke_models)))
    env = {**os.environ, "nnUNet_raw": str(root / "raw"), "nnUNet_preprocessed": str(root / "pre"),
           "nnUNet_results": str(root / "res")}
    # lsdm-aug's planning: nnU-Net's, with the CT window widened so that the lung survives preprocessing
    result = subprocess.run([sys.executable, "-m", "lsdm_aug.cli", "nnunet", "plan", "988"], env=env,
                            capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return env


@pytest.mark.slow
def test_trainer_prepends_nodule_synth_with_the_plans_statistics(nnunet_dirs, smoke_models, monkeypatch):
    for key in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        monkeypatch.setenv(key, nnunet_dirs[key])
    monkeypatch.setenv("LSDM_AUG_NNUNET", json.dumps({"prob": 0.5, "model": str(smoke_models), "steps": 2,
                                                      "num_epochs": 3, "oversample_foreground_percent": 0.75,
                                                      "optimizer": "adamw", "initial_lr": 0.001,
                                                      "p_scaling": 0.5, "scaling": [0.6, 1.6], "random_crop": True,
                                                      "progress_plot_every": 3}))
    from batchgeneratorsv2.transforms.spatial.spatial import SpatialTransform

    from lsdm_aug.nnunet.trainers.nnUNetTrainerNoduleSynth import nnUNetTrainerNoduleSynth

    folder = Path(nnunet_dirs["nnUNet_preprocessed"]) / "Dataset988_LsdmTrain"
    plans = json.loads((folder / "nnUNetPlans.json").read_text()) | {"continue_training": False}
    trainer = nnUNetTrainerNoduleSynth(plans, "2d", 0, json.loads((folder / "dataset.json").read_text()),
                                       device=torch.device("cpu"))
    assert trainer.num_epochs == 3 and trainer.oversample_foreground_percent == 0.75
    assert "oversample_foreground_percent" not in trainer.nodule_synth_settings  # a trainer attribute only
    trainer.initialize()
    optimizer, _ = trainer.configure_optimizers()  # nnU-Net's own nnUNetTrainerAdam choice
    assert isinstance(optimizer, torch.optim.AdamW) and optimizer.param_groups[0]["lr"] == 0.001
    transforms = trainer.get_training_transforms(np.array([64, 64]), (0, 0), None, (0, 1), False,
                                                 foreground_labels=[1])
    first = transforms.transforms[0]
    assert isinstance(first, NoduleSynthTransform) and first.prob == 0.5
    spatial = [t for t in transforms.transforms if isinstance(t, SpatialTransform)]
    assert len(spatial) == 1 and spatial[0].p_scaling == 0.5 and spatial[0].scaling == (0.6, 1.6)
    assert spatial[0].p_rotation == 0.2  # the rest stays nnU-Net's
    # the final patch anywhere in the loaded one, at least half a patch from its border (nnU-Net: its centre)
    assert spatial[0].random_crop is True and list(spatial[0].patch_center_dist_from_border) == [32.0, 32.0]
    assert "random_crop" not in trainer.nodule_synth_settings
    assert "scaling" not in first.synthesizer.__dict__ and "progress_plot_every" not in trainer.nodule_synth_settings
    stats = plans["foreground_intensity_properties_per_channel"]["0"]
    assert first.synthesizer.hu_mean == stats["mean"] and first.synthesizer.hu_std == stats["std"]
    for bad, message in (({"oversample_foreground_percent": 1.5},
                          "oversample_foreground_percent in LSDM_AUG_NNUNET must be in \\[0, 1\\], got 1.5"),
                         ({"optimizer": "lion"}, "optimizer in LSDM_AUG_NNUNET must be one of \\('sgd', 'adamw'\\)"),
                         ({"scaling": [1.4, 0.7]}, "scaling in LSDM_AUG_NNUNET must be \\[low, high\\] with 0 < low"),
                         ({"p_scaling": 2}, "p_scaling in LSDM_AUG_NNUNET must be in \\[0, 1\\], got 2"),
                         ({"random_crop": "yes"}, "random_crop in LSDM_AUG_NNUNET must be true or false, got 'yes'"),
                         ({"progress_plot_every": 0}, "progress_plot_every in LSDM_AUG_NNUNET must be >= 1, got 0")):
        monkeypatch.setenv("LSDM_AUG_NNUNET", json.dumps(bad))
        with pytest.raises(ValueError, match=message):
            nnUNetTrainerNoduleSynth(plans | {"continue_training": False}, "2d", 0,  # nnU-Net pops that key
                                     json.loads((folder / "dataset.json").read_text()), device=torch.device("cpu"))


@pytest.mark.slow
def test_the_progress_plot_is_drawn_every_n_epochs_and_at_the_last(nnunet_dirs, monkeypatch):
    """matplotlib costs about a second per epoch on a CPU; the epoch's log and checkpoints stay nnU-Net's."""
    from unittest import mock

    from lsdm_aug.nnunet.trainers.nnUNetTrainerNoduleSynth import nnUNetTrainerNoduleSynth

    for key in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        monkeypatch.setenv(key, nnunet_dirs[key])
    monkeypatch.setenv("LSDM_AUG_NNUNET", json.dumps({"num_epochs": 5, "progress_plot_every": 2, "prob": 0.0}))
    folder = Path(nnunet_dirs["nnUNet_preprocessed"]) / "Dataset988_LsdmTrain"
    plans = json.loads((folder / "nnUNetPlans.json").read_text()) | {"continue_training": False}
    trainer = nnUNetTrainerNoduleSynth(plans, "2d", 0, json.loads((folder / "dataset.json").read_text()),
                                       device=torch.device("cpu"))
    trainer.initialize()
    drawn = []
    with mock.patch.object(trainer.logger, "plot_progress_png", side_effect=lambda _: drawn.append(trainer.current_epoch)):
        for epoch in range(5):
            for key, value in (("epoch_start_timestamps", 0.0), ("train_losses", 0.5), ("val_losses", 0.5),
                               ("mean_fg_dice", 0.1 * epoch), ("dice_per_class_or_region", [0.1 * epoch])):
                trainer.logger.log(key, value, epoch)
            trainer.on_epoch_end()
    assert drawn == [1, 3, 4] and trainer.current_epoch == 5
    assert (Path(trainer.output_folder) / "checkpoint_best.pth").is_file()  # the rest of the epoch's end still ran


@pytest.mark.slow
def test_a_few_training_iterations_with_the_trainer_on_cpu(nnunet_dirs, smoke_models):
    env = {**nnunet_dirs, "LSDM_AUG_NNUNET": json.dumps({"num_epochs": 1, "num_iterations_per_epoch": 2,
                                                         "num_val_iterations_per_epoch": 1, "prob": 1.0,
                                                         "model": str(smoke_models), "steps": 2}),
           "nnUNet_n_proc_DA": "2"}
    result = subprocess.run([sys.executable, "-m", "lsdm_aug.cli", "nnunet", "train", "988", "2d", "0"], env=env,
                            capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    fold = Path(nnunet_dirs["nnUNet_results"]) / "Dataset988_LsdmTrain" / "nnUNetTrainerNoduleSynth__nnUNetPlans__2d" / "fold_0"
    assert (fold / "checkpoint_final.pth").is_file()
    assert "Mean Validation Dice" in result.stdout


@pytest.mark.slow
def test_a_seed_makes_training_repeatable_and_another_seed_differs(nnunet_dirs, tmp_path):
    """nnU-Net starts its background augmenters unseeded; the trainer's seed must reach them, so two runs
    with one seed predict identically (patch sampling and augmentation included) and another seed does not."""
    images = Path(nnunet_dirs["nnUNet_raw"]) / "Dataset988_LsdmTrain" / "imagesTr"

    def run(seed: int, name: str) -> np.ndarray:
        settings = {"num_epochs": 1, "num_iterations_per_epoch": 3, "num_val_iterations_per_epoch": 1, "prob": 0.0,
                    "seed": seed}
        env = {**nnunet_dirs, "nnUNet_results": str(tmp_path / name), "nnUNet_n_proc_DA": "1",
               "LSDM_AUG_NNUNET": json.dumps(settings)}
        job = {"dataset": "988", "configuration": "2d", "test": str(images), "predictions": str(tmp_path / name / "p"),
               "mirroring": False}
        result = subprocess.run([sys.executable, "-m", "lsdm_aug.nnunet.training", json.dumps(job)], env=env,
                                capture_output=True, text=True, timeout=900)
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
        files = sorted((tmp_path / name / "p").glob("*.npz"))
        assert len(files) == 6
        return np.stack([np.load(f)["probabilities"] for f in files])

    first, again, other = run(3, "first"), run(3, "again"), run(4, "other")
    np.testing.assert_array_equal(first, again)
    assert np.abs(first - other).max() > 1e-4


@pytest.mark.slow
def test_plan_widens_the_ct_window_and_the_trainer_refuses_nnunets_own(nnunet_dirs, smoke_models, monkeypatch):
    """nnU-Net's own CT window for a nodule dataset starts near the nodules' density: the planned dataset
    keeps the lung, and a trainer given a window that flattens the lung refuses to insert."""
    for key in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        monkeypatch.setenv(key, nnunet_dirs[key])
    monkeypatch.setenv("LSDM_AUG_NNUNET", json.dumps({"prob": 0.5, "model": str(smoke_models), "steps": 2}))
    from lsdm_aug.nnunet.trainers.nnUNetTrainerNoduleSynth import nnUNetTrainerNoduleSynth

    folder = Path(nnunet_dirs["nnUNet_preprocessed"]) / "Dataset988_LsdmTrain"
    plans = json.loads((folder / "nnUNetPlans.json").read_text()) | {"continue_training": False}
    window = plans["foreground_intensity_properties_per_channel"]["0"]
    assert (window["percentile_00_5"], window["percentile_99_5"]) == (-1024.0, 800.0)
    fingerprint = json.loads((folder / "dataset_fingerprint.json").read_text())
    own = fingerprint["foreground_intensity_properties_per_channel"]["0"]
    assert own["percentile_00_5"] > -1024  # nnU-Net's own window, from the nodules, was narrower
    # the 128 px phantom's nodules give nnU-Net a lower clip of -49 HU (these 64 px ones: about -500)
    plans["foreground_intensity_properties_per_channel"]["0"] = own | {"percentile_00_5": -49.0}
    trainer = nnUNetTrainerNoduleSynth(plans, "2d", 0, json.loads((folder / "dataset.json").read_text()),
                                       device=torch.device("cpu"))
    with pytest.raises(ValueError, match="NoduleSynth finds no lung"):
        trainer.get_training_transforms(np.array([64, 64]), (0, 0), None, (0, 1), False, foreground_labels=[1])


def test_the_nodule_label_of_a_multi_label_dataset_is_the_users_choice():
    from lsdm_aug.nnunet.trainers.nnUNetTrainerNoduleSynth import nodule_label_value

    assert nodule_label_value([1], None) == 1 and nodule_label_value(None, None) == 1
    assert nodule_label_value([1, 2, 3], 2) == 2
    with pytest.raises(ValueError, match=r"foreground labels \[1, 2\]: set label_value"):
        nodule_label_value([2, 1], None)
    with pytest.raises(ValueError, match=r"label_value 5 is not among the dataset's foreground labels \[1, 2\]"):
        nodule_label_value([1, 2], 5)


def test_a_training_patch_inside_the_lung_gets_a_site(smoke_models):
    """nnU-Net hands the transform patches, not slices: a patch cut from inside the lung has no body around its
    lung, which the whole-slice lung finder used to drop as the air around a patient ("no lung tissue")."""
    rng = np.random.default_rng(0)
    hu = rng.normal(-850, 25, (3, 96, 96)).astype(np.float32)  # 2.5D: three neighbouring slices of parenchyma
    hu[:, 40:43, :] = 40.0  # a vessel across the patch
    image = torch.from_numpy((hu - HU_MEAN) / HU_STD)
    transform = NoduleSynthTransform((0.7, 0.7), HU_MEAN, HU_STD, prob=1.0, model=str(smoke_models),
                                     slice_thickness_mm=2.5, size_mm=6.0)
    skipped = []
    for seed in range(5):
        np.random.seed(seed)
        nodule = transform.get_parameters(image=image, segmentation=torch.zeros(1, 96, 96, dtype=torch.int16))["nodule"]
        skipped.append(nodule.skipped)
    assert skipped == [""] * 5
    air = torch.from_numpy((rng.normal(-1000, 20, (3, 96, 96)).astype(np.float32) - HU_MEAN) / HU_STD)
    np.random.seed(0)
    outside = transform.get_parameters(image=air, segmentation=torch.zeros(1, 96, 96, dtype=torch.int16))["nodule"]
    assert outside.skipped == "no lung tissue"  # a patch of the air around the patient is not lung


def _foreground_offsets(spatial, draws: int = 30) -> np.ndarray:
    """Where a 4 px foreground square at the centre of a loaded 104 px patch lands in the final 64 px patch."""
    offsets = []
    for seed in range(draws):
        torch.manual_seed(seed)
        np.random.seed(seed)
        segmentation = torch.zeros((1, 104, 104))
        segmentation[0, 50:54, 50:54] = 1
        out = spatial(image=torch.rand(1, 104, 104), segmentation=segmentation)["segmentation"][0].numpy()
        assert (out > 0).any()  # the patch still holds its foreground
        offsets.append(np.abs(np.argwhere(out > 0).mean(0) - 31.5))
    return np.array(offsets)


def test_nnunets_foreground_patches_hold_the_nodule_at_their_centre_and_crop_anywhere_moves_it():
    from batchgeneratorsv2.transforms.spatial.spatial import SpatialTransform

    from lsdm_aug.nnunet.trainers.nnUNetTrainerNoduleSynth import crop_anywhere

    def nnunets_own():  # as nnUNetTrainer.get_training_transforms builds it
        return SpatialTransform((64, 64), patch_center_dist_from_border=0, random_crop=False, p_elastic_deform=0,
                                p_rotation=0.2, rotation=(-np.pi, np.pi), p_scaling=0.2, scaling=(0.7, 1.4),
                                p_synchronize_scaling_across_axes=1, bg_style_seg_sampling=False,
                                border_mode_seg="constant", padding_value_seg=-1)

    assert _foreground_offsets(nnunets_own()).max() == 0  # every positive patch: the nodule at the centre
    anywhere = nnunets_own()
    crop_anywhere(anywhere)
    offsets = _foreground_offsets(anywhere)
    assert offsets.max() <= 20 + 2 and offsets.mean() > 5  # up to (104 - 64) / 2 px off, in the patch
