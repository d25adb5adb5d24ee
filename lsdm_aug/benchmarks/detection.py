"""``lsdm-aug benchmark detection``: does synthetic data help nnU-Net find nodules when real data are scarce?

A scarce real training set (a few phantom patients, most slices nodule-free) and a held-out real test
set, split patient-wise. Arms, each trained with the same nnU-Net budget for every seed:

* ``real``: the real slices only;
* ``real+synthetic``: plus ``synthetic_count`` cases from ``synthesize`` (malignancy balanced);
* ``real+on-the-fly``: the real slices, with ``nnUNetTrainerNoduleSynth`` inserting nodules in the
  training patches (``on_the_fly`` settings, e.g. ``prob``, ``steps``, or ``bank: build`` with ``bank_count``:
  LSDM nodules generated once into ``<work>/bank`` and placed on the fly);
* ``real+copy-paste``: plus ``synthetic_count`` cases made by pasting real training nodules, pixels
  as they are, into other real training slices' lungs (the naive baseline).

nnU-Net 2D runs on a reduced plan: a configuration ``2d_cpu`` added to the plans file that inherits
nnU-Net's ``2d`` (same preprocessed data, same patch size and stages) with ``features_per_stage`` and
``batch_size`` from the recipe, and the trainer's epoch budget from the recipe. Each (arm, seed) runs in
its own process (nnU-Net reads its folders at import); a finished arm is skipped on rerun.

Detection is measured at lesion level from the predicted foreground probabilities
(:mod:`lsdm_aug.metrics.detection`): candidates are the ``candidates_per_slice`` highest probability peaks
of each slice (0: connected components above ``threshold``), so that the FROC ranks what a short-trained,
under-confident network outputs; FROC and CPM at the LUNA16 rates (false positives per slice),
sensitivity per malignancy level at ``threshold`` and at the FROC operating point of ``operating_fps``,
false positives per slice at ``threshold``, and Dice.

Example:
    >>> report = run_detection(load_detection_recipe("bench-detection-phantom"), "work/detection",
    ...                        "reports/detection")  # doctest: +SKIP
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from lsdm_aug.benchmarks.recipes import load_benchmark_recipe
from lsdm_aug.data.nnunet_format import read_case, write_case, write_dataset_json
from lsdm_aug.data.phantom import SUPPORTED_SIZES, ChestPhantom, PhantomConfig, free_site
from lsdm_aug.data.prepared import HU_RANGE, atomic_write_text
from lsdm_aug.metrics.detection import LUNA16_FP_RATES, detect_case, dice, froc, score_at_rate, sensitivity_by_group
from lsdm_aug.nnunet.plans import plan_and_preprocess

__all__ = ["DetectionRecipe", "load_detection_recipe", "run_detection", "ARMS"]

ARMS = ("real", "real+synthetic", "real+on-the-fly", "real+copy-paste")
CONFIGURATION = "2d_cpu"


@dataclass
class DetectionRecipe:
    """The detection benchmark's settings (see the module docstring); ``prepared`` takes real data from a
    prepared dataset's train / test splits (e.g. LIDC) instead of the phantom.

    Example:
        >>> DetectionRecipe(arms=("real", "real+synthetic"), seeds=(0,)).validate().num_epochs
        80
    """

    name: str = "bench-detection-phantom"
    image_size: int = 128
    model: str = "default"
    prepared: str | None = None
    train_patients: int = 8
    test_patients: int = 40
    slices_per_patient: int = 6
    nodule_free_fraction: float = 0.7
    data_seed: int = 100
    synthetic_count: int = 48
    synthetic_steps: int = 25
    guidance_scale: float = 1.0
    on_the_fly: dict[str, Any] = field(default_factory=lambda: {"prob": 0.3, "malignancy": "balanced", "steps": 10})
    arms: tuple[str, ...] = ARMS
    seeds: tuple[int, ...] = (0, 1, 2)
    features_per_stage: tuple[int, ...] | None = (8, 16, 32, 64, 64, 64)
    batch_size: int | None = None
    ct_window: tuple[float, float] | None = HU_RANGE
    num_epochs: int = 80
    iterations_per_epoch: int = 25
    val_iterations_per_epoch: int = 2
    dataset_id: int = 900
    threshold: float = 0.5
    candidates_per_slice: int = 16
    operating_fps: float = 2.0
    test_time_mirroring: bool = True
    device: str = "cpu"

    def validate(self) -> DetectionRecipe:
        unknown = sorted(set(self.arms) - set(ARMS))
        if unknown or not self.arms:
            raise ValueError(f"arms must be among {ARMS}, got {list(self.arms)}")
        if self.image_size not in SUPPORTED_SIZES:
            raise ValueError(f"image_size must be one of {SUPPORTED_SIZES}, got {self.image_size}")
        if min(self.train_patients, self.test_patients, self.slices_per_patient, len(self.seeds)) < 1:
            raise ValueError("train_patients, test_patients, slices_per_patient and seeds must be >= 1")
        if not 0 < self.threshold < 1:
            raise ValueError(f"threshold must be in (0, 1), got {self.threshold}")
        if self.candidates_per_slice < 0 or self.operating_fps <= 0:
            raise ValueError(f"candidates_per_slice must be >= 0 and operating_fps > 0, got "
                             f"{self.candidates_per_slice} and {self.operating_fps}")
        if self.ct_window is not None and not (len(self.ct_window) == 2 and self.ct_window[0] < self.ct_window[1]):
            raise ValueError(f"ct_window must be [low, high] HU with low < high (or null for nnU-Net's foreground "
                             f"percentiles), got {self.ct_window!r}")
        if not 1 <= self.dataset_id <= 995:
            raise ValueError(f"dataset_id must be in 1..995 (ids id .. id+3 are used), got {self.dataset_id}")
        return self


def load_detection_recipe(name_or_path: str | Path) -> DetectionRecipe:
    """A shipped recipe by name (``bench-detection-phantom``, ``bench-detection-lidc-512``) or a YAML path."""
    return load_benchmark_recipe(DetectionRecipe, name_or_path, "detection", ("arms", "seeds", "features_per_stage",
                                                                                   "ct_window"))


# ---- data ----------------------------------------------------------------------------------------------------

def _dataset_name(recipe: DetectionRecipe, arm: str) -> str:
    offset = {"real": 0, "real+synthetic": 1, "real+copy-paste": 2}[arm]
    return f"Dataset{recipe.dataset_id + offset:03d}_{arm.replace('+', '').replace('-', '')}"


def _real_slices(recipe: DetectionRecipe, split: str) -> list[tuple[str, np.ndarray, np.ndarray, float, list[float]]]:
    """(case id, HU, instance mask, spacing, malignancy per instance) of the real train or test slices."""
    if recipe.prepared is not None:
        from lsdm_aug.data.prepared import PreparedDataset, unit_to_hu

        dataset = PreparedDataset(recipe.prepared, split="train" if split == "train" else "test")
        patients = sorted(dataset.cases.patient_id.unique())
        keep = set(patients[:recipe.train_patients] if split == "train" else patients[:recipe.test_patients])
        rows = dataset.cases[dataset.cases.patient_id.isin(keep)]
        out = []
        for case_id in rows.case_id:
            case = dataset[case_id]
            out.append((case_id, unit_to_hu(case["image"]), case["nodule_mask"], float(case["spacing_mm"]),
                        [float(n["malignancy"]) for n in case["nodules"]]))
        return out
    config = PhantomConfig(size=recipe.image_size, slices_per_patient=recipe.slices_per_patient,
                           nodule_free_fraction=recipe.nodule_free_fraction)
    phantom = ChestPhantom(config)
    first = 0 if split == "train" else recipe.train_patients * recipe.slices_per_patient
    count = (recipe.train_patients if split == "train" else recipe.test_patients) * recipe.slices_per_patient
    return [(f"{split}_{index:05d}", ct.hu, ct.nodule_mask, ct.spacing_mm, [float(n["malignancy"]) for n in ct.nodules])
            for index, ct in ((i, phantom.slice(i, seed=recipe.data_seed)) for i in range(first, first + count))]


def _write_real(recipe: DetectionRecipe, raw: Path, test: Path) -> list[str]:
    """The real training dataset (nnU-Net raw) and the test set (images, labels, lesion table)."""
    real = raw / _dataset_name(recipe, "real")
    train = _real_slices(recipe, "train")
    if not (real / "dataset.json").is_file():
        for case_id, hu, mask, spacing, _ in train:
            write_case(real, case_id, hu, (mask > 0).astype(np.uint8), (spacing, spacing))
        write_dataset_json(real, len(train), name="real", description=f"{recipe.name}: scarce real training slices")
    if not (test / "lesions.csv").is_file():
        rows = []
        for case_id, hu, mask, spacing, malignancy in _real_slices(recipe, "test"):
            write_case(test, case_id, hu, mask.astype(np.uint8), (spacing, spacing))  # instance ids kept
            rows += [{"case_id": case_id, "lesion": k + 1, "malignancy": m} for k, m in enumerate(malignancy)
                     if (mask == k + 1).any()]
            rows += [] if malignancy else [{"case_id": case_id, "lesion": 0, "malignancy": np.nan}]
        atomic_write_text(test / "lesions.csv", pd.DataFrame(rows).to_csv(index=False))
    return [case_id for case_id, *_ in train]


def _copy_real_into(recipe: DetectionRecipe, raw: Path, target: Path, real_cases: list[str]) -> None:
    for case_id in real_cases:
        image, label, spacing = read_case(raw / _dataset_name(recipe, "real"), case_id)
        write_case(target, case_id, image, label, spacing[:2])


def _write_synthetic_arm(recipe: DetectionRecipe, raw: Path, work: Path, real_cases: list[str]) -> None:
    from lsdm_aug.synthesis import SynthesisRequest, synthesize

    target = raw / _dataset_name(recipe, "real+synthetic")
    if (target / "dataset.json").is_file():
        return
    synthetic = work / "synthetic"
    request = SynthesisRequest(count=recipe.synthetic_count, size=recipe.image_size, seed=recipe.data_seed,
                               steps=recipe.synthetic_steps, guidance_scale=recipe.guidance_scale, model=recipe.model,
                               source=None if recipe.prepared is None else recipe.prepared)
    manifest = synthesize(synthetic, request, device=recipe.device)
    for case_id in manifest.case_id:
        image, label, spacing = read_case(synthetic, case_id)
        write_case(target, case_id, image, label, spacing[:2])
    _copy_real_into(recipe, raw, target, real_cases)
    write_dataset_json(target, len(real_cases) + len(manifest), name="real+synthetic")


def copy_paste_cases(real: Path, real_cases: list[str], count: int, seed: int):
    """``count`` slices, each a real slice with a real training nodule pasted, pixels as they are, at a free site
    of its lung (the naive baseline). Yields (case id, image, label, spacing)."""
    from scipy import ndimage

    from lsdm_aug.data.semantic import SemanticLabel, semantic_map_from_hu

    rng = np.random.default_rng(seed)
    cases = {c: read_case(real, c) for c in real_cases}
    sources = []
    for case_id, (image, label, _) in cases.items():
        components, n = ndimage.label(label > 0)
        for box in ndimage.find_objects(components):
            sources.append((image[box], label[box] > 0))
    if not sources:
        raise ValueError("copy-paste needs real training slices with nodules; the real set has none")
    made = 0
    for attempt in range(count * 20):
        if made == count:
            break
        case_id = real_cases[rng.integers(len(real_cases))]
        image, label, spacing = cases[case_id]
        patch, mask = sources[rng.integers(len(sources))]
        lung = semantic_map_from_hu(image.astype(np.float32), spacing_mm=spacing[0]) == SemanticLabel.LUNG
        site = free_site(lung & (label == 0), mask, spacing[0], rng)
        if site is None:
            continue
        image, label = image.copy(), label.copy()
        window = (slice(site[0], site[0] + mask.shape[0]), slice(site[1], site[1] + mask.shape[1]))
        image[window][mask] = patch[mask]
        label[window][mask] = 1
        yield f"copypaste_{made:05d}", image, label, spacing[:2]
        made += 1


def _write_copy_paste_arm(recipe: DetectionRecipe, raw: Path, real_cases: list[str]) -> None:
    target = raw / _dataset_name(recipe, "real+copy-paste")
    if (target / "dataset.json").is_file():
        return
    made = 0
    for case_id, image, label, spacing in copy_paste_cases(raw / _dataset_name(recipe, "real"), real_cases,
                                                           recipe.synthetic_count, recipe.data_seed):
        write_case(target, case_id, image, label, spacing)
        made += 1
    _copy_real_into(recipe, raw, target, real_cases)
    write_dataset_json(target, len(real_cases) + made, name="real+copy-paste")


# ---- nnU-Net --------------------------------------------------------------------------------------------------

def _environment(work: Path, seed: int) -> dict[str, str]:
    return {**os.environ, "nnUNet_raw": str(work / "raw"), "nnUNet_preprocessed": str(work / "preprocessed"),
            "nnUNet_results": str(work / "results" / f"seed{seed}"), "nnUNet_n_proc_DA": "1",
            "nnUNet_compile": "false"}


def _preprocess(work: Path, dataset: str, ct_window: tuple[float, float] | None) -> dict:
    """nnU-Net's planning and 2D preprocessing of ``dataset`` (once), the plans' CT window widened to
    ``ct_window`` in between (see :mod:`lsdm_aug.nnunet.plans`); returns its plans."""
    folder = work / "preprocessed" / dataset
    if not (folder / "preprocessed.json").is_file():
        plan_and_preprocess(int(dataset.split("_")[0].removeprefix("Dataset")), ("2d",), ct_window,
                            env=_environment(work, 0))
        atomic_write_text(folder / "preprocessed.json", json.dumps({"ct_window": ct_window}))
    return json.loads((folder / "nnUNetPlans.json").read_text())


def _write_reduced_configuration(recipe: DetectionRecipe, work: Path, dataset: str, plans: dict) -> None:
    """The reduced configuration ``2d_cpu`` added to ``dataset``'s plans file."""
    plans["configurations"][CONFIGURATION] = reduced_configuration(plans["configurations"]["2d"], recipe)
    atomic_write_text(work / "preprocessed" / dataset / "nnUNetPlans.json", json.dumps(plans, indent=1))


