"""Building a nodule bank (``lsdm-aug bank build``): the cases of a synthesis request, one LSDM nodule each,
kept as square patches (a quarter of the slice side) around the nodule in shards that
:class:`lsdm_aug.bank.NoduleBank` reads.

``build_bank`` runs the same cases as ``lsdm-aug synthesize`` (case ``i`` of a request: its features,
background and seed). A shard counts once its CSV exists; both of its files are written atomically, so an
interrupted build continues where it stopped.

Example:
    >>> bank = build_bank("banks/malignant", SynthesisRequest(count=256, features={"malignancy": (4, 5)}))  # doctest: +SKIP
    >>> len(bank)  # doctest: +SKIP
    256
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from scipy import ndimage

from lsdm_aug.bank.store import BANK_FORMAT, BANK_VERSION, NoduleBank
from lsdm_aug.data.prepared import DatasetMismatchError, atomic_write_npz, atomic_write_text
from lsdm_aug.progress import make_progress
from lsdm_aug.synthesis.dataset import SynthesisRequest, differing_keys, recorded_request, synthesize_group
from lsdm_aug.transforms.core import load_pipeline

__all__ = ["build_bank"]


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
    return json.loads(json.dumps({"format": BANK_FORMAT, "version": BANK_VERSION, "patch_px": request.size // 4,
                                  "shard_size": shard_size, "request": asdict(request)}))


def _open(out_dir: Path, settings: dict[str, Any]) -> None:
    if out_dir.exists() and not out_dir.is_dir():
        raise NotADirectoryError(f"--out {str(out_dir)!r} is a file, not a folder")
    manifest = out_dir / "bank.json"
    if manifest.is_file():
        existing = json.loads(manifest.read_text())
        existing.pop("model", None), existing.pop("spacing_mm", None)
        recorded = recorded_request(existing.pop("request", None) or {})
        differs = (differing_keys(existing, {k: v for k, v in settings.items() if k != "request"})
                   + differing_keys(recorded, settings["request"], "request."))
        if differs:
            raise DatasetMismatchError(f"--out {str(out_dir)!r} holds a different nodule bank (differs in "
                                       f"{', '.join(differs)}); choose another folder or delete this one")
    elif out_dir.exists() and any(out_dir.iterdir()):
        raise DatasetMismatchError(f"--out {str(out_dir)!r} is a non-empty folder that is not a nodule bank")


def _write_shard(out_dir: Path, shard: int, indices: list[int], request: SynthesisRequest, device: str | None,
                 batch_size: int, patch_px: int, advance) -> float:
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
    out_dir, settings = Path(out_dir), _settings(request, shard_size)
    _open(out_dir, settings)
    request.balanced_levels()
    shards = [list(range(s, min(s + shard_size, request.count))) for s in range(0, request.count, shard_size)]
    todo = [k for k in range(len(shards)) if not (out_dir / "shards" / f"shard_{k:05d}.csv").is_file()]
    if not todo and (out_dir / "bank.json").is_file():
        return NoduleBank(out_dir)  # finished: the model is not loaded again
    model_id = load_pipeline(request.model, device).model_id  # a bad model fails before anything is written
    (out_dir / "shards").mkdir(parents=True, exist_ok=True)
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
