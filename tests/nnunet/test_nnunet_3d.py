"""nnUNetTrainerNoduleSynth in ``3d_fullres``: nnU-Net's own planner and training loop on 3D volumes.

nnU-Net hands 3D patches to the transforms as (C, z, y, x), transposed by its plans; the test trains a few
iterations and counts how many training patches received a labelled nodule.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

SLICES, SLICE_MM, SIZE = 24, 1.0, 128  # in-plane pixels (about 2.8 mm) coarser than the slices
COUNT_PATCHES = r"""
import json, sys
import numpy as np, torch
from lsdm_aug.transforms.nnunet import NoduleSynthTransform
from lsdm_aug.nnunet.training import trainer_class

records = []
apply = NoduleSynthTransform.apply
def counting_apply(self, data_dict, nodule=None, **params):
    before_mask = data_dict["segmentation"][0] > 0
    before = int(before_mask.sum())
    out = apply(self, data_dict, nodule=nodule, **params)
    labelled = out["segmentation"][0] > 0
    z_axis = list(transpose_forward).index(0)
    added = labelled & ~before_mask
    z = torch.nonzero(added.movedim(z_axis, 0).flatten(1).any(1)).flatten().tolist()
    records.append({"inserted": nodule is not None and not nodule.skipped and self.last_record.get("changed_pixels", 0) > 0,
                    "added_voxels": int(labelled.sum()) - before, "patch": list(out["image"].shape),
                    "record_slices": [int(s) for s in self.last_record.get("slices", [])], "labelled_z": z,
                    "skipped": None if nodule is None else nodule.skipped})
    return out
NoduleSynthTransform.apply = counting_apply

folder = sys.argv[1]
plans = json.load(open(folder + "/nnUNetPlans.json")) | {"continue_training": False}
transpose_forward = plans["transpose_forward"]
trainer = trainer_class()(plans, "3d_fullres", "all", json.load(open(folder + "/dataset.json")), device=torch.device("cpu"))
trainer.run_training()  # nnU-Net's own loop: its loader, its transforms, a few iterations
print("RECORDS" + json.dumps({"patch_size": list(trainer.configuration_manager.patch_size), "records": records,
                              "transpose_forward": list(trainer.plans_manager.transpose_forward)}))
"""


def _volume(patient: int, size: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, float]:
    """A (z, y, x) phantom chest of SLICES axial slices with one small spherical nodule labelled 1."""
    from lsdm_aug.data.phantom import ChestPhantom, PhantomConfig
    from lsdm_aug.data.semantic import SemanticLabel, semantic_map_from_hu

    phantom = ChestPhantom(PhantomConfig(size=size, nodule_free_fraction=1.0))
    slices = [phantom.background(patient, 0.35 + 0.3 * k / SLICES, seed=patient) for k in range(SLICES)]
    spacing = slices[0].spacing_mm
    hu = np.stack([s.hu for s in slices]).astype(np.float32)
    label = np.zeros(hu.shape, np.uint8)
    middle = SLICES // 2
    lung = semantic_map_from_hu(hu[middle], spacing_mm=spacing) == SemanticLabel.LUNG
    rows, cols = np.nonzero(lung)
    pick = rng.integers(len(rows))
    zz, yy, xx = np.ogrid[:SLICES, :size, :size]
    ball = ((zz - middle) * SLICE_MM) ** 2 + ((yy - rows[pick]) * spacing) ** 2 + ((xx - cols[pick]) * spacing) ** 2 <= 16
    hu[ball], label[ball] = rng.normal(20.0, 60.0, int(ball.sum())), 1  # nnU-Net z-scores by the nodules' HU
    return hu, label, spacing


@pytest.fixture(scope="module")
def nnunet_3d(tmp_path_factory, smoke_models):
    import SimpleITK as sitk

    root = tmp_path_factory.mktemp("nnunet3d")
    raw = root / "raw" / "Dataset987_Lsdm3D"
    (raw / "imagesTr").mkdir(parents=True)
    (raw / "labelsTr").mkdir()
    rng = np.random.default_rng(0)
    cases = 4
    for k in range(cases):
        hu, label, spacing = _volume(k, SIZE, rng)
        for array, path in ((hu, raw / "imagesTr" / f"lung_{k:03d}_0000.nii.gz"), (label, raw / "labelsTr" / f"lung_{k:03d}.nii.gz")):
            image = sitk.GetImageFromArray(array)  # (z, y, x) array -> (x, y, z) image
            image.SetSpacing((spacing, spacing, SLICE_MM))
            sitk.WriteImage(image, str(path))
    (raw / "dataset.json").write_text(json.dumps({"channel_names": {"0": "CT"}, "labels": {"background": 0, "nodule": 1},
                                                  "numTraining": cases, "file_ending": ".nii.gz"}))
    env = {**os.environ, "nnUNet_raw": str(root / "raw"), "nnUNet_preprocessed": str(root / "pre"),
           "nnUNet_results": str(root / "res"), "nnUNet_n_proc_DA": "0"}
    result = subprocess.run([sys.executable, "-m", "lsdm_aug.cli", "nnunet", "plan", "987", "-c", "3d_fullres"], env=env,
                            capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return env, root / "pre" / "Dataset987_Lsdm3D"


@pytest.mark.slow
def test_the_trainer_inserts_labelled_nodules_into_3d_fullres_patches(nnunet_3d, smoke_models):
    env, preprocessed = nnunet_3d
    iterations = 3
    env = {**env, "LSDM_AUG_NNUNET": json.dumps({"prob": 1.0, "model": str(smoke_models), "steps": 2, "seed": 0,
                                                 "size_mm": 12.0, "num_epochs": 1, "num_iterations_per_epoch": iterations,
                                                 "num_val_iterations_per_epoch": 1})}
    result = subprocess.run([sys.executable, "-c", COUNT_PATCHES, str(preprocessed)], env=env,
                            capture_output=True, text=True, timeout=1200)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    counted = json.loads(result.stdout.split("RECORDS", 1)[1])
    records = counted["records"]
    assert len(counted["patch_size"]) == 3 and len(records) >= 2 * iterations  # every training patch
    assert all(len(r["patch"]) == 4 for r in records)  # (C, z, y, x) as nnU-Net hands them over
    # in-plane pixels coarser than the slices: nnU-Net moves z off the first axis
    z_axis = counted["transpose_forward"].index(0)
    assert z_axis != 0
    inserted = [r for r in records if r["inserted"]]
    # nnU-Net pads its rotation-enlarged crops beyond the volume: a few patches show too little lung
    assert len(inserted) >= 0.5 * len(records), [r["skipped"] for r in records]
    assert {r["skipped"] for r in records if not r["inserted"]} <= {"no lung tissue"}
    for r in inserted:
        assert r["added_voxels"] >= 2, json.dumps(r)  # every inserted nodule is labelled
        assert r["labelled_z"] and set(r["labelled_z"]) <= set(r["record_slices"])  # labelled on the nodule's slices
        assert set(r["record_slices"]) <= set(range(r["patch"][1 + z_axis]))  # ... counted along where z went