def reduced_configuration(configuration_2d: dict, recipe: DetectionRecipe) -> dict:
    """The ``2d_cpu`` configuration: inherits ``2d``; fewer features per stage and another batch size."""
    reduced: dict[str, Any] = {"inherits_from": "2d"}
    if recipe.batch_size is not None:
        reduced["batch_size"] = int(recipe.batch_size)
    if recipe.features_per_stage is not None:
        architecture = copy.deepcopy(configuration_2d["architecture"])
        stages = int(architecture["arch_kwargs"]["n_stages"])
        features = list(recipe.features_per_stage)[:stages]
        features += [features[-1]] * (stages - len(features))
        architecture["arch_kwargs"]["features_per_stage"] = features
        reduced["architecture"] = architecture
    return reduced


def _trainer_settings(recipe: DetectionRecipe, arm: str, seed: int, work: Path) -> dict[str, Any]:
    settings = {"num_epochs": recipe.num_epochs, "num_iterations_per_epoch": recipe.iterations_per_epoch,
                "num_val_iterations_per_epoch": recipe.val_iterations_per_epoch, "seed": seed, "prob": 0.0}
    if arm == "real+on-the-fly":
        on_the_fly = {k: v for k, v in recipe.on_the_fly.items() if k != "bank_count"}
        if on_the_fly.get("bank") == "build":  # the bank that _ensure_bank builds in the work folder
            on_the_fly["bank"] = str(work / "bank")
        settings.update({"model": recipe.model, **on_the_fly})
    return settings


