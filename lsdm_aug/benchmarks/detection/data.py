"""The detection benchmark's datasets in nnU-Net's raw format: the real training slices, the test set with its
lesion table, the synthetic arms (LSDM guided and unguided), the copy-paste arm and the on-the-fly arm's bank.

Every writer skips a dataset whose ``dataset.json`` (test set: ``lesions.csv``) exists, so a rerun continues.

Example:
    >>> recipe = DetectionRecipe(image_size=64, train_patients=1, test_patients=1, slices_per_patient=2)
    >>> [case[0] for case in real_slices(recipe, "test")]
    ['test_p01000_s0', 'test_p01000_s1']
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pandas as pd

from lsdm_aug.benchmarks.detection.recipe import DetectionRecipe
from lsdm_aug.data.nnunet_format import case_paths, read_case, write_case, write_dataset_json
from lsdm_aug.data.phantom import ChestPhantom, PhantomConfig, free_site
from lsdm_aug.data.phantom_slab import PhantomSlab, draw_slab
from lsdm_aug.data.prepared import atomic_write_text

__all__ = ["dataset_name", "real_slices", "real_slabs", "copy_paste_slabs", "synthetic_slabs", "insert_into_slab",
           "write_real", "write_synthetic_arm", "copy_paste_cases",
           "write_copy_paste_arm", "ensure_bank", "trained_dataset"]

DATASET_OFFSETS = {"real": 0, "real+synthetic": 1, "real+copy-paste": 2, "real+synthetic-unguided": 3}
RealSlice = tuple[str, np.ndarray, np.ndarray, float, list[float], str]  # HU: (H, W), or (channels, H, W) slabs


def trained_dataset(arm: str) -> str:
    """The arm whose dataset ``arm`` trains on (the on-the-fly arm trains on the real set)."""
    return "real" if arm == "real+on-the-fly" else arm


def dataset_name(recipe: DetectionRecipe, arm: str) -> str:
    """nnU-Net's dataset name of ``arm``'s training set, e.g. ``Dataset900_real``."""
    arm = trained_dataset(arm)
    return f"Dataset{recipe.dataset_id + DATASET_OFFSETS[arm]:03d}_{arm.replace('+', '').replace('-', '')}"


def real_slices(recipe: DetectionRecipe, split: str) -> list[RealSlice]:
    """(case id, HU, instance mask, spacing, malignancy per instance, patient id) of the real train or test slices."""
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    if recipe.prepared is not None:
        return _prepared_slices(recipe, split)
    if recipe.neighbour_slices:
        return [(case_id, slab.hu, slab.nodule_mask[recipe.neighbour_slices], slab.spacing_mm,
                 [float(n["malignancy"]) for n in slab.nodules], case_id.split("_")[1])
                for case_id, slab in real_slabs(recipe, split)]
    phantom = _phantom(recipe.image_size, recipe.slices_per_patient, recipe.nodule_free_fraction)
    out = []
    for patient, position, case_id in _case_ids(recipe, split):
        ct = phantom.slice(patient * recipe.slices_per_patient + position, seed=recipe.data_seed)
        out.append((case_id, ct.hu, ct.nodule_mask, ct.spacing_mm, [float(n["malignancy"]) for n in ct.nodules],
                    f"p{patient:05d}"))
    return out


def real_slabs(recipe: DetectionRecipe, split: str) -> list[tuple[str, PhantomSlab]]:
    """(case id, phantom slab) of the real train or test cases of a 2.5D recipe (``neighbour_slices`` > 0): the
    slabs whose middle slices :func:`real_slices` gives, with every slice's nodule and lung masks. The training
    slabs are drawn once per process (the real set, copy-paste and both LSDM arms all start from them); callers
    must not change them in place."""
    if not recipe.neighbour_slices:
        raise ValueError("real_slabs needs a 2.5D recipe (neighbour_slices > 0)")
    key = (recipe.image_size, recipe.slices_per_patient, recipe.nodule_free_fraction, recipe.data_seed,
           recipe.channels, recipe.slice_thickness_mm, tuple(_case_ids(recipe, split)))
    return list(_training_slabs(key) if split == "train" else _draw_slabs(key))


def _draw_slabs(key: tuple) -> tuple[tuple[str, PhantomSlab], ...]:
    size, slices_per_patient, nodule_free_fraction, seed, channels, thickness, cases = key
    phantom = _phantom(size, slices_per_patient, nodule_free_fraction)
    return tuple((case_id, draw_slab(phantom, patient * slices_per_patient + position, seed, channels, thickness))
                 for patient, position, case_id in cases)


_training_slabs = functools.lru_cache(maxsize=1)(_draw_slabs)


def _phantom(size: int, slices_per_patient: int, nodule_free_fraction: float) -> ChestPhantom:
    return ChestPhantom(PhantomConfig(size=size, slices_per_patient=slices_per_patient,
                                      nodule_free_fraction=nodule_free_fraction))


def _case_ids(recipe: DetectionRecipe, split: str) -> list[tuple[int, int, str]]:
    """(patient, slice position, case id) of the phantom's train or test cases."""
    first, patients = (0, recipe.train_patients) if split == "train" else (recipe.test_first_patient,
                                                                           recipe.test_patients)
    return [(patient, position, f"{split}_p{patient:05d}_s{position}")
            for patient in range(first, first + patients) for position in range(recipe.slices_per_patient)]


