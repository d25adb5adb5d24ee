"""The prepared dataset on disk: one layout for phantom and LIDC slices, read by everything later.

Layout of a prepared dataset folder::

    dataset.json        format, version, source and the settings that made it
    cases/<case>.npz    image (float32, HU clipped to [-1024, 800] and scaled to [-1, 1]),
                        semantic_map (uint8, labels 0..7), nodule_mask (uint8, k = k-th nodule),
                        lung_mask (bool), spacing_mm, meta (JSON: case row and nodule rows)
    cases.csv           one row per slice: case_id, patient_id, split, spacing_mm, n_nodules, source fields
    features.csv        one row per nodule: case_id, patient_id, nodule_index, centre, size, ratings,
                        malignancy_class
    splits.json         {"train": [...], "validation": [...], "test": [...]} of case ids, patient-wise

Each case file is written atomically (temporary file, then rename), so an interrupted run leaves
only whole cases; the tables are rebuilt from the case files when a run finishes, so a rerun of
the same command continues where it stopped and ends with the same dataset.

Example:
    >>> dataset = PreparedDataset("prepared/phantom-128")  # doctest: +SKIP
    >>> case = dataset[0]; case["image"].shape  # doctest: +SKIP
    (128, 128)
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

__all__ = [
    "HU_RANGE",
    "hu_to_unit",
    "unit_to_hu",
    "PreparedCase",
    "PreparedDatasetWriter",
    "PreparedDataset",
    "DatasetMismatchError",
    "patient_wise_split",
    "atomic_write_text",
    "atomic_write_npz",
]

FORMAT = "lsdm-aug-prepared"
VERSION = 1
HU_RANGE = (-1024.0, 800.0)
SPLIT_NAMES = ("train", "validation", "test")


class DatasetMismatchError(ValueError):
    """An output folder already holds a different dataset, or a folder is not a prepared dataset."""


def hu_to_unit(hu: np.ndarray) -> np.ndarray:
    """Clip HU to [-1024, 800] and scale linearly to [-1, 1] (float32)."""
    low, high = HU_RANGE
    return ((np.clip(np.asarray(hu, np.float32), low, high) - low) / (high - low) * 2.0 - 1.0).astype(np.float32)


def unit_to_hu(image: np.ndarray) -> np.ndarray:
    """Inverse of :func:`hu_to_unit` (values outside [-1, 1] extrapolate)."""
    low, high = HU_RANGE
    return ((np.asarray(image, np.float32) + 1.0) / 2.0 * (high - low) + low).astype(np.float32)


@dataclass
class PreparedCase:
    """One slice ready to be written.

    Args:
        case_id: unique, file-system safe id.
        patient_id: patient the slice comes from (splits are patient-wise).
        image: (H, W) float32 in [-1, 1] (see :func:`hu_to_unit`).
        semantic_map: (H, W) uint8, labels 0..7.
        nodule_mask: (H, W) uint8, 0 outside nodules, k inside ``nodules[k - 1]``.
        lung_mask: (H, W) bool lung fields.
        spacing_mm: pixel spacing.
        nodules: one dict of features per nodule (ratings, centre, size, source ids).
        source: where the slice comes from (phantom index, or LIDC scan and slice).

    Example:
        >>> import numpy as np
        >>> case = PreparedCase("c0", "p0", np.zeros((8, 8), np.float32), np.zeros((8, 8), np.uint8),
        ...                     np.zeros((8, 8), np.uint8), np.zeros((8, 8), bool), 0.7)
        >>> case.case_id
        'c0'
    """

    case_id: str
    patient_id: str
    image: np.ndarray
    semantic_map: np.ndarray
    nodule_mask: np.ndarray
    lung_mask: np.ndarray
    spacing_mm: float
    nodules: list[dict] = field(default_factory=list)
    source: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        shapes = {a.shape for a in (self.image, self.semantic_map, self.nodule_mask, self.lung_mask)}
        if len(shapes) != 1 or self.image.ndim != 2:
            raise ValueError(f"case {self.case_id!r}: image and masks must be 2D of one shape, got {shapes}")
        present = int(self.nodule_mask.max(initial=0))
        if present > len(self.nodules):
            raise ValueError(f"case {self.case_id!r}: nodule_mask has nodule {present} but {len(self.nodules)} nodules")


def _atomic_write_bytes(path: Path, write) -> None:
    """Write through a temporary file in the same folder, then rename over ``path``."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            write(handle)
        os.chmod(tmp, 0o644)  # mkstemp makes 0600
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` atomically."""
    _atomic_write_bytes(Path(path), lambda handle: handle.write(text.encode("utf-8")))


def atomic_write_npz(path: Path, **arrays: np.ndarray) -> None:
    """Write ``arrays`` to a compressed ``.npz`` at ``path`` atomically."""
    _atomic_write_bytes(Path(path), lambda handle: np.savez_compressed(handle, **arrays))


def atomic_write_figure(path: Path, figure, dpi: int = 100) -> None:
    """Save a Matplotlib ``figure`` as PNG at ``path`` atomically (its folder made if missing)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _atomic_write_bytes(path, lambda handle: figure.savefig(handle, format="png", dpi=dpi))


def patient_wise_split(case_patients: pd.Series, fractions: dict[str, float], seed: int) -> dict[str, list[str]]:
    """Split case ids so that every patient's slices land in one split.

    Args:
        case_patients: patient id per case, indexed by case id.
        fractions: share of patients per split, e.g. ``{"train": 0.8, "validation": 0.1, "test": 0.1}``.
        seed: shuffles the patients.
    """
    if any(v < 0 for v in fractions.values()) or not np.isclose(sum(fractions.values()), 1.0):
        raise ValueError(f"split fractions must be >= 0 and sum to 1, got {fractions}")
    patients = np.array(sorted(case_patients.unique()))
    np.random.default_rng(seed).shuffle(patients)
    bounds = np.round(np.cumsum([0.0, *fractions.values()]) * len(patients)).astype(int)
    splits = {}
    for (name, _), low, high in zip(fractions.items(), bounds[:-1], bounds[1:]):
        chosen = set(patients[low:high])
        splits[name] = sorted(case_patients.index[case_patients.isin(chosen)])
    return splits


class PreparedDatasetWriter:
    """Writes a prepared dataset case by case, atomically, and resumes an interrupted run.

    Args:
        root: output folder (created if needed).
        settings: what makes this dataset (source, size, seed, ...); a folder made with other
            settings is refused, so two datasets never mix.

    Raises:
        NotADirectoryError: ``root`` is an existing file.
        DatasetMismatchError: ``root`` holds another dataset.

    Example:
        >>> writer = PreparedDatasetWriter("out", {"source": "phantom", "size": 64})  # doctest: +SKIP
        >>> writer.write(case); writer.finalize(seed=0)  # doctest: +SKIP
    """

    def __init__(self, root: str | Path, settings: dict[str, Any]) -> None:
        self.root = Path(root)
        if self.root.exists() and not self.root.is_dir():
            raise NotADirectoryError(f"output {str(root)!r} is a file, not a folder")
        self.settings = {"format": FORMAT, "version": VERSION, **settings}
        manifest = self.root / "dataset.json"
        if manifest.exists():
            existing = json.loads(manifest.read_text())
            if existing != json.loads(json.dumps(self.settings)):
                changed = sorted(k for k in set(existing) | set(self.settings)
                                 if existing.get(k) != json.loads(json.dumps(self.settings)).get(k))
                raise DatasetMismatchError(
                    f"output {str(root)!r} holds a different dataset (differs in {', '.join(changed)}); "
                    "choose another --out or remove it")
        elif self.root.exists() and any(self.root.iterdir()):
            raise DatasetMismatchError(f"output {str(root)!r} is a non-empty folder that is not a prepared dataset")
        for stale in (self.root / "cases").glob(".*.tmp"):
            stale.unlink()
        self._created = manifest.exists()

    def _create(self) -> None:
        """Make the folder and its manifest on the first write, so a run that fails early leaves nothing."""
        if not self._created:
            (self.root / "cases").mkdir(parents=True, exist_ok=True)
            atomic_write_text(self.root / "dataset.json", json.dumps(self.settings, indent=2, sort_keys=True))
            self._created = True

    def case_path(self, case_id: str) -> Path:
        return self.root / "cases" / f"{case_id}.npz"

    def has(self, case_id: str) -> bool:
        """Whether a whole case file is already written (a rerun skips it)."""
        return self.case_path(case_id).exists()

    def write(self, case: PreparedCase) -> None:
        """Write one case atomically."""
        self._create()
        meta = {"case_id": case.case_id, "patient_id": case.patient_id, "spacing_mm": float(case.spacing_mm),
                "source": case.source, "nodules": case.nodules}
        arrays = dict(image=case.image.astype(np.float32), semantic_map=case.semantic_map.astype(np.uint8),
                      nodule_mask=case.nodule_mask.astype(np.uint8), lung_mask=case.lung_mask.astype(bool),
                      spacing_mm=np.float32(case.spacing_mm), meta=np.array(json.dumps(meta, default=float)))
        _atomic_write_bytes(self.case_path(case.case_id), lambda handle: np.savez_compressed(handle, **arrays))

    def finalize(self, fractions: dict[str, float] | None = None, seed: int = 0) -> PreparedDataset:
        """Rebuild ``cases.csv``, ``features.csv`` and ``splits.json`` from the case files."""
        fractions = fractions or {"train": 0.8, "validation": 0.1, "test": 0.1}
        self._create()
        metas = [_read_meta(path) for path in sorted((self.root / "cases").glob("*.npz"))]
        case_rows = [{"case_id": m["case_id"], "patient_id": m["patient_id"], "spacing_mm": m["spacing_mm"],
                      "n_nodules": len(m["nodules"]), **{f"source_{k}": v for k, v in m["source"].items()}}
                     for m in metas]
        cases = pd.DataFrame(case_rows, columns=None if case_rows else ["case_id", "patient_id", "spacing_mm", "n_nodules"])
        splits = patient_wise_split(cases.set_index("case_id").patient_id, fractions, seed) if len(cases) else {
            name: [] for name in fractions}
        split_of = {case_id: name for name, ids in splits.items() for case_id in ids}
        cases.insert(2, "split", cases.case_id.map(split_of))
        feature_rows = [{"case_id": m["case_id"], "patient_id": m["patient_id"], "nodule_index": i + 1, **nodule}
                        for m in metas for i, nodule in enumerate(m["nodules"])]
        features = pd.DataFrame(feature_rows, columns=None if feature_rows else ["case_id", "patient_id", "nodule_index"])
        atomic_write_text(self.root / "cases.csv", cases.to_csv(index=False))
        atomic_write_text(self.root / "features.csv", features.to_csv(index=False))
        atomic_write_text(self.root / "splits.json", json.dumps(splits, indent=1))
        return PreparedDataset(self.root)


def _read_meta(path: Path) -> dict:
    with np.load(path, allow_pickle=False) as data:
        return json.loads(str(data["meta"]))


class PreparedDataset:
    """Reads a prepared dataset folder (see the module docstring for the layout).

    Args:
        root: the folder ``lsdm-aug prepare`` wrote.
        split: ``None`` for every case, or one of ``train``, ``validation``, ``test``.

    Raises:
        DatasetMismatchError: ``root`` is not a finished prepared dataset.

    Example:
        >>> train = PreparedDataset("prepared/phantom-128", split="train")  # doctest: +SKIP
        >>> item = train[0]; sorted(item)[:3]  # doctest: +SKIP
        ['case_id', 'image', 'lung_mask']
    """

    def __init__(self, root: str | Path, split: str | None = None) -> None:
        self.root = Path(root)
        manifest = self.root / "dataset.json"
        if not manifest.is_file() or not (self.root / "cases.csv").is_file():
            raise DatasetMismatchError(f"{str(root)!r} is not a prepared dataset (no dataset.json and cases.csv)")
        self.settings = json.loads(manifest.read_text())
        if self.settings.get("format") != FORMAT:
            raise DatasetMismatchError(f"{str(root)!r} has format {self.settings.get('format')!r}, expected {FORMAT!r}")
        self.splits: dict[str, list[str]] = json.loads((self.root / "splits.json").read_text())
        cases = pd.read_csv(self.root / "cases.csv", dtype={"case_id": str, "patient_id": str})
        features = pd.read_csv(self.root / "features.csv", dtype={"case_id": str, "patient_id": str})
        if split is not None:
            if split not in self.splits:
                raise ValueError(f"split must be one of {sorted(self.splits)}, got {split!r}")
            cases = cases[cases.split == split]
            features = features[features.case_id.isin(set(cases.case_id))]
        self.cases = cases.reset_index(drop=True)
        self.features = features.reset_index(drop=True)

    def __len__(self) -> int:
        return len(self.cases)

    def case_ids(self) -> list[str]:
        return self.cases.case_id.tolist()

    def __getitem__(self, key: int | str) -> dict[str, Any]:
        case_id = self.cases.case_id.iloc[key] if isinstance(key, (int, np.integer)) else key
        path = self.root / "cases" / f"{case_id}.npz"
        if not path.is_file():
            raise KeyError(f"case {case_id!r} is not in {str(self.root)!r}")
        with np.load(path, allow_pickle=False) as data:
            item = {name: data[name] for name in ("image", "semantic_map", "nodule_mask", "lung_mask")}
            meta = json.loads(str(data["meta"]))
        item.update(case_id=case_id, patient_id=meta["patient_id"], spacing_mm=meta["spacing_mm"],
                    nodules=meta["nodules"], source=meta["source"])
        return item

    def __iter__(self) -> Iterable[dict[str, Any]]:
        for i in range(len(self)):
            yield self[i]