def _ensure_bank(recipe: DetectionRecipe, work: Path) -> None:
    """With ``on_the_fly: {bank: build, bank_count: N}``: N LSDM nodules (malignancy balanced) generated once
    into ``work/bank`` (resumable), which the on-the-fly arm then places in its training patches."""
    if recipe.on_the_fly.get("bank") != "build":
        return
    from lsdm_aug.synthesis import SynthesisRequest, build_bank

    request = SynthesisRequest(count=int(recipe.on_the_fly.get("bank_count", 200)), size=recipe.image_size,
                               seed=recipe.data_seed + 1, steps=recipe.synthetic_steps,
                               guidance_scale=recipe.guidance_scale, model=recipe.model, source=recipe.prepared)
    build_bank(work / "bank", request, device=recipe.device, batch_size=8)


def _train_and_predict(recipe: DetectionRecipe, work: Path, arm: str, seed: int) -> Path:
    """Train one (arm, seed) in its own process and predict the test set; skipped when already done."""
    predictions = work / "predictions" / arm.replace("+", "_") / f"seed{seed}"
    done = predictions / "done.json"
    if done.is_file():
        return predictions
    dataset = _dataset_name(recipe, "real" if arm == "real+on-the-fly" else arm)
    env = _environment(work, seed) | {"LSDM_AUG_NNUNET": json.dumps(_trainer_settings(recipe, arm, seed, work))}
    if arm == "real+on-the-fly":
        env["nnUNet_results"] = str(work / "results" / f"seed{seed}-onthefly")
    job = {"dataset": dataset, "configuration": CONFIGURATION, "device": recipe.device,
           "test": str(work / "test" / "imagesTr"), "predictions": str(predictions),
           "mirroring": recipe.test_time_mirroring}
    started = time.perf_counter()
    subprocess.run([sys.executable, "-m", "lsdm_aug.nnunet.training", json.dumps(job)], env=env, check=True)
    atomic_write_text(done, json.dumps(job | {"minutes": (time.perf_counter() - started) / 60}))
    return predictions


