"""Shared fixtures: one tiny phantom dataset and one set of smoke-trained models per test session.

Both are built once per run (under pytest-xdist the workers share them through a file lock) and are
read-only for the tests: a test that trains further or corrupts a file works on a copy
(:func:`copy_models`).
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from filelock import FileLock

# One intra-op thread: the models are tiny, and on a 2-core machine that is busy with pytest-xdist or a
# training job, two spinning OpenMP threads per process make a 5-step sample 200x slower (10 s, not 0.05 s).
torch.set_num_threads(1)

PHANTOM_COUNT = 24
PHANTOM_SIZE = 64


def _shared(tmp_path_factory: pytest.TempPathFactory, name: str, build: Callable[[Path], None]) -> Path:
    """``build(folder)`` once per run, shared by every xdist worker; the folder is never rebuilt half-way."""
    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent  # the run's folder, common to all workers
    folder, done = root / name, root / f"{name}.done"
    with FileLock(str(root / f"{name}.lock")):
        if not done.exists():
            shutil.rmtree(folder, ignore_errors=True)
            build(folder)
            done.touch()
    return folder


@pytest.fixture(scope="session")
def phantom_dataset(tmp_path_factory) -> Path:
    """A prepared phantom dataset: 24 slices of 64 px, 2 per patient, a fifth without nodules."""
    from lsdm_aug.data.phantom import PhantomConfig, prepare_phantom

    def build(folder: Path) -> None:
        prepare_phantom(folder, count=PHANTOM_COUNT,
                        config=PhantomConfig(size=PHANTOM_SIZE, slices_per_patient=2, nodule_free_fraction=0.2), seed=0)

    return _shared(tmp_path_factory, "phantom-64", build)


@pytest.fixture(scope="session")
def smoke_recipe():
    from lsdm_aug.config import load_recipe

    return load_recipe("phantom-smoke")


@pytest.fixture(scope="session")
def smoke_models(tmp_path_factory, phantom_dataset, smoke_recipe) -> Path:
    """Autoencoder, U-Net and the four classifiers trained with the phantom-smoke recipe (read-only)."""
    from lsdm_aug.training.autoencoder import train_autoencoder
    from lsdm_aug.training.classifiers import train_classifiers
    from lsdm_aug.training.diffusion import train_diffusion

    def build(folder: Path) -> None:
        train_autoencoder(smoke_recipe, phantom_dataset, folder, device="cpu", progress=False)
        train_diffusion(smoke_recipe, phantom_dataset, folder, device="cpu", progress=False)
        train_classifiers(smoke_recipe, phantom_dataset, folder, device="cpu", progress=False)

    return _shared(tmp_path_factory, "smoke-models", build)


@pytest.fixture
def copy_models(smoke_models, tmp_path) -> Callable[[], Path]:
    """A private, writable copy of the smoke models (for tests that resume training or damage files)."""

    def copy() -> Path:
        target = tmp_path / "models"
        shutil.copytree(smoke_models, target)
        return target

    return copy


@pytest.fixture(scope="session")
def smoke_bank(tmp_path_factory, smoke_models) -> Path:
    """A nodule bank of 10 nodules (malignancy balanced over 1..5) from the smoke models, 64 px phantom slices."""
    from lsdm_aug.synthesis import SynthesisRequest, build_bank

    def build(folder: Path) -> None:
        build_bank(folder, SynthesisRequest(count=10, size=PHANTOM_SIZE, steps=2, model=str(smoke_models)),
                   batch_size=5, shard_size=4)

    return _shared(tmp_path_factory, "smoke-bank", build)
