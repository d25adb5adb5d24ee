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
    assert json.loads((DEFAULT_MODEL_DIR / "autoencoder.json").read_text())["recipe"] == "phantom-512"


def test_the_default_is_the_native_resolution_feature_conditioned_model():
    pipe = LSDMPipeline.from_pretrained("default", device="cpu")
    assert pipe.recipe.image_size == 512 and pipe.feature_conditioned
    assert 0.6 < pipe.spacing_mm < 0.8 and pipe.serves_spacing_mm == (0.4, 3.0)
    assert pipe.window_px == 96  # its measured edit window (unet.json): a local edit is at least 24 x 24 latents


def test_default_pipeline_generates_a_512_px_slice_at_lidc_spacing():
    pipe = LSDMPipeline.from_pretrained("default", device="cpu")
    ct = ChestPhantom(PhantomConfig(size=512, nodule_free_fraction=0.0)).slice(3, seed=5)
    semantic = semantic_map_from_hu(ct.hu, ct.nodule_mask, [n["malignancy"] for n in ct.nodules], ct.spacing_mm)
    image = pipe.generate(semantic, {"malignancy": 5}, spacing_mm=ct.spacing_mm, steps=2, guidance_scale=0.0, seed=0)
    assert image.shape == (1, 512, 512) and np.isfinite(image).all()
    assert -1.0 <= image.min() and image.max() <= 1.0


def test_nodule_synth_with_no_arguments_uses_the_default_model_at_the_image_spacing():
    for size in (512, 128):  # native LIDC spacing, and 2.8 mm through the resampling edit path
        ct = ChestPhantom(PhantomConfig(size=size, nodule_free_fraction=1.0)).slice(2, seed=1)
        affine = torch.diag(torch.tensor([ct.spacing_mm, ct.spacing_mm, 1.0, 1.0]))
        image = MetaTensor(torch.from_numpy(ct.hu)[None], affine=affine)
        label = MetaTensor(torch.zeros(1, size, size), affine=affine)
        synth = NoduleSynth().set_random_state(0)
        synth.synthesis.steps = 2  # keep the test short; the default is 25
        out, out_label = synth(image, label)
        assert (out_label > 0).any()
        changed = (out != image)[0]
        assert changed.any() and changed.sum() < 0.1 * changed.numel()
