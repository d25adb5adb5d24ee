"""``lsdm-aug benchmark detection``: does synthetic data help nnU-Net find nodules when real data are scarce,
and more than copy-paste would?

A scarce real training set (a few phantom patients at native resolution, 512 px at their LIDC pixel spacing)
and a held-out real test set, split patient-wise. Arms, each trained with the same nnU-Net budget for every
seed (seeds pair the arms):

* ``real``: the real slices only;
* ``real+synthetic``: plus ``synthetic_count`` cases from ``synthesize`` (malignancy balanced) on the real
  training slices as backgrounds;
* ``real+synthetic-unguided``: the same with no guidance at all (s = 0, w = 0): what control is worth;
* ``real+on-the-fly``: the real slices, with ``nnUNetTrainerNoduleSynth`` inserting nodules into the training
  patches (``on_the_fly`` settings, e.g. ``prob``, ``steps``, or ``bank: build`` with ``bank_count``: LSDM
  nodules generated once into ``<work>/bank`` and placed on the fly);
* ``real+copy-paste``: plus ``synthetic_count`` cases made by pasting real training nodules, pixels as they
  are, into other real training slices' lungs (the naive baseline).

nnU-Net 2D runs on a reduced plan: a configuration ``2d_cpu`` added to the plans file that inherits nnU-Net's
``2d`` (same preprocessed data) with the recipe's ``patch_size`` (stages as nnU-Net's planner gives that
patch), ``features_per_stage`` and ``batch_size``, and the trainer's epoch budget from the recipe; nnU-Net's
own sliding-window predictor scores whole test slices. Each (arm, seed) runs in its own process (nnU-Net reads
its folders at import), ``workers`` at a time; a finished one is skipped on rerun. Before training, one
process profiles where an iteration's time goes (loading, each augmentation transform, the network).

Detection is measured at lesion level from the predicted foreground probabilities
(:mod:`lsdm_aug.metrics.detection`): candidates are the ``candidates_per_slice`` highest probability peaks
of each slice (0: connected components above ``threshold``); FROC and CPM at the LUNA16 rates (false
positives per slice), sensitivity per malignancy level at ``threshold`` and at the FROC operating point of
``operating_fps``, false positives per slice at ``threshold``, and Dice; paired CPM differences against real
only and against copy-paste with a patient bootstrap 95 % interval (:mod:`.scoring`). Then
:mod:`.diagnosis` measures each arm's added nodules against the held-out real ones (appearance classifier
AUC, size, pleura distance, vessel contact), so that the report can say why LSDM did or did not beat copy-paste.

Example:
    >>> recipe = load_detection_recipe("bench-detection-phantom")
    >>> recipe.image_size, len(recipe.seeds) >= 5
    (512, True)
    >>> report = run_detection(recipe, "work/detection", "reports/detection")  # doctest: +SKIP
"""

from lsdm_aug.benchmarks.detection.benchmark import run_detection, train_arms
from lsdm_aug.benchmarks.detection.compare import compare_work_folders
from lsdm_aug.benchmarks.detection.data import copy_paste_cases, dataset_name
from lsdm_aug.benchmarks.detection.recipe import ARMS, DetectionRecipe, load_detection_recipe
from lsdm_aug.benchmarks.detection.report import detection_markdown
from lsdm_aug.benchmarks.detection.runs import CONFIGURATION, reduced_configuration, trainer_settings
from lsdm_aug.benchmarks.detection.scoring import evaluate, paired_difference

__all__ = ["ARMS", "CONFIGURATION", "DetectionRecipe", "load_detection_recipe", "run_detection", "train_arms",
           "copy_paste_cases", "dataset_name", "detection_markdown", "reduced_configuration", "trainer_settings",
           "evaluate", "paired_difference", "compare_work_folders"]
