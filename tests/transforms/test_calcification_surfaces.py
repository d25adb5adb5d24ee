"""Calcification (LIDC 1..6, 6 absent) reaches every surface as a requested feature: the core synthesizer,
MONAI, TorchIO, synthesize and bank build; the U-Net's classifier-free guidance is what steers it."""

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
from lsdm_aug.transforms.core import NoduleSynthesizer, parse_feature
from lsdm_aug.transforms.torchio import RandomNoduleSynth


def test_calcification_takes_six_levels_and_names_a_bad_value():
    assert parse_feature("calcification", 6) == 6 and parse_feature("calcification", (3, 6)) == (3, 6)
    with pytest.raises(ValueError, match="calcification must be an int 1..6.*got 7"):
        NoduleSynthesizer(calcification=7)
    with pytest.raises(ValueError, match="texture must be an int 1..5.*got 6"):
        NoduleSynthesizer(texture=6)  # the other features keep their 1..5 scale
    rng, table = np.random.RandomState(0), pd.DataFrame({"malignancy": [3.0], "calcification": [6.0]})
    drawn = [NoduleSynthesizer(calcification="balanced")._draw_features(rng, table) for _ in range(300)]
    assert {d["calcification"] for d in drawn} == {1.0, 2.0, 3.0, 4.0, 5.0, 6.0}


def test_monai_records_the_requested_calcification(slice_hu, smoke_models):
    from lsdm_aug.transforms.monai import synthesis_records

    hu, spacing = slice_hu
    image = MetaTensor(torch.from_numpy(hu)[None], affine=torch.diag(torch.tensor([spacing, spacing, 1.0, 1.0])))
    synth = NoduleSynth(malignancy=2, calcification=6, guidance_scale=0.0, cfg_scale=1.0, model=str(smoke_models),
                        steps=2)
    out = synth.set_random_state(4)(image)
    record = synthesis_records(out)[-1]
    assert record["features"] == {"malignancy": 2.0, "calcification": 6.0}
    assert (out != image).any()


def test_torchio_takes_calcification_and_replays_it(slice_hu, smoke_models):
    hu, spacing = slice_hu
    affine = np.diag([spacing, spacing, 1.0, 1.0])
    subject = tio.Subject(image=tio.ScalarImage(tensor=torch.from_numpy(hu)[None, ..., None], affine=affine))
    torch.manual_seed(0)
    transformed = RandomNoduleSynth(label_name=None, malignancy=5, calcification=6, model=str(smoke_models),
                                    steps=2)(subject)
    assert torch.equal(transformed.get_composed_history()(subject).image.data, transformed.image.data)


def test_synthesize_and_bank_take_calcification(tmp_path, smoke_models):
    runner = CliRunner()
    out = tmp_path / "Dataset511_Calcification"
    result = runner.invoke(app, ["synthesize", "--out", str(out), "--count", "2", "--size", "64", "--steps", "2",
                                 "--malignancy", "1", "--calcification", "6", "--model", str(smoke_models)])
    assert result.exit_code == 0, result.output
    assert (pd.read_csv(out / "manifest.csv").calcification_asked == 6.0).all()
    bad = runner.invoke(app, ["bank", "build", "--out", str(tmp_path / "bank"), "--count", "2",
                              "--calcification", "7", "--model", str(smoke_models)])
    assert bad.exit_code == 2 and "--calcification must be a level 1..6" in bad.output