def _run_minutes(predictions: Path) -> float | None:
    """Wall minutes that training and predicting one (arm, seed) took, as its ``done.json`` recorded them."""
    return json.loads((predictions / "done.json").read_text()).get("minutes")


# ---- evaluation -----------------------------------------------------------------------------------------------

def evaluate(test: Path, predictions: Path | int, threshold: float, peaks: int = 0,
             operating_fps: float = 2.0) -> dict[str, Any]:
    """Lesion-level detection figures of one trained model on the test set.

    ``predictions``: the folder of nnU-Net's ``.npz`` probabilities, or an integer seed for the chance level
    (uniform noise as the foreground probability: candidates at random places). Candidates are the ``peaks``
    highest local maxima of each slice's foreground probability (0: connected components above
    ``threshold``). Sensitivity, false positives and Dice are read at ``threshold``; the per-malignancy
    sensitivity also at the score where the FROC reaches ``operating_fps`` per slice."""
    lesions = pd.read_csv(test / "lesions.csv")
    cases, groups, fps, predicted, reference = [], [], [], [], []
    noise = np.random.default_rng(predictions) if isinstance(predictions, int) else None
    for case_id in sorted(lesions.case_id.unique()):
        _, instances, _ = read_case(test, case_id)
        if noise is not None:
            foreground = noise.uniform(0.0, 1e-3, instances.shape)
        else:
            with np.load(predictions / f"{case_id}.npz", allow_pickle=False) as arrays:
                # the foreground channels themselves: 1 - background loses probabilities below float precision
                foreground = arrays["probabilities"][1:].astype(np.float64).sum(0).reshape(instances.shape)
        case = detect_case(foreground, instances, threshold, instances=True, peaks=peaks)
        cases.append(case)
        rows = lesions[(lesions.case_id == case_id) & (lesions.lesion > 0)]
        groups.append({int(r.lesion): int(np.floor(r.malignancy + 0.5)) for r in rows.itertuples()})
        predicted.append((foreground >= threshold).ravel())
        reference.append((instances > 0).ravel())
        fps.append(case.false_positives(threshold))
    result = froc(cases)
    operating = score_at_rate(cases, operating_fps)
    return {"cpm": result.cpm, "sensitivity_at": {str(k): v for k, v in result.at_rates.items()},
            "sensitivity": sum(len(c.true_positives(threshold)) for c in cases) / max(result.lesions, 1),
            "false_positives_per_slice": float(np.mean(fps)),
            "dice": dice(np.concatenate(predicted), np.concatenate(reference)),  # over the whole test set
            "sensitivity_by_malignancy": {str(k): v for k, v in sensitivity_by_group(cases, groups, threshold).items()},
            "sensitivity_by_malignancy_at_operating_point": {
                str(k): v for k, v in sensitivity_by_group(cases, groups, operating).items()},
            "operating_score": operating if np.isfinite(operating) else None,  # None: no candidate fits the rate
            "lesions": result.lesions, "slices": result.images}


