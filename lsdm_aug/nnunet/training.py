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
from pathlib import Path

import torch

__all__ = ["train", "trainer_class"]


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
          predict: tuple[str, str] | None = None, mirroring: bool = True) -> Path:
    """Train one fold as ``nnUNetv2_train`` would (single process); returns the output folder.

    ``validate=False`` skips nnU-Net's final validation; ``predict=(images folder, output folder)`` then
    predicts those images with the trained network, saving the softmax probabilities (``.npz``) too
    (``mirroring``: nnU-Net's test-time mirroring).
    """
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
    nnunet_trainer.run_training()
    if validate:
        nnunet_trainer.perform_actual_validation(False)
    if predict is not None:
        predict_folder(nnunet_trainer, *predict, mirroring=mirroring)
    return Path(nnunet_trainer.output_folder)


def predict_folder(trainer, images: str | Path, output: str | Path, mirroring: bool = True) -> None:
    """Predict every image of ``images`` with a trained nnU-Net trainer's network (probabilities saved)."""
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    predictor = nnUNetPredictor(tile_step_size=0.5, use_gaussian=True, use_mirroring=mirroring,
                                perform_everything_on_device=True, device=trainer.device, verbose=False,
                                verbose_preprocessing=False, allow_tqdm=False)
    trainer.set_deep_supervision_enabled(False)  # one output, as nnU-Net's own validation does
    network = getattr(trainer.network, "_orig_mod", trainer.network)  # torch.compile wraps it
    network.eval()
    predictor.manual_initialization(network, trainer.plans_manager, trainer.configuration_manager,
                                    [copy.deepcopy(network.state_dict())],
                                    trainer.dataset_json, trainer.__class__.__name__,
                                    trainer.inference_allowed_mirroring_axes)
    Path(output).mkdir(parents=True, exist_ok=True)
    predictor.predict_from_files(str(images), str(output), save_probabilities=True, overwrite=True,
                                 num_processes_preprocessing=1, num_processes_segmentation_export=1)


def _main(job_json: str) -> None:
    """``python -m lsdm_aug.nnunet.training '{"dataset": ..., "configuration": ..., "test": ..., "predictions": ...}'``:
    train on fold "all" without validation and predict a folder (what ``lsdm-aug benchmark detection`` runs)."""
    job = json.loads(job_json)
    train(job["dataset"], job["configuration"], "all", job.get("trainer", "nnUNetTrainerNoduleSynth"),
          device=job.get("device", "cpu"), validate=False, predict=(job["test"], job["predictions"]),
          mirroring=job.get("mirroring", True))


if __name__ == "__main__":
    import sys

    _main(sys.argv[1])