def _prepared_slices(recipe: DetectionRecipe, split: str) -> list[RealSlice]:
    from lsdm_aug.data.prepared import PreparedDataset, unit_to_hu

    dataset = PreparedDataset(recipe.prepared, split=split)
    patients = sorted(dataset.cases.patient_id.unique())
    keep = set(patients[:recipe.train_patients] if split == "train" else patients[:recipe.test_patients])
    rows = dataset.cases[dataset.cases.patient_id.isin(keep)]
    out = []
    for case_id, patient in zip(rows.case_id, rows.patient_id):
        case = dataset[case_id]
        out.append((case_id, unit_to_hu(case["image"]), case["nodule_mask"], float(case["spacing_mm"]),
                    [float(n["malignancy"]) for n in case["nodules"]], str(patient)))
    return out


def write_real(recipe: DetectionRecipe, raw: Path, test: Path) -> list[str]:
    """The real training dataset (nnU-Net raw) and the test set (images, instance labels, ``lesions.csv`` with
    one row per lesion, or one with lesion 0 for a nodule-free slice); returns the training case ids, sorted.
    A dataset already written is not drawn again."""
    real = raw / dataset_name(recipe, "real")
    if (real / "dataset.json").is_file():
        case_ids = sorted(path.name.removesuffix(".nii.gz") for path in (real / "labelsTr").glob("*.nii.gz"))
    else:
        train = real_slices(recipe, "train")
        for case_id, hu, mask, spacing, *_ in train:
            write_case(real, case_id, hu, (mask > 0).astype(np.uint8), (spacing, spacing))
        write_dataset_json(real, len(train), name="real", description=f"{recipe.name}: scarce real training slices",
                           channels=recipe.channels)
        case_ids = sorted(case[0] for case in train)
    if not (test / "lesions.csv").is_file():
        rows = []
        for case_id, hu, mask, spacing, malignancy, patient in real_slices(recipe, "test"):
            write_case(test, case_id, hu, mask.astype(np.uint8), (spacing, spacing))  # instance ids kept
            rows += [{"case_id": case_id, "patient_id": patient, "lesion": k + 1, "malignancy": m}
                     for k, m in enumerate(malignancy) if (mask == k + 1).any()]
            if not (mask > 0).any():
                rows.append({"case_id": case_id, "patient_id": patient, "lesion": 0, "malignancy": np.nan})
        atomic_write_text(test / "lesions.csv", pd.DataFrame(rows).to_csv(index=False))
    return case_ids


def _copy_real_into(recipe: DetectionRecipe, raw: Path, target: Path, real_cases: list[str]) -> None:
    for case_id in real_cases:
        image, label, spacing = read_case(raw / dataset_name(recipe, "real"), case_id)
        write_case(target, case_id, image, label, spacing[:2])


def write_synthetic_arm(recipe: DetectionRecipe, raw: Path, work: Path, real_cases: list[str],
                        arm: str = "real+synthetic") -> None:
    """The real cases plus ``synthetic_count`` cases from ``synthesize`` (malignancy balanced) on the real training
    slices as backgrounds (as copy-paste uses them, so that only the nodules differ between the arms): with the
    recipe's guidance (``real+synthetic``) or none at all (``real+synthetic-unguided``: s = 0 and w = 0, no
    feature steered: the value of control)."""
    from lsdm_aug.synthesis import SynthesisRequest, synthesize

    target = raw / dataset_name(recipe, arm)
    if (target / "dataset.json").is_file():
        return
    unguided = arm == "real+synthetic-unguided"
    if recipe.neighbour_slices:
        made = _write_synthetic_slabs(recipe, target, unguided)
        _copy_real_into(recipe, raw, target, real_cases)
        write_dataset_json(target, len(real_cases) + made, name=arm, channels=recipe.channels)
        return
    request = SynthesisRequest(count=recipe.synthetic_count, size=recipe.image_size, seed=recipe.data_seed,
                               steps=recipe.synthetic_steps, model=recipe.model,
                               source=str(raw / dataset_name(recipe, "real")),
                               guidance_scale=0.0 if unguided else recipe.guidance_scale,
                               cfg_scale=0.0 if unguided else recipe.cfg_scale,
                               appearance_from_outline=recipe.appearance_from_outline)
    synthetic = work / ("synthetic-unguided" if unguided else "synthetic")
    manifest = synthesize(synthetic, request, device=recipe.device)
    for case_id in manifest.case_id:
        image, label, spacing = read_case(synthetic, case_id)
        write_case(target, case_id, image, label, spacing[:2])
    _copy_real_into(recipe, raw, target, real_cases)
    write_dataset_json(target, len(real_cases) + len(manifest), name=arm)