def _summary(runs: list[dict]) -> dict[str, Any]:
    def spread(values: list[float]) -> dict[str, float]:
        return {"mean": float(np.mean(values)), "std": float(np.std(values))}

    keys = ("cpm", "sensitivity", "false_positives_per_slice", "dice")
    summary = {k: spread([r[k] for r in runs]) for k in keys}
    levels = sorted({level for r in runs for level in r["sensitivity_by_malignancy"]})
    for key in ("sensitivity_by_malignancy", "sensitivity_by_malignancy_at_operating_point"):
        summary[key] = {level: spread([r[key].get(level, np.nan) for r in runs]) for level in levels}
    summary["sensitivity_at"] = {rate: spread([r["sensitivity_at"][rate] for r in runs])
                                 for rate in runs[0]["sensitivity_at"]}
    return summary


def run_detection(recipe: DetectionRecipe, work_dir: str | Path, out_dir: str | Path) -> dict[str, Any]:
    """Build the data, train every (arm, seed), evaluate, and write ``detection.md`` / ``.json`` into ``out_dir``."""
    recipe.validate()
    work, out = Path(work_dir).resolve(), Path(out_dir)
    raw, test = work / "raw", work / "test"
    real_cases = _write_real(recipe, raw, test)
    if "real+synthetic" in recipe.arms:
        _write_synthetic_arm(recipe, raw, work, real_cases)
    if "real+copy-paste" in recipe.arms:
        _write_copy_paste_arm(recipe, raw, real_cases)
    if "real+on-the-fly" in recipe.arms:
        _ensure_bank(recipe, work)
    # one budget for every arm: without a recipe batch size, the batch nnU-Net plans for the real set (it plans
    # larger batches for the larger real+synthetic sets)
    datasets = sorted({_dataset_name(recipe, "real" if a == "real+on-the-fly" else a) for a in recipe.arms})
    plans = {dataset: _preprocess(work, dataset, recipe.ct_window)
             for dataset in {_dataset_name(recipe, "real"), *datasets}}
    planned = int(plans[_dataset_name(recipe, "real")]["configurations"]["2d"]["batch_size"])
    for dataset in datasets:
        _write_reduced_configuration(replace(recipe, batch_size=recipe.batch_size or planned), work, dataset,
                                     plans[dataset])
    report: dict[str, Any] = {"recipe": asdict(recipe), "arms": {}, "planned_batch_size": planned,
                              "cpu_count": os.cpu_count()}
    for arm in recipe.arms:
        runs = []
        for seed in recipe.seeds:
            predictions = _train_and_predict(recipe, work, arm, seed)
            runs.append(evaluate(test, predictions, recipe.threshold, recipe.candidates_per_slice,
                                 recipe.operating_fps) | {"minutes": _run_minutes(predictions)})
        report["arms"][arm] = {"runs": runs, "summary": _summary(runs)}
    chance = [evaluate(test, seed, recipe.threshold, recipe.candidates_per_slice, recipe.operating_fps)
              for seed in recipe.seeds]
    report["chance"] = {"runs": chance, "summary": _summary(chance)}
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "detection.json", json.dumps(report, indent=1))
    atomic_write_text(out / "detection.md", detection_markdown(report))
    return report


