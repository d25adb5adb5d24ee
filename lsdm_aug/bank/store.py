"""A nodule bank on disk: patches of slices with a nodule inserted by the LSDM pipeline, and their masks.

``build_bank`` runs the same cases as ``lsdm-aug synthesize`` (case ``i`` of a request: its features,
background and seed) and keeps a square patch (a quarter of the slice side) around each nodule.
Layout: ``bank.json`` (format, request, patch size, spacing, model), ``shards/shard_NNNNN.npz``
(``patches`` in HU as int16, ``masks`` as uint8) and ``shards/shard_NNNNN.csv`` (one row per entry:
features asked, source LIDC nodule and its ratings, area, seed). A shard counts once its CSV exists;
both files are written atomically, so an interrupted build continues where it stopped.

Example:
    >>> bank = build_bank("banks/malignant", SynthesisRequest(count=256, features={"malignancy": (4, 5)}))  # doctest: +SKIP
    >>> entry = bank.entry(bank.choose({"malignancy": 5}, np.random.RandomState(0)))  # doctest: +SKIP
    >>> entry.patch_hu.shape, entry.mask.sum()  # doctest: +SKIP
    ((32, 32), 14)
"""

from __future__ import annotations

import functools
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
from scipy import ndimage

from lsdm_aug.config import FEATURES
from lsdm_aug.data.prepared import DatasetMismatchError, atomic_write_npz, atomic_write_text
from lsdm_aug.progress import make_progress

if TYPE_CHECKING:
    from lsdm_aug.synthesis.dataset import SynthesisRequest

__all__ = ["NoduleBank", "BankEntry", "build_bank", "BANK_FORMAT"]

BANK_FORMAT = "lsdm-aug-nodule-bank"
VERSION = 1


@dataclass(frozen=True)
class BankEntry:
    """One banked nodule: a patch in HU centred on it, its mask, the pixel spacing and the manifest row.

    Example:
        >>> entry = NoduleBank("banks/phantom-128").entry(0)  # doctest: +SKIP
        >>> entry.features, entry.patch_hu[entry.mask].mean()  # doctest: +SKIP
    """

    index: int
    patch_hu: np.ndarray
    mask: np.ndarray
    spacing_mm: float
    row: dict[str, Any] = field(default_factory=dict)

    @property
    def features(self) -> dict[str, float]:
        """The feature values the nodule was generated with."""
        return {n: float(self.row[f"{n}_asked"]) for n in FEATURES if pd.notna(self.row.get(f"{n}_asked"))}


def _patch(image: np.ndarray, label: np.ndarray, centre: tuple[float, float], size: int) -> tuple[np.ndarray, np.ndarray]:
    """The ``size`` x ``size`` window of image and label around ``centre``, moved inside the slice."""
    top = int(np.clip(round(centre[0] - size / 2), 0, image.shape[0] - size))
    left = int(np.clip(round(centre[1] - size / 2), 0, image.shape[1] - size))
    window = (slice(top, top + size), slice(left, left + size))
    return image[window], label[window]


def _component_at(label: np.ndarray, centre: tuple[float, float]) -> np.ndarray:
    """The labelled nodule nearest ``centre`` (a ``--from`` background may hold others)."""
    components, count = ndimage.label(label > 0)
    if count <= 1:
        return label > 0
    points = np.argwhere(components > 0)
    nearest = points[np.argmin(((points - np.asarray(centre)) ** 2).sum(axis=1))]
    return components == components[tuple(nearest)]


def _settings(request: SynthesisRequest, shard_size: int) -> dict[str, Any]:
    return json.loads(json.dumps({"format": BANK_FORMAT, "version": VERSION, "patch_px": request.size // 4,
                                  "shard_size": shard_size, "request": asdict(request)}))


def _open(out_dir: Path, settings: dict[str, Any]) -> None:
    if out_dir.exists() and not out_dir.is_dir():
        raise NotADirectoryError(f"--out {str(out_dir)!r} is a file, not a folder")
    manifest = out_dir / "bank.json"
    if manifest.is_file():
        existing = json.loads(manifest.read_text())
        existing.pop("model", None), existing.pop("spacing_mm", None)
        if existing != settings:
            raise DatasetMismatchError(f"--out {str(out_dir)!r} holds a different nodule bank; choose another --out")
    elif out_dir.exists() and any(out_dir.iterdir()):
        raise DatasetMismatchError(f"--out {str(out_dir)!r} is a non-empty folder that is not a nodule bank")


def _write_shard(out_dir: Path, shard: int, indices: list[int], request: SynthesisRequest, device: str | None,
                 batch_size: int, patch_px: int, advance) -> float:
    from lsdm_aug.synthesis.dataset import synthesize_group

    patches, masks, rows, spacing = [], [], [], 0.0
    for start in range(0, len(indices), batch_size):
        for image, label, spacings, row in synthesize_group(request, indices[start:start + batch_size], device):
            patch, mask = _patch(image, _component_at(label, (row["centre_row"], row["centre_col"])),
                                 (row["centre_row"], row["centre_col"]), patch_px)
            patches.append(np.round(patch).astype(np.int16))
            masks.append(mask.astype(np.uint8))
            rows.append({"entry": row["case_id"], **row, "area_px": int(mask.sum()), "spacing_mm": spacings[0]})
            spacing = float(spacings[0])
            advance()
    folder = out_dir / "shards"
    atomic_write_npz(folder / f"shard_{shard:05d}.npz", patches=np.stack(patches), masks=np.stack(masks))
    atomic_write_text(folder / f"shard_{shard:05d}.csv", pd.DataFrame(rows).to_csv(index=False))
    return spacing


