"""nnU-Net v2 integration: the trainer variant that synthesizes nodules on the fly.

nnU-Net finds ``nnUNetTrainerNoduleSynth`` through its ``nnUNet_extTrainer`` path variable (nnU-Net
>= 2.8.0), so nothing is copied into nnunetv2:

    export nnUNet_extTrainer=$(python -c "import lsdm_aug.nnunet as n; print(n.TRAINER_PATH)")
    nnUNetv2_train 501 2d 0 -tr nnUNetTrainerNoduleSynth

Settings come from the ``LSDM_AUG_NNUNET`` environment variable (JSON): NoduleSynth arguments
(``prob``, ``malignancy``, ``model``, ``steps``, ...), the trainer's ``num_epochs``,
``num_iterations_per_epoch`` and ``num_val_iterations_per_epoch``, and a ``seed``.

Plan and preprocess with :func:`lsdm_aug.nnunet.plans.plan_and_preprocess` (``lsdm-aug nnunet plan``):
nnU-Net's own CT window for a nodule dataset flattens the lung (see :mod:`lsdm_aug.nnunet.plans`).
"""

from pathlib import Path

TRAINER_PATH = str(Path(__file__).resolve().parent / "trainers")

__all__ = ["TRAINER_PATH"]