def synthetic_slabs(recipe: DetectionRecipe, slabs: list[tuple[str, PhantomSlab]], unguided: bool = False,
                    ) -> Iterator[tuple[str, PhantomSlab, dict]]:
    """``synthetic_count`` LSDM insertions into real training slabs, for a 2.5D recipe: the product's 3D path
    (:class:`~lsdm_aug.transforms.core.NoduleSynthesizer` on the slab as an (H, W, k) volume at its voxel
    spacing, the outline's layers over the slices it spans), each nodule centred on the labelled middle slice,
    malignancy cycling through 1..5 (balanced). Yields (case id, background slab, the drawn parameters); the
    insertion itself is :func:`insert_into_slab`."""
    from lsdm_aug.transforms.core import NoduleSynthesizer

    rng = np.random.RandomState(recipe.data_seed + 3)
    middle = recipe.neighbour_slices
    made = 0
    for _ in range(recipe.synthetic_count * 20):
        if made == recipe.synthetic_count:
            break
        case_id, slab = slabs[rng.randint(len(slabs))]
        synthesizer = NoduleSynthesizer(malignancy=made % 5 + 1, steps=recipe.synthetic_steps, model=recipe.model,
                                        guidance_scale=0.0 if unguided else recipe.guidance_scale,
                                        cfg_scale=0.0 if unguided else recipe.cfg_scale, device=recipe.device,
                                        appearance_from_outline=recipe.appearance_from_outline)
        volume, label, lung = _as_volume(slab)
        params = synthesizer.draw(volume, label, rng, _voxel(slab), lung_mask=lung, centre_slice=middle)
        if params.skipped:
            continue
        yield f"lsdm_{made:05d}", slab, {"synthesizer": synthesizer, "params": params, "background": case_id}
        made += 1


def insert_into_slab(slab: PhantomSlab, drawn: dict) -> tuple[np.ndarray, np.ndarray, dict]:
    """(slab HU (k, H, W), middle slice's label, the synthesizer's record) after the insertion drawn by
    :func:`synthetic_slabs`."""
    volume, label, lung = _as_volume(slab)
    out, new_label, info = drawn["synthesizer"].apply(volume, label, drawn["params"], _voxel(slab), lung_mask=lung)
    middle = slab.hu.shape[0] // 2
    return np.moveaxis(out, -1, 0), (new_label[..., middle] > 0).astype(np.uint8), info


def _as_volume(slab: PhantomSlab) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The slab as the synthesizer's (H, W, k) volume: HU, nodule label (uint8) and lung fields."""
    return tuple(np.moveaxis(a, 0, -1) for a in (slab.hu, (slab.nodule_mask > 0).astype(np.uint8), slab.lung_mask))


def _voxel(slab: PhantomSlab) -> tuple[float, float, float]:
    return slab.spacing_mm, slab.spacing_mm, slab.slice_thickness_mm


def _write_synthetic_slabs(recipe: DetectionRecipe, target: Path, unguided: bool) -> int:
    """The LSDM slabs of :func:`synthetic_slabs` written into ``target`` with their manifest; cases already
    written are kept (the draws are replayed, so a rerun continues with the same cases)."""
    manifest = target / "manifest.csv"
    done = pd.read_csv(manifest).set_index("case_id", drop=False) if manifest.is_file() else pd.DataFrame()
    rows = []
    for case_id, slab, drawn in synthetic_slabs(recipe, real_slabs(recipe, "train"), unguided):
        if case_id in done.index and case_paths(target, case_id)[1].is_file():
            rows.append(done.loc[case_id].to_dict())
            continue
        image, label, info = insert_into_slab(slab, drawn)
        write_case(target, case_id, image, label, (slab.spacing_mm, slab.spacing_mm))
        rows.append({"case_id": case_id, "background": drawn["background"], **info.pop("features"), **info,
                     "guidance_scale": drawn["synthesizer"].guidance_scale,
                     "cfg_scale": drawn["synthesizer"].cfg_scale})
        atomic_write_text(manifest, pd.DataFrame(rows).to_csv(index=False))
    return len(rows)


