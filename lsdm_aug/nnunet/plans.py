"""nnU-Net plans for CT slices where nodules are inserted: the CT normalization window.

nnU-Net's ``CTNormalization`` clips every image to the 0.5 and 99.5 percentiles of the *foreground*
(labelled) voxels, then z-scores with their mean and std. For a nodule dataset the foreground is the
nodules alone, so the lower clip sits near the nodules' own density (on the 128 px phantom: -49 HU) and
the whole lung (about -900 to -500 HU) becomes one flat value. The network then never sees lung, and
NoduleSynth, which places nodules in lung tissue, finds none. :func:`widen_ct_window` sets the clip
window of the plans (before preprocessing) to the LSDM's HU window, keeping nnU-Net's mean and std;
:func:`plan_and_preprocess` runs nnU-Net's planning, widens the window and preprocesses
(``lsdm-aug nnunet plan``); :func:`check_lung_window` is the trainer's guard against a window that hides
the lung.

Example:
    >>> plans = {"foreground_intensity_properties_per_channel": {"0": {
    ...     "mean": 40.0, "std": 120.0, "percentile_00_5": -49.0, "percentile_99_5": 796.0}}}
    >>> widen_ct_window(plans)["foreground_intensity_properties_per_channel"]["0"]["percentile_00_5"]
    -1024.0
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

from lsdm_aug.data.prepared import HU_RANGE, atomic_write_text

__all__ = ["LUNG_VISIBLE_HU", "check_lung_window", "plan_and_preprocess", "widen_ct_window"]

LUNG_VISIBLE_HU = -400.0  # the semantic map's lung / body boundary: a lower clip above it erases the lung


def widen_ct_window(plans: Mapping, low: float = HU_RANGE[0], high: float = HU_RANGE[1]) -> dict:
    """A copy of ``plans`` whose CT clip window is [``low``, ``high``] HU for every channel (mean and std kept)."""
    if not low < high:
        raise ValueError(f"the CT window needs low < high, got low={low!r} and high={high!r}")
    widened = copy.deepcopy(dict(plans))
    properties = widened.get("foreground_intensity_properties_per_channel")
    if not properties:
        raise ValueError("plans have no foreground_intensity_properties_per_channel: run nnU-Net's planning first")
    for channel in properties.values():
        channel["percentile_00_5"], channel["percentile_99_5"] = float(low), float(high)
    return widened


def check_lung_window(properties: Mapping[str, float]) -> None:
    """Raise when a channel's CT clip window (nnU-Net's ``foreground_intensity_properties_per_channel``
    entry) hides the lung, where NoduleSynth would place its nodules."""
    low = float(properties["percentile_00_5"])
    if low > LUNG_VISIBLE_HU:
        raise ValueError(
            f"nnU-Net clips this dataset's CT at {low:g} HU (the 0.5 percentile of its labelled voxels), above "
            f"{LUNG_VISIBLE_HU:g} HU: the lung becomes one flat value and NoduleSynth finds no lung to insert "
            "into. Widen the window before preprocessing: plans = lsdm_aug.nnunet.plans.widen_ct_window(plans), "
            "save them, then nnUNetv2_preprocess (lsdm-aug benchmark detection does this with ct_window).")


def plan_and_preprocess(dataset_id: int, configurations: Sequence[str] = ("2d",),
                        ct_window: tuple[float, float] | None = HU_RANGE, num_processes: int = 1,
                        env: Mapping[str, str] | None = None) -> Path:
    """nnU-Net's ``nnUNetv2_plan_and_preprocess`` with the CT window of :func:`widen_ct_window` set between
    planning and preprocessing (``ct_window=None``: nnU-Net's own). Runs nnU-Net in subprocesses with ``env``
    (default: this process's, which must set ``nnUNet_raw`` and ``nnUNet_preprocessed``); returns the plans file.
    Planning is skipped when the plans file exists, so a rerun after an interrupted preprocessing redoes only that.

    Example:
        >>> plan_and_preprocess(501)  # doctest: +SKIP
    """
    env = dict(os.environ if env is None else env)
    if not env.get("nnUNet_raw") or not env.get("nnUNet_preprocessed"):
        raise ValueError("nnUNet_raw and nnUNet_preprocessed must be set to plan and preprocess a dataset")
    if env.get("nnUNet_n_proc_DA") == "0":  # training's single-process loading; nnU-Net's planner sets its
        env["nnUNet_n_proc_DA"] = "1"         # torch threads from it and fails on 0
    name = _dataset_name(int(dataset_id), Path(env["nnUNet_raw"]))
    plans_file = Path(env["nnUNet_preprocessed"]) / name / "nnUNetPlans.json"
    entry = "from nnunetv2.experiment_planning.plan_and_preprocess_entrypoints import {0}; {0}()"
    arguments = ["-d", str(int(dataset_id)), "-c", *configurations, "-np", *[str(num_processes)] * len(configurations)]
    if not plans_file.is_file():
        _run([sys.executable, "-c", entry.format("plan_and_preprocess_entry"), *arguments, "--no_pp"], env)
    if ct_window is not None:
        plans = widen_ct_window(json.loads(plans_file.read_text()), *ct_window)
        atomic_write_text(plans_file, json.dumps(plans, indent=1))
    _run([sys.executable, "-c", entry.format("preprocess_entry"), *arguments], env)
    return plans_file


def _dataset_name(dataset_id: int, raw: Path) -> str:
    names = sorted(p.name for p in raw.glob(f"Dataset{dataset_id:03d}_*") if p.is_dir())
    if not names:
        raise FileNotFoundError(f"no Dataset{dataset_id:03d}_* folder in nnUNet_raw={str(raw)!r}")
    return names[0]


def _run(command: list[str], env: dict[str, str]) -> None:
    result = subprocess.run(command, env=env, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"nnU-Net failed ({' '.join(command[3:])}):\n{result.stdout[-2000:]}{result.stderr[-2000:]}")