def detection_markdown(report: dict[str, Any]) -> str:
    r = report["recipe"]
    rates = [str(float(x)) for x in LUNA16_FP_RATES]
    lines = ["# Downstream detection with nnU-Net v2", "",
             f"Command: `lsdm-aug benchmark detection --recipe {r['name']}`", "",
             f"Real data: {'phantom' if r['prepared'] is None else r['prepared']}, {r['train_patients']} training "
             f"patients and {r['test_patients']} test patients x {r['slices_per_patient']} slices "
             f"({r['nodule_free_fraction']:.0%} nodule-free), {r['image_size']} px. Synthetic: {r['synthetic_count']} "
             f"cases (model `{r['model']}`). nnU-Net 2D, configuration `{CONFIGURATION}` = nnU-Net's 2d with "
             f"features per stage {r['features_per_stage'] or 'as planned'} and batch size "
             f"{r['batch_size'] or str(report.get('planned_batch_size', '?')) + ' (as nnU-Net planned it for the real set)'} in "
             f"every arm, CT clipped to {_window_words(r.get('ct_window'))}; {r['num_epochs']} epochs "
             f"x {r['iterations_per_epoch']} iterations; seeds {list(r['seeds'])}. Mean ± std over seeds.", "",
             _candidates_sentence(r), "",
             "| arm | CPM | sensitivity | FPs / slice | Dice | " + " | ".join(f"sens @ {x}" for x in rates) + " |",
             "| --- " * (5 + len(rates)) + "|"]
    rows = {**report["arms"], **({"chance (random candidates)": report["chance"]} if "chance" in report else {})}
    for arm, result in rows.items():
        s = result["summary"]
        cells = [f"{s[k]['mean']:.3f} ± {s[k]['std']:.3f}" for k in ("cpm", "sensitivity", "false_positives_per_slice",
                                                                    "dice")]
        cells += [f"{s['sensitivity_at'][x]['mean']:.2f}" for x in rates]
        lines.append(f"| {arm} | " + " | ".join(cells) + " |")
    for key, title in (("sensitivity_by_malignancy", f"at threshold {r['threshold']}"),
                       ("sensitivity_by_malignancy_at_operating_point",
                        f"at the FROC operating point of {r['operating_fps']:g} FPs per slice")):
        lines += ["", f"Sensitivity per malignancy level, {title}:", "",
                  "| arm | " + " | ".join(f"malignancy {m}" for m in range(1, 6)) + " |", "| --- " * 6 + "|"]
        for arm, result in report["arms"].items():
            by = result["summary"][key]
            lines.append(f"| {arm} | " + " | ".join(f"{by[str(m)]['mean']:.2f} ± {by[str(m)]['std']:.2f}"
                                                    if str(m) in by else "-" for m in range(1, 6)) + " |")
    return "\n".join(lines + _time_lines(report)) + "\n"


