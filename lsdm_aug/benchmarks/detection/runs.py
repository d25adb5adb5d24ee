"""The detection benchmark's nnU-Net runs: planning and preprocessing each arm's dataset, the reduced 2D
configuration ``2d_cpu`` written into nnU-Net's plans, one process per (arm, seed) that trains and predicts the
test set (``workers`` at a time), and the profile of where an iteration's time goes.

Example:
    >>> configuration_2d = {"patch_size": [512, 512], "architecture": {"arch_kwargs": {"n_stages": 8,
    ...     "features_per_stage": [32] * 8, "strides": [[1, 1]] + [[2, 2]] * 7, "kernel_sizes": [[3, 3]] * 8,
    ...     "n_conv_per_stage": [2] * 8, "n_conv_per_stage_decoder": [2] * 7}}}
    >>> reduced = reduced_configuration(configuration_2d, DetectionRecipe(patch_size=(128, 128)))
    >>> reduced["patch_size"], reduced["architecture"]["arch_kwargs"]["n_stages"]
    ([128, 128], 6)
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from lsdm_aug.benchmarks.detection.data import dataset_name
from lsdm_aug.benchmarks.detection.recipe import DetectionRecipe
from lsdm_aug.data.prepared import atomic_write_text
from lsdm_aug.nnunet.plans import plan_and_preprocess

__all__ = ["CONFIGURATION", "preprocess", "reduced_configuration", "write_reduced_configuration",
           "trainer_settings", "train_and_predict_all", "run_minutes", "profile", "MIN_FEATURE_MAP"]

CONFIGURATION = "2d_cpu"
MIN_FEATURE_MAP = 4  # nnU-Net's planner stops downsampling at a feature map of 4 px


def environment(work: Path, seed: int, threads: int | None = None) -> dict[str, str]:
    """nnU-Net's folders for one seed (its results apart), no compilation; ``threads`` caps torch's threads, and
    with one thread per run nnU-Net makes its batches in the run's own process (``nnUNet_n_proc_DA=0``: no
    background augmenter competing for the core)."""
    env = {**os.environ, "nnUNet_raw": str(work / "raw"), "nnUNet_preprocessed": str(work / "preprocessed"),
           "nnUNet_results": str(work / "results" / f"seed{seed}"), "nnUNet_n_proc_DA": "1",
           "nnUNet_compile": "false"}
    if threads is not None:
        env |= {"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
                "nnUNet_n_proc_DA": "0" if threads == 1 else "1"}
    return env


def preprocess(work: Path, dataset: str, ct_window: tuple[float, float] | None) -> dict:
    """nnU-Net's planning and 2D preprocessing of ``dataset`` (once), the plans' CT window widened to
    ``ct_window`` in between (see :mod:`lsdm_aug.nnunet.plans`); returns its plans."""
    folder = work / "preprocessed" / dataset
    if not (folder / "preprocessed.json").is_file():
        plan_and_preprocess(int(dataset.split("_")[0].removeprefix("Dataset")), ("2d",), ct_window,
                            env=environment(work, 0))
        atomic_write_text(folder / "preprocessed.json", json.dumps({"ct_window": ct_window}))
    return json.loads((folder / "nnUNetPlans.json").read_text())


def write_reduced_configuration(recipe: DetectionRecipe, work: Path, dataset: str, plans: dict) -> None:
    """The reduced configuration ``2d_cpu`` added to ``dataset``'s plans file."""
    plans["configurations"][CONFIGURATION] = reduced_configuration(plans["configurations"]["2d"], recipe)
    atomic_write_text(work / "preprocessed" / dataset / "nnUNetPlans.json", json.dumps(plans, indent=1))


