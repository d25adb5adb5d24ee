"""Run nnU-Net v2 training with a trainer class given directly, using nnU-Net's own pieces.

``nnUNetv2_train -tr NAME`` finds an external trainer by importing every module of nnU-Net's own
trainer folder first; in an environment whose torchvision does not import (the PyPI torchvision
wheels are CUDA builds and fail beside a CPU-only torch: "operator torchvision::nms does not exist"),
that walk stops at nnU-Net's Primus trainers (via timm). :func:`train` does what ``nnUNetv2_train``
does for one process — load the plans, build the trainer, resume, train, validate — without the walk.
Where torchvision works, ``nnUNet_extTrainer`` + ``nnUNetv2_train`` is the same.

Example:
    >>> train("Dataset501_Nodules", "2d", 0, device="cpu")  # doctest: +SKIP
"""

from __future__ import annotations

import copy
import json
import time
from pathlib import Path

import numpy as np
import torch

from lsdm_aug.lifetime import exit_with_parent

__all__ = ["train", "trainer_class", "profile_iterations"]


def trainer_class(name: str = "nnUNetTrainerNoduleSynth"):
    """Our trainer variants by name, or nnU-Net's base trainer."""
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

    from lsdm_aug.nnunet.trainers.nnUNetTrainerNoduleSynth import nnUNetTrainerNoduleSynth

    known = {"nnUNetTrainer": nnUNetTrainer, "nnUNetTrainerNoduleSynth": nnUNetTrainerNoduleSynth}
    if name not in known:
        raise ValueError(f"trainer must be one of {sorted(known)}, got {name!r}")
    return known[name]


def train(dataset: str | int, configuration: str, fold: int | str, trainer: str = "nnUNetTrainerNoduleSynth",
          plans: str = "nnUNetPlans", device: str = "cpu", continue_training: bool = False, validate: bool = True,
          predict: tuple[str, str] | None = None, mirroring: bool = True, tile_step_size: float = 0.5) -> Path:
    """Train one fold as ``nnUNetv2_train`` would (single process); returns the output folder.

    ``validate=False`` skips nnU-Net's final validation; ``predict=(images folder, output folder)`` then
    predicts those images with the trained network, saving the softmax probabilities (``.npz``) too
    (``mirroring``: nnU-Net's test-time mirroring; ``tile_step_size``: its sliding-window step, a fraction of the
    patch).
    """
    nnunet_trainer = build_trainer(dataset, configuration, fold, trainer, plans, device, continue_training)
    nnunet_trainer.run_training()
    if validate:
        nnunet_trainer.perform_actual_validation(False)
    if predict is not None:
        predict_folder(nnunet_trainer, *predict, mirroring=mirroring, tile_step_size=tile_step_size)
    return Path(nnunet_trainer.output_folder)


def build_trainer(dataset: str | int, configuration: str, fold: int | str,
                  trainer: str = "nnUNetTrainerNoduleSynth", plans: str = "nnUNetPlans", device: str = "cpu",
                  continue_training: bool = False):
    """The nnU-Net trainer ``nnUNetv2_train`` would build for one fold (checkpoint loaded when continuing)."""
    from nnunetv2.paths import nnUNet_preprocessed
    from nnunetv2.run.run_training import maybe_load_checkpoint
    from nnunetv2.utilities.dataset_name_id_conversion import maybe_convert_to_dataset_name

    if nnUNet_preprocessed is None:
        raise ValueError("nnUNet_preprocessed is not set: export nnUNet_raw, nnUNet_preprocessed and nnUNet_results")
    name = maybe_convert_to_dataset_name(int(dataset) if str(dataset).isdigit() else dataset)
    folder = Path(nnUNet_preprocessed) / name
    plans_file = folder / f"{plans}.json"
    if not plans_file.is_file():
        raise FileNotFoundError(f"no plans {str(plans_file)!r}: run nnUNetv2_plan_and_preprocess -d {dataset} first")
    plans_dict = json.loads(plans_file.read_text())
    plans_dict["continue_training"] = continue_training
    dataset_json = json.loads((folder / "dataset.json").read_text())
    fold = fold if fold == "all" else int(fold)
    nnunet_trainer = trainer_class(trainer)(plans=plans_dict, configuration=configuration, fold=fold,
                                            dataset_json=dataset_json, device=torch.device(device))
    maybe_load_checkpoint(nnunet_trainer, continue_training, False, None)
    return nnunet_trainer