def _time_lines(report: dict[str, Any]) -> list[str]:
    """Training and prediction time per (arm, seed), from the runs that recorded it."""
    minutes = [run["minutes"] for arm in report["arms"].values() for run in arm["runs"] if run.get("minutes")]
    if not minutes:
        return []
    return ["", f"Training and predicting took {np.mean(minutes):.1f} min per (arm, seed) run (range "
                f"{min(minutes):.1f} to {max(minutes):.1f}), {sum(minutes):.0f} min for the {len(minutes)} runs "
                f"timed, on device `{report['recipe']['device']}` with {report.get('cpu_count', '?')} CPU cores."]


def _window_words(window: list[float] | tuple[float, ...] | None) -> str:
    if window is None:
        return "nnU-Net's foreground 0.5 / 99.5 percentiles"
    return f"[{window[0]:g}, {window[1]:g}] HU"


def _candidates_sentence(r: dict[str, Any]) -> str:
    if r["candidates_per_slice"]:
        return (f"Candidates: the {r['candidates_per_slice']} highest local maxima of each slice's foreground "
                f"probability, so the FROC ranks the network's output even below the {r['threshold']} threshold; "
                f"sensitivity, FPs / slice and Dice are read at {r['threshold']}.")
    return f"Candidates: connected components of the foreground probability >= {r['threshold']}."