def reduced_configuration(configuration_2d: dict, recipe: DetectionRecipe) -> dict:
    """The ``2d_cpu`` configuration: inherits nnU-Net's ``2d`` (same preprocessed data); a smaller patch with
    the stages nnU-Net's planner would give it (downsampling until ``MIN_FEATURE_MAP`` px), fewer features per
    stage, another batch size."""
    reduced: dict[str, Any] = {"inherits_from": "2d"}
    if recipe.batch_size is not None:
        reduced["batch_size"] = int(recipe.batch_size)
    architecture = copy.deepcopy(configuration_2d["architecture"])
    kwargs = architecture["arch_kwargs"]
    changed = False
    if recipe.patch_size is not None:
        patch = [int(p) for p in recipe.patch_size]
        reduced["patch_size"] = patch
        stages = 1
        while stages < int(kwargs["n_stages"]) and min(patch) // 2 ** stages >= MIN_FEATURE_MAP:
            stages += 1
        for key in ("features_per_stage", "kernel_sizes", "strides", "n_conv_per_stage"):
            kwargs[key] = list(kwargs[key])[:stages]
        kwargs["n_conv_per_stage_decoder"] = list(kwargs["n_conv_per_stage_decoder"])[:stages - 1]
        kwargs["n_stages"] = stages
        changed = True
    if recipe.features_per_stage is not None:
        stages = int(kwargs["n_stages"])
        features = list(recipe.features_per_stage)[:stages]
        kwargs["features_per_stage"] = features + [features[-1]] * (stages - len(features))
        changed = True
    if changed:
        reduced["architecture"] = architecture
    return reduced


def trainer_settings(recipe: DetectionRecipe, arm: str, seed: int, work: Path) -> dict[str, Any]:
    """``LSDM_AUG_NNUNET`` of one (arm, seed): the budget and seed; NoduleSynth settings for the on-the-fly arm."""
    settings = {"num_epochs": recipe.num_epochs, "num_iterations_per_epoch": recipe.iterations_per_epoch,
                "num_val_iterations_per_epoch": recipe.val_iterations_per_epoch, "seed": seed, "prob": 0.0,
                "progress_plot_every": recipe.progress_plot_every}
    if recipe.oversample_foreground is not None:
        settings["oversample_foreground_percent"] = recipe.oversample_foreground
    settings["optimizer"] = recipe.optimizer
    if recipe.initial_lr is not None:
        settings["initial_lr"] = recipe.initial_lr
    if recipe.p_scaling is not None:
        settings["p_scaling"] = recipe.p_scaling
    if recipe.scaling is not None:
        settings["scaling"] = list(recipe.scaling)
    if recipe.random_crop:
        settings["random_crop"] = True
    if arm == "real+on-the-fly":
        on_the_fly = {k: v for k, v in recipe.on_the_fly.items() if k != "bank_count"}
        if on_the_fly.get("bank") == "build":  # the bank that ensure_bank builds in the work folder
            on_the_fly["bank"] = str(work / "bank")
        settings.update({"model": recipe.model, "appearance_from_outline": recipe.appearance_from_outline,
                         **on_the_fly})
        if recipe.neighbour_slices:
            settings["slice_thickness_mm"] = recipe.slice_thickness_mm  # the channels are neighbouring slices
    return settings


def predictions_folder(work: Path, arm: str, seed: int) -> Path:
    return work / "predictions" / arm.replace("+", "_") / f"seed{seed}"


PREDICTION_KEYS = ("mirroring", "tile_step_size", "tile_size")  # a change re-predicts a trained run


