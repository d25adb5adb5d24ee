"""The shipped default model loads from the package (no network) and runs."""

from __future__ import annotations

import json

import numpy as np
import torch
from monai.data import MetaTensor

from lsdm_aug import NoduleSynth
from lsdm_aug.data.phantom import ChestPhantom, PhantomConfig
from lsdm_aug.data.semantic import semantic_map_from_hu
from lsdm_aug.pipeline import DEFAULT_MODEL_DIR, LSDMPipeline


def test_default_weights_ship_with_their_configs_and_card_under_25_mb():
    weights = sorted(p.name for p in DEFAULT_MODEL_DIR.glob("*.safetensors"))
    assert weights == ["autoencoder.safetensors", "classifier_lobulation.safetensors", "classifier_malignancy.safetensors",
                       "classifier_spiculation.safetensors", "classifier_texture.safetensors", "unet.safetensors"]
    assert all((DEFAULT_MODEL_DIR / name.replace(".safetensors", ".json")).is_file() for name in weights)
    assert sum(p.stat().st_size for p in DEFAULT_MODEL_DIR.iterdir()) < 25e6
    assert (DEFAULT_MODEL_DIR / "MODEL_CARD.md").is_file()
    assert json.loads((DEFAULT_MODEL_DIR / "autoencoder.json").read_text())["recipe"] == "phantom-128"


def test_default_pipeline_generates_a_128_px_slice():
    pipe = LSDMPipeline.from_pretrained("default", device="cpu")
    ct = ChestPhantom(PhantomConfig(size=128, nodule_free_fraction=0.0)).slice(3, seed=5)
    semantic = semantic_map_from_hu(ct.hu, ct.nodule_mask, [n["malignancy"] for n in ct.nodules], ct.spacing_mm)
    image = pipe.generate(semantic, {"malignancy": 5}, spacing_mm=ct.spacing_mm, steps=3, guidance_scale=1.0, seed=0)
    assert image.shape == (1, 128, 128) and np.isfinite(image).all()
    assert -1.0 <= image.min() and image.max() <= 1.0


def test_nodule_synth_with_no_arguments_uses_the_default_model():
    ct = ChestPhantom(PhantomConfig(size=128, nodule_free_fraction=1.0)).slice(2, seed=1)
    affine = torch.diag(torch.tensor([ct.spacing_mm, ct.spacing_mm, 1.0, 1.0]))
    image = MetaTensor(torch.from_numpy(ct.hu)[None], affine=affine)
    label = MetaTensor(torch.zeros(1, 128, 128), affine=affine)
    synth = NoduleSynth().set_random_state(0)
    synth.synthesis.steps = 3  # keep the test short; the default is 25
    out, out_label = synth(image, label)
    assert (out_label > 0).any()
    changed = (out != image)[0]
    assert changed.any() and changed.sum() < 0.1 * changed.numel()