class _TimedTransform:
    """One of nnU-Net's training transforms, its seconds added to ``seconds[name]`` at every call."""

    def __init__(self, transform, seconds: dict[str, float]) -> None:
        self.transform, self.seconds = transform, seconds
        self.name = type(transform).__name__
        seconds.setdefault(self.name, 0.0)

    def __call__(self, **data):
        started = time.perf_counter()
        out = self.transform(**data)
        self.seconds[self.name] += time.perf_counter() - started
        return out


def profile_iterations(dataset: str | int, configuration: str, iterations: int = 20,
                       trainer: str = "nnUNetTrainerNoduleSynth", device: str = "cpu") -> dict[str, object]:
    """Where a training iteration's time goes, in one process: nnU-Net's batch loading (reading and cropping
    the preprocessed cases), each of its training transforms, and the network step (forward, loss, backward,
    optimizer). Seconds per iteration, after two warm-up iterations; run with ``nnUNet_n_proc_DA=0`` so the
    loading happens in this process (with background workers it overlaps the network step).

    Example:
        >>> profile_iterations("Dataset900_real", "2d_cpu", 10)["network_s"]  # doctest: +SKIP
        0.21
    """
    if iterations < 1:
        raise ValueError(f"iterations must be >= 1, got {iterations}")
    nnunet_trainer = build_trainer(dataset, configuration, "all", trainer, device=device)
    nnunet_trainer.on_train_start()
    try:
        loader = getattr(nnunet_trainer.dataloader_train, "data_loader", None)
        if loader is None or not hasattr(loader, "transforms"):
            raise RuntimeError("profile with nnUNet_n_proc_DA=0: the batches must be made in this process")
        seconds: dict[str, float] = {}
        nnunet_trainer.network.train()
        for _ in range(2):
            nnunet_trainer.train_step(next(nnunet_trainer.dataloader_train))
        compose = loader.transforms
        compose.transforms = [_TimedTransform(t, seconds) for t in compose.transforms]
        batch_s = network_s = 0.0
        for _ in range(iterations):
            started = time.perf_counter()
            batch = next(nnunet_trainer.dataloader_train)
            loaded = time.perf_counter()
            nnunet_trainer.train_step(batch)
            batch_s, network_s = batch_s + loaded - started, network_s + time.perf_counter() - loaded
    finally:
        for generator in (nnunet_trainer.dataloader_train, nnunet_trainer.dataloader_val):
            if hasattr(generator, "_finish"):
                generator._finish()
    transforms_s = {name: value / iterations for name, value in seconds.items()}
    return {"iterations": iterations, "batch_size": int(nnunet_trainer.batch_size),
            "patch_size": [int(v) for v in nnunet_trainer.configuration_manager.patch_size],
            "torch_threads": torch.get_num_threads(), "batch_s": batch_s / iterations,
            "loading_s": batch_s / iterations - sum(transforms_s.values()), "transforms_s": transforms_s,
            "network_s": network_s / iterations, "iteration_s": (batch_s + network_s) / iterations}