def copy_paste_cases(real: Path, real_cases: list[str], count: int,
                     seed: int) -> Iterator[tuple[str, np.ndarray, np.ndarray, tuple[float, ...]]]:
    """``count`` slices, each a real slice with a real training nodule pasted, pixels as they are, at a free site
    of its lung (the naive baseline). Yields (case id, image, label, spacing)."""
    from scipy import ndimage

    from lsdm_aug.data.semantic import SemanticLabel, semantic_map_from_hu

    rng = np.random.default_rng(seed)
    cases = {c: read_case(real, c) for c in real_cases}
    sources = []
    for image, label, _ in cases.values():
        components, _ = ndimage.label(label > 0)
        for box in ndimage.find_objects(components):
            sources.append((image[box], label[box] > 0))
    if not sources:
        raise ValueError("copy-paste needs real training slices with nodules; the real set has none")
    made = 0
    for _ in range(count * 20):
        if made == count:
            break
        image, label, spacing = cases[real_cases[rng.integers(len(real_cases))]]
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


def copy_paste_slabs(slabs: list[tuple[str, PhantomSlab]], count: int,
                     seed: int) -> Iterator[tuple[str, np.ndarray, np.ndarray, tuple[float, ...]]]:
    """:func:`copy_paste_cases` for 2.5D slabs: a real training nodule with its voxels on every slice of the slab
    pasted into another slab, at a site inside the lung and free of nodules on every slice, its middle layer on
    the middle slice. Yields (case id, slab HU (k, H, W), middle slice's label, spacing)."""
    from scipy import ndimage

    rng = np.random.default_rng(seed)
    sources = []
    for _, slab in slabs:
        for k, box in enumerate(ndimage.find_objects(slab.nodule_mask), start=1):
            if box is not None:
                sources.append((slab.hu[:, box[1], box[2]], slab.nodule_mask[:, box[1], box[2]] == k))
    if not sources:
        raise ValueError("copy-paste needs real training slabs with nodules; the real set has none")
    made, middle = 0, slabs[0][1].hu.shape[0] // 2
    for _ in range(count * 20):
        if made == count:
            break
        _, slab = slabs[rng.integers(len(slabs))]
        patch, mask = sources[rng.integers(len(sources))]
        free = slab.lung_mask.all(axis=0) & ~(slab.nodule_mask > 0).any(axis=0)
        site = free_site(free, mask.any(axis=0), slab.spacing_mm, rng)
        if site is None:
            continue
        image, label = slab.hu.copy(), slab.nodule_mask[middle] > 0
        window = (slice(None), slice(site[0], site[0] + mask.shape[1]), slice(site[1], site[1] + mask.shape[2]))
        image[window][mask] = patch[mask]
        label[window[1:]] |= mask[middle]
        yield f"copypaste_{made:05d}", image, label.astype(np.uint8), (slab.spacing_mm, slab.spacing_mm)
        made += 1


def write_copy_paste_arm(recipe: DetectionRecipe, raw: Path, real_cases: list[str]) -> None:
    """The real cases plus ``synthetic_count`` copy-paste cases (:func:`copy_paste_cases`, or
    :func:`copy_paste_slabs` for a 2.5D recipe)."""
    target = raw / dataset_name(recipe, "real+copy-paste")
    if (target / "dataset.json").is_file():
        return
    if recipe.neighbour_slices:
        cases = copy_paste_slabs(real_slabs(recipe, "train"), recipe.synthetic_count, recipe.data_seed)
    else:
        cases = copy_paste_cases(raw / dataset_name(recipe, "real"), real_cases, recipe.synthetic_count,
                                 recipe.data_seed)
    made = 0
    for case_id, image, label, spacing in cases:
        write_case(target, case_id, image, label, spacing)
        made += 1
    _copy_real_into(recipe, raw, target, real_cases)
    write_dataset_json(target, len(real_cases) + made, name="real+copy-paste", channels=recipe.channels)


def ensure_bank(recipe: DetectionRecipe, work: Path) -> None:
    """With ``on_the_fly: {bank: build, bank_count: N}``: N LSDM nodules (malignancy balanced) generated once
    into ``work/bank`` (resumable) on the real training slices, which the on-the-fly arm then places in its
    training patches."""
    if recipe.on_the_fly.get("bank") != "build":
        return
    from lsdm_aug.synthesis import SynthesisRequest, build_bank

    # a bank holds 2D nodules; for 2.5D slabs they are made on phantom slices (the bank spreads each over the
    # slices of its real source nodule when it is placed)
    source = None if recipe.neighbour_slices else str(work / "raw" / dataset_name(recipe, "real"))
    request = SynthesisRequest(count=int(recipe.on_the_fly.get("bank_count", 200)), size=recipe.image_size,
                               seed=recipe.data_seed + 1, steps=recipe.synthetic_steps,
                               guidance_scale=recipe.guidance_scale, cfg_scale=recipe.cfg_scale, model=recipe.model,
                               source=source, appearance_from_outline=recipe.appearance_from_outline)
    build_bank(work / "bank", request, device=recipe.device, batch_size=8)
