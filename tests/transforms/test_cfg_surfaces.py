"""Classifier-free guidance reaches every surface: MONAI, TorchIO, nnU-Net, synthesize and bank build."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
import torchio as tio
from monai.data import MetaTensor
from typer.testing import CliRunner

from lsdm_aug import NoduleSynth
from lsdm_aug.cli import app
from lsdm_aug.transforms.nnunet import NoduleSynthTransform
from lsdm_aug.transforms.torchio import RandomNoduleSynth


def _monai(hu, spacing, models, cfg_scale):
    image = MetaTensor(torch.from_numpy(hu)[None], affine=torch.diag(torch.tensor([spacing, spacing, 1.0, 1.0])))
    synth = NoduleSynth(malignancy=5, texture=1, guidance_scale=0.0, cfg_scale=cfg_scale, model=str(models), steps=2)
    return synth.set_random_state(4)(image)


def test_monai_cfg_scale_changes_only_the_nodule(slice_hu, smoke_models):
    hu, spacing = slice_hu
    plain, strong = (_monai(hu, spacing, smoke_models, w) for w in (0.0, 4.0))
    differs = (plain != strong)[0]
    assert differs.any()
    changed = (plain != torch.from_numpy(hu)[None])[0]
    assert not (differs & ~changed).any()  # the same draw, so the same footprint: only the nodule differs


def test_torchio_takes_cfg_scale_and_replays_it(slice_hu, smoke_models):
    hu, spacing = slice_hu
    affine = np.diag([spacing, spacing, 1.0, 1.0])
    subject = tio.Subject(image=tio.ScalarImage(tensor=torch.from_numpy(hu)[None, ..., None], affine=affine))
    torch.manual_seed(0)
    transformed = RandomNoduleSynth(label_name=None, malignancy=5, cfg_scale=3.0, model=str(smoke_models), steps=2)(subject)
    fixed = transformed.get_composed_history().transforms[0]
    assert fixed.cfg_scale == 3.0
    assert torch.equal(transformed.get_composed_history()(subject).image.data, transformed.image.data)


def test_nnunet_transform_passes_cfg_scale(slice_hu, smoke_models):
    transform = NoduleSynthTransform((1.0, 1.0), 0.0, 1.0, model=str(smoke_models), cfg_scale=2.5)
    assert transform.synthesizer.cfg_scale == 2.5
    with pytest.raises(ValueError, match="cfg_scale must be >= 0"):
        NoduleSynthTransform((1.0, 1.0), 0.0, 1.0, model=str(smoke_models), cfg_scale=-1.0)


def test_synthesize_and_bank_take_cfg_scale(tmp_path, smoke_models):
    runner = CliRunner()
    out = tmp_path / "Dataset510_Cfg"
    result = runner.invoke(app, ["synthesize", "--out", str(out), "--count", "2", "--size", "64", "--steps", "2",
                                 "--malignancy", "5", "--cfg-scale", "2", "--model", str(smoke_models)])
    assert result.exit_code == 0, result.output
    assert (pd.read_csv(out / "manifest.csv").cfg_scale == 2.0).all()
    bad = runner.invoke(app, ["bank", "build", "--out", str(tmp_path / "bank"), "--count", "2", "--cfg-scale", "-1",
                              "--model", str(smoke_models)])
    assert bad.exit_code == 2 and "--cfg-scale must be >= 0, got -1" in bad.output