def _train_and_predict(recipe: DetectionRecipe, work: Path, arm: str, seed: int, threads: int) -> Path:
    """Train one (arm, seed) in its own process and predict the test set; skipped when done with the recipe's
    prediction settings. A run whose network is trained (its final checkpoint there) is only predicted: after
    an interruption between the two, or when the prediction settings changed."""
    predictions = predictions_folder(work, arm, seed)
    done = predictions / "done.json"
    job = {"dataset": dataset_name(recipe, arm), "configuration": CONFIGURATION, "device": recipe.device,
           "test": str(work / "test" / "imagesTr"), "predictions": str(predictions),
           "mirroring": recipe.test_time_mirroring, "tile_step_size": recipe.tile_step_size,
           "tile_size": recipe.tile_size}
    before = json.loads(done.read_text()) if done.is_file() else {}
    if before and all(before.get(key) == job[key] for key in PREDICTION_KEYS):
        return predictions
    results = work / "results" / arm.replace("+", "_") / f"seed{seed}"
    job["train"] = not any(results.glob(f"{job['dataset']}/*/fold_all/checkpoint_final.pth"))
    env = environment(work, seed, threads) | {
        "LSDM_AUG_NNUNET": json.dumps(trainer_settings(recipe, arm, seed, work)), "nnUNet_results": str(results)}
    log = work / "logs" / f"{arm.replace('+', '_')}-seed{seed}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    with log.open("w") as stream:
        result = subprocess.run([sys.executable, "-m", "lsdm_aug.nnunet.training", json.dumps(job)], env=env,
                                stdout=stream, stderr=subprocess.STDOUT)
    if result.returncode != 0:
        raise RuntimeError(f"nnU-Net run {arm} seed {seed} failed (exit {result.returncode}); its log: "
                           f"{log}\n{log.read_text()[-3000:]}")
    timing = json.loads((predictions / "timing.json").read_text())
    minutes = (time.perf_counter() - started) / 60
    if not job["train"]:  # the training's minutes as its first run recorded them (None if never recorded)
        timing["train_minutes"] = before.get("train_minutes")
        minutes = None if timing["train_minutes"] is None else timing["train_minutes"] + timing["predict_minutes"]
    atomic_write_text(done, json.dumps(job | timing | {"minutes": minutes, "threads": threads}))
    return predictions


def train_and_predict_all(recipe: DetectionRecipe, work: Path, runs: list[tuple[str, int]]) -> dict[tuple[str, int], Path]:
    """Every (arm, seed) of ``runs``, ``recipe.workers`` at a time, each with an equal share of the CPU cores."""
    threads = run_threads(recipe)
    with ThreadPoolExecutor(max_workers=recipe.workers) as pool:
        futures = {run: pool.submit(_train_and_predict, recipe, work, *run, threads) for run in runs}
        return {run: future.result() for run, future in futures.items()}


def run_threads(recipe: DetectionRecipe) -> int:
    """Torch threads of one (arm, seed) run: an equal share of the CPU cores among ``recipe.workers`` runs."""
    return max(1, (os.cpu_count() or 1) // recipe.workers)


def run_minutes(predictions: Path) -> dict[str, float | None]:
    """Wall minutes of one (arm, seed) as its ``done.json`` recorded them: in all (process start to end), training,
    and predicting the test set."""
    done = json.loads((predictions / "done.json").read_text())
    return {"minutes": done.get("minutes"), "train_minutes": done.get("train_minutes"),
            "predict_minutes": done.get("predict_minutes")}


def profile(recipe: DetectionRecipe, work: Path, arm: str = "real", iterations: int = 20) -> dict[str, Any]:
    """Where one training iteration's time goes (:func:`lsdm_aug.nnunet.training.profile_iterations`), measured
    once per work folder in a process with the threads a benchmark run gets, batches made in that process."""
    out = work / "profile" / f"{arm.replace('+', '_')}.json"
    if not out.is_file():
        env = environment(work, 0, run_threads(recipe)) | {
            "nnUNet_n_proc_DA": "0", "LSDM_AUG_NNUNET": json.dumps(trainer_settings(recipe, arm, 0, work)),
            "nnUNet_results": str(work / "results" / "profile")}
        out.parent.mkdir(parents=True, exist_ok=True)
        job = {"dataset": dataset_name(recipe, arm), "configuration": CONFIGURATION, "device": recipe.device,
               "profile": {"iterations": iterations, "out": str(out) + ".part"}}
        result = subprocess.run([sys.executable, "-m", "lsdm_aug.nnunet.training", json.dumps(job)], env=env,
                                capture_output=True, text=True)
        if result.returncode != 0:
            raise RuntimeError(f"profiling nnU-Net failed:\n{result.stdout[-2000:]}{result.stderr[-2000:]}")
        Path(str(out) + ".part").replace(out)
    return json.loads(out.read_text())