def build_bank(out_dir: str | Path, request: SynthesisRequest, device: str | None = None, batch_size: int = 1,
               shard_size: int = 64, progress: bool = False) -> NoduleBank:
    """Build (or finish) the nodule bank of ``request`` (one nodule per entry) in ``out_dir``.

    Raises:
        ValueError: bad request values; more than one nodule per slice.
        DatasetMismatchError: ``out_dir`` holds something else.
        CheckpointError: unknown model name or a broken model.
    """
    if request.nodules_per_slice != 1:
        raise ValueError(f"a bank holds one nodule per entry, got nodules_per_slice={request.nodules_per_slice}")
    if batch_size < 1 or shard_size < 1:
        raise ValueError(f"batch size and shard size must be >= 1, got {batch_size} and {shard_size}")
    from lsdm_aug.transforms.core import load_pipeline

    out_dir, settings = Path(out_dir), _settings(request, shard_size)
    _open(out_dir, settings)
    model_id = load_pipeline(request.model, device).model_id  # a bad model fails before anything is written
    request.balanced_levels()
    (out_dir / "shards").mkdir(parents=True, exist_ok=True)
    shards = [list(range(s, min(s + shard_size, request.count))) for s in range(0, request.count, shard_size)]
    todo = [k for k in range(len(shards)) if not (out_dir / "shards" / f"shard_{k:05d}.csv").is_file()]
    with make_progress() as bar:
        task = bar.add_task("building nodule bank", total=request.count,
                            completed=request.count - sum(len(shards[k]) for k in todo), rate="", visible=progress)
        spacing = None
        for k in todo:
            spacing = _write_shard(out_dir, k, shards[k], request, device, batch_size, settings["patch_px"],
                                   lambda: bar.update(task, advance=1))
    if spacing is None:
        spacing = float(pd.read_csv(out_dir / "shards" / "shard_00000.csv").spacing_mm.iloc[0])
    atomic_write_text(out_dir / "bank.json", json.dumps({**settings, "model": model_id, "spacing_mm": spacing},
                                                        indent=1))
    return NoduleBank(out_dir)


class NoduleBank:
    """A nodule bank written by :func:`build_bank` (``lsdm-aug bank build``).

    Args:
        path: the bank folder.

    Example:
        >>> bank = NoduleBank("banks/phantom-128")  # doctest: +SKIP
        >>> len(bank), bank.table.malignancy_asked.value_counts()  # doctest: +SKIP
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        manifest = self.path / "bank.json"
        if not manifest.is_file():
            raise FileNotFoundError(f"bank {str(path)!r} is not a nodule bank (no bank.json); build one with "
                                    "`lsdm-aug bank build`")
        self.settings = json.loads(manifest.read_text())
        if self.settings.get("format") != BANK_FORMAT or self.settings.get("version") != VERSION:
            raise ValueError(f"bank {str(path)!r} has format {self.settings.get('format')!r} version "
                             f"{self.settings.get('version')!r}; expected {BANK_FORMAT!r} version {VERSION}")
        shards = sorted((self.path / "shards").glob("shard_*.csv"))
        self.table = pd.concat([pd.read_csv(p).assign(shard=p.stem) for p in shards], ignore_index=True)
        self.table["position"] = self.table.groupby("shard").cumcount()
        if len(self.table) != self.settings["request"]["count"]:
            raise ValueError(f"bank {str(path)!r} is incomplete: {len(self.table)} of "
                             f"{self.settings['request']['count']} entries; rerun `lsdm-aug bank build`")
        self.spacing_mm = float(self.settings["spacing_mm"])

    def __len__(self) -> int:
        return len(self.table)

    @functools.lru_cache(maxsize=8)
    def _shard(self, name: str) -> tuple[np.ndarray, np.ndarray]:
        with np.load(self.path / "shards" / f"{name}.npz", allow_pickle=False) as arrays:
            return arrays["patches"], arrays["masks"]

    def entry(self, index: int) -> BankEntry:
        """Entry ``index`` (0 .. len - 1)."""
        if not 0 <= index < len(self):
            raise IndexError(f"bank entry must be in 0..{len(self) - 1}, got {index}")
        row = self.table.iloc[index]
        patches, masks = self._shard(row["shard"])
        position = int(row["position"])
        return BankEntry(index, patches[position].astype(np.float32), masks[position] > 0, float(row.spacing_mm),
                         row.to_dict())

    def choose(self, features: dict[str, float], rng: np.random.RandomState) -> int:
        """A random entry generated with ``features``; when none matches exactly, one of the nearest (summed
        level distance, a feature the bank did not ask counting 5)."""
        distance = np.zeros(len(self))
        for name, value in features.items():
            asked = self.table.get(f"{name}_asked", pd.Series(np.nan, index=self.table.index)).to_numpy(float)
            distance += np.where(np.isnan(asked), 5.0, np.abs(asked - float(value)))
        nearest = np.flatnonzero(distance == distance.min())
        return int(nearest[rng.randint(len(nearest))])
