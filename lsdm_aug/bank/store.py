"""Reading a nodule bank: patches of slices with a nodule inserted by the LSDM pipeline, and their masks.

Banks are built by :func:`lsdm_aug.synthesis.build_bank` (``lsdm-aug bank build``), which runs the same cases
as ``lsdm-aug synthesize`` and keeps a square patch (a quarter of the slice side) around each nodule.
Layout: ``bank.json`` (format, request, patch size, spacing, model), ``shards/shard_NNNNN.npz``
(``patches`` in HU as int16, ``masks`` as uint8) and ``shards/shard_NNNNN.csv`` (one row per entry:
features asked, source LIDC nodule and its ratings, area, seed). A shard counts once its CSV exists;
both files are written atomically, so an interrupted build continues where it stopped.

Example:
    >>> bank = NoduleBank("banks/malignant")  # doctest: +SKIP
    >>> entry = bank.entry(bank.choose({"malignancy": 5}, np.random.RandomState(0)))  # doctest: +SKIP
    >>> entry.patch_hu.shape, entry.mask.sum()  # doctest: +SKIP
    ((32, 32), 14)
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from lsdm_aug.config import CONDITIONING_FEATURES

__all__ = ["NoduleBank", "BankEntry", "BANK_FORMAT", "BANK_VERSION"]

BANK_FORMAT = "lsdm-aug-nodule-bank"
BANK_VERSION = 1


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
        return {n: float(self.row[f"{n}_asked"]) for n in CONDITIONING_FEATURES if pd.notna(self.row.get(f"{n}_asked"))}


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
        if self.settings.get("format") != BANK_FORMAT or self.settings.get("version") != BANK_VERSION:
            raise ValueError(f"bank {str(path)!r} has format {self.settings.get('format')!r} version "
                             f"{self.settings.get('version')!r}; expected {BANK_FORMAT!r} version {BANK_VERSION}")
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