def predict_folder(trainer, images: str | Path, output: str | Path, mirroring: bool = True,
                   tile_step_size: float = 0.5, tile_size: int | None = None) -> None:
    """Predict every image of ``images`` with a trained nnU-Net trainer's network (probabilities saved).

    ``tile_size``: the sliding window's square tile in px (None: the training patch, nnU-Net's own). The network
    is fully convolutional; a tile larger than its patch gives each prediction more context and keeps a lesion
    farther from the tile borders. It must be a multiple of the network's total downsampling and at least the
    patch."""
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    configuration = trainer.configuration_manager
    if tile_size is not None:
        configuration = copy.deepcopy(configuration)
        configuration.configuration["patch_size"] = checked_tile(tile_size, configuration)

    predictor = nnUNetPredictor(tile_step_size=tile_step_size, use_gaussian=True, use_mirroring=mirroring,
                                perform_everything_on_device=True, device=trainer.device, verbose=False,
                                verbose_preprocessing=False, allow_tqdm=False)
    trainer.set_deep_supervision_enabled(False)  # one output, as nnU-Net's own validation does
    network = getattr(trainer.network, "_orig_mod", trainer.network)  # torch.compile wraps it
    network.eval()
    predictor.manual_initialization(network, trainer.plans_manager, configuration,
                                    [copy.deepcopy(network.state_dict())],
                                    trainer.dataset_json, trainer.__class__.__name__,
                                    trainer.inference_allowed_mirroring_axes)
    Path(output).mkdir(parents=True, exist_ok=True)
    predictor.predict_from_files(str(images), str(output), save_probabilities=True, overwrite=True,
                                 num_processes_preprocessing=1, num_processes_segmentation_export=1)


def checked_tile(tile_size: int, configuration) -> list[int]:
    """The square tile ``[tile_size] * dims`` for a configuration, or an error naming what is allowed.

    Example:
        >>> from types import SimpleNamespace
        >>> plan = SimpleNamespace(patch_size=[96, 96], network_arch_init_kwargs={"strides": [[1, 1]] + [[2, 2]] * 4})
        >>> checked_tile(192, plan)
        [192, 192]
    """
    patch = list(configuration.patch_size)
    step = int(np.prod([max(s) if isinstance(s, (list, tuple)) else s
                        for s in configuration.network_arch_init_kwargs["strides"]]))
    if isinstance(tile_size, bool) or not isinstance(tile_size, int) or tile_size < max(patch) or tile_size % step:
        raise ValueError(f"tile_size must be an int >= the patch ({max(patch)} px) and a multiple of the network's "
                         f"downsampling ({step} px), got {tile_size!r}")
    return [tile_size] * len(patch)


def _main(job_json: str) -> None:
    """``python -m lsdm_aug.nnunet.training '{"dataset": ..., "configuration": ..., "test": ..., "predictions": ...}'``:
    train on fold "all" without validation and predict a folder (what ``lsdm-aug benchmark detection`` runs),
    writing the minutes of each into ``timing.json`` there; ``"train": false`` predicts with the trained run's
    final checkpoint; ``"tile_size"``: see :func:`predict_folder`. With ``"profile": {"iterations": N, "out": path}``:
    write :func:`profile_iterations` to ``path`` instead."""
    exit_with_parent()  # a benchmark killed by a signal takes its nnU-Net runs with it
    job = json.loads(job_json)
    if "profile" in job:
        figures = profile_iterations(job["dataset"], job["configuration"], int(job["profile"]["iterations"]),
                                     job.get("trainer", "nnUNetTrainerNoduleSynth"), job.get("device", "cpu"))
        Path(job["profile"]["out"]).write_text(json.dumps(figures, indent=1))
        return
    started = time.perf_counter()
    train = job.get("train", True)  # False: the run's network is trained; predict with its final checkpoint
    nnunet_trainer = build_trainer(job["dataset"], job["configuration"], "all",
                                   job.get("trainer", "nnUNetTrainerNoduleSynth"), device=job.get("device", "cpu"),
                                   continue_training=not train)
    if train:
        nnunet_trainer.run_training()
    trained = time.perf_counter()
    predict_folder(nnunet_trainer, job["test"], job["predictions"], mirroring=job.get("mirroring", True),
                   tile_step_size=job.get("tile_step_size", 0.5), tile_size=job.get("tile_size"))
    timing = {"train_minutes": (trained - started) / 60 if train else None,
              "predict_minutes": (time.perf_counter() - trained) / 60}
    (Path(job["predictions"]) / "timing.json").write_text(json.dumps(timing))


if __name__ == "__main__":
    import sys

    _main(sys.argv[1])
