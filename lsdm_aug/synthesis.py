"""``lsdm-aug synthesize``: a balanced synthetic nodule dataset that nnU-Net v2 reads as it is.

Each case is a background slice (a new phantom slice, or a slice of an existing prepared or
nnU-Net dataset) with nodules inserted by the LSDM pipeline at requested feature values. Case
``i`` depends only on the request and ``i``: its features (balanced over the requested levels),
its background and its seed, so the same request gives the same dataset, and an interrupted run
continues where it stopped. A case counts as written once its manifest row is; the image and label
are written (atomically) before it.

Layout: ``imagesTr/``, ``labelsTr/``, ``dataset.json`` (nnU-Net), ``manifest.csv`` (one row per case:
features asked, the source LIDC nodule and its ratings, centre, size, seed, background, model) and
``.lsdm-aug/`` (the request and one row file per finished case).

Example:
    >>> request = SynthesisRequest(count=100, features={"malignancy": 4})
    >>> synthesize("Dataset501_Malignant", request)  # doctest: +SKIP
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from lsdm_aug.config import FEATURES
from lsdm_aug.data.lidc import RATING_NAMES
from lsdm_aug.data.nnunet_format import case_paths, read_case, write_case, write_dataset_json
from lsdm_aug.data.phantom import SUPPORTED_SIZES, ChestPhantom, PhantomConfig
from lsdm_aug.data.prepared import DatasetMismatchError, PreparedDataset, atomic_write_text, unit_to_hu
from lsdm_aug.progress import track_progress
from lsdm_aug.transforms.core import NoduleSynthesizer, usable_nodule_table, load_pipeline, parse_feature

__all__ = ["SynthesisRequest", "synthesize", "case_features", "parse_level_option"]

STATE_DIR = ".lsdm-aug"


def parse_level_option(name: str, text: str | None) -> int | tuple[int, int] | None:
    """A CLI feature option: "4", "3-5" or "3..5" (None when omitted)."""
    if text is None or text == "":
        return None
    parts = text.replace("..", "-").split("-")
    try:
        values = [int(p) for p in parts]
    except ValueError:
        raise ValueError(f"--{name} must be a level 1..5 or a range like 3-5, got {text!r}") from None
    value: Any = values[0] if len(values) == 1 else tuple(values)
    try:
        return parse_feature(name, value)
    except ValueError:
        raise ValueError(f"--{name} must be a level 1..5 or a range like 3-5 within 1..5, got {text!r}") from None


@dataclass(frozen=True)
class SynthesisRequest:
    """What to synthesize.

    Args:
        count: number of cases, > 0.
        features: feature -> a level 1..5, a (low, high) range (spread evenly), or absent.
        balance: features whose levels (1..5, or their range) get equal counts; with no feature
            given at all, malignancy is balanced over 1..5.
        size: phantom slice size (64, 128, 256, 512).
        seed: master seed.
        guidance_scale, steps: diffusion settings.
        nodules_per_slice: nodules inserted per case.
        model: "default" or a model folder.
        source: None for new phantom slices, else a prepared or nnU-Net dataset folder.
    """

    count: int
    features: dict[str, Any] = field(default_factory=dict)
    balance: tuple[str, ...] = ()
    size: int = 128
    seed: int = 0
    guidance_scale: float = 1.0
    steps: int = 25
    nodules_per_slice: int = 1
    model: str = "default"
    source: str | None = None

    def __post_init__(self) -> None:
        if self.count <= 0:
            raise ValueError(f"count must be > 0, got {self.count!r}")
        if self.size not in SUPPORTED_SIZES:
            raise ValueError(f"size must be one of {SUPPORTED_SIZES}, got {self.size!r}")
        if self.nodules_per_slice < 1:
            raise ValueError(f"nodules per slice must be >= 1, got {self.nodules_per_slice!r}")
        for name in [*self.features, *self.balance]:
            if name not in FEATURES:
                raise ValueError(f"feature must be one of {FEATURES}, got {name!r}")
        for name, value in self.features.items():
            parse_feature(name, value)

    def balanced_levels(self) -> dict[str, list[int]]:
        """Feature -> the levels spread evenly over the cases."""
        names = list(self.balance) + [n for n, v in self.features.items() if isinstance(v, tuple) and n not in self.balance]
        if not names and not self.features:
            names = ["malignancy"]
        levels = {}
        for name in names:
            value = self.features.get(name)
            if isinstance(value, int):
                raise ValueError(f"--balance {name} needs a range or nothing, but {name} is fixed at {value}")
            low, high = value if isinstance(value, tuple) else (1, 5)
            levels[name] = list(range(low, high + 1))
        return levels


def case_features(request: SynthesisRequest, index: int) -> dict[str, float]:
    """The features asked for case ``index``: fixed values plus its combination of balanced levels."""
    levels = request.balanced_levels()
    combinations = list(itertools.product(*levels.values()))
    order = np.random.default_rng([request.seed, 77]).permutation(len(combinations))
    chosen = dict(zip(levels, combinations[order[index % len(combinations)]])) if levels else {}
    fixed = {n: v for n, v in request.features.items() if isinstance(v, int)}
    return {name: float(v) for name, v in {**fixed, **chosen}.items()}


class _Backgrounds:
    """Background slice ``i`` (HU, existing label, spacing, description) from the phantom or a dataset."""

    def __init__(self, request: SynthesisRequest) -> None:
        self.request = request
        self.phantom = ChestPhantom(PhantomConfig(size=request.size, nodule_free_fraction=1.0))
        self.prepared = self.nnunet_cases = None
        if request.source is not None:
            root = Path(request.source)
            manifest = root / "dataset.json"
            if not manifest.is_file():
                raise DatasetMismatchError(f"--from {str(root)!r} is not a dataset (no dataset.json)")
            if "channel_names" in json.loads(manifest.read_text()):
                self.nnunet_cases = sorted(p.name[:-len("_0000.nii.gz")] for p in (root / "imagesTr").glob("*_0000.nii.gz"))
                if not self.nnunet_cases:
                    raise DatasetMismatchError(f"--from {str(root)!r} is an nnU-Net dataset without imagesTr cases")
            else:
                self.prepared = PreparedDataset(root)
                if len(self.prepared) == 0:
                    raise DatasetMismatchError(f"--from {str(root)!r} is a prepared dataset without cases")

    def __call__(self, index: int) -> tuple[np.ndarray, np.ndarray, tuple[float, float], str]:
        if self.prepared is not None:
            case = self.prepared[index % len(self.prepared)]
            label = (case["nodule_mask"] > 0).astype(np.uint8)
            return unit_to_hu(case["image"]), label, (case["spacing_mm"],) * 2, case["case_id"]
        if self.nnunet_cases is not None:
            case_id = self.nnunet_cases[index % len(self.nnunet_cases)]
            image, label, spacing = read_case(self.request.source, case_id)
            return image.astype(np.float32), (label > 0).astype(np.uint8), spacing[:2], case_id
        ct = self.phantom.slice(index, seed=self.request.seed)
        return ct.hu, np.zeros(ct.hu.shape, np.uint8), (ct.spacing_mm, ct.spacing_mm), f"phantom:{index}"


def _case_id(index: int) -> str:
    return f"lsdm_{index:06d}"


def _settings(request: SynthesisRequest) -> dict[str, Any]:
    return json.loads(json.dumps({"format": "lsdm-aug-synthetic", "version": 1, **asdict(request)}))


def _open(out_dir: Path, request: SynthesisRequest) -> None:
    """Refuse a folder holding something else; remember the request; drop temporary files of a killed run."""
    if out_dir.exists() and not out_dir.is_dir():
        raise NotADirectoryError(f"--out {str(out_dir)!r} is a file, not a folder")
    settings_path = out_dir / STATE_DIR / "settings.json"
    if settings_path.is_file():
        existing = json.loads(settings_path.read_text())
        if existing != _settings(request):
            changed = sorted(k for k in set(existing) | set(_settings(request)) if existing.get(k) != _settings(request).get(k))
            raise DatasetMismatchError(f"--out {str(out_dir)!r} holds a different synthetic dataset "
                                       f"(differs in {', '.join(changed)}); choose another --out")
    elif out_dir.exists() and any(out_dir.iterdir()):
        raise DatasetMismatchError(f"--out {str(out_dir)!r} is a non-empty folder that is not an lsdm-aug synthetic dataset")


def _pending(out_dir: Path, request: SynthesisRequest) -> list[int]:
    rows = out_dir / STATE_DIR / "rows"
    return [i for i in range(request.count) if not (rows / f"{_case_id(i)}.json").is_file()]


def _synthesize_case(request: SynthesisRequest, backgrounds: _Backgrounds, index: int,
                     device: str | None) -> tuple[np.ndarray, np.ndarray, tuple[float, float], dict]:
    """Case ``index``: its background with the requested nodules inserted, and its manifest row."""
    features = case_features(request, index)
    spec = {name: int(features[name]) if name in features else None for name in FEATURES}
    synthesizer = NoduleSynthesizer(mode="insert", **spec, guidance_scale=request.guidance_scale, steps=request.steps,
                                    label_value=1, device=device, model=request.model)
    for attempt in range(8):  # a background without room in the lung: the next candidate, deterministically
        background_index = index + attempt * request.count
        image, label, spacing, background = backgrounds(background_index)
        placed = []
        for n in range(request.nodules_per_slice):
            rng = np.random.RandomState(np.random.SeedSequence([request.seed, index, attempt, n]).generate_state(1)[0])
            params = synthesizer.draw(image, label, rng, spacing)
            if params.skipped:
                break
            image, label, info = synthesizer.apply(image, label, params, spacing)
            placed.append(info)
        if len(placed) == request.nodules_per_slice:
            row = _row(request, index, features, placed, background)
            row["model"] = load_pipeline(request.model, device).model_id
            return image, label, spacing, row
    raise RuntimeError(f"case {index}: no background with room for {request.nodules_per_slice} nodule(s) in the lung")


def _row(request: SynthesisRequest, index: int, features: dict, placed: list[dict], background: str) -> dict:
    table = usable_nodule_table().set_index("nodule_id")
    first = placed[0]
    source = table.loc[first["nodule_id"]]
    row = {"case_id": _case_id(index), **{f"{name}_asked": features.get(name) for name in FEATURES},
           "source_nodule_id": first["nodule_id"],
           **{f"source_{name}": float(source[name]) for name in RATING_NAMES},
           "source_diameter_mm": float(source.diameter_mm), "centre_row": first["centre"][0],
           "centre_col": first["centre"][1], "changed_pixels": sum(p["changed_pixels"] for p in placed),
           "nodules": len(placed), "seed": first["seed"], "background": background,
           "guidance_scale": request.guidance_scale,
           "steps": request.steps}
    return row


def _cases(out_dir: Path, request: SynthesisRequest, backgrounds: _Backgrounds, device: str | None,
           progress: bool) -> Iterator[str]:
    rows = out_dir / STATE_DIR / "rows"
    for index in track_progress(_pending(out_dir, request), "synthesizing cases", enabled=progress):
        image, label, spacing, row = _synthesize_case(request, backgrounds, index, device)
        row["area_px"] = int(label.sum())
        write_case(out_dir, _case_id(index), image, label, spacing)
        atomic_write_text(rows / f"{_case_id(index)}.json", json.dumps(row, default=float))
        yield _case_id(index)


def synthesize(out_dir: str | Path, request: SynthesisRequest, device: str | None = None,
               progress: bool = False) -> pd.DataFrame:
    """Write (or finish) the synthetic dataset of ``request`` in ``out_dir``; returns the manifest.

    Raises:
        ValueError: bad request values (the message names them).
        DatasetMismatchError: ``out_dir`` holds something else, or ``source`` is not a dataset.
        CheckpointError: unknown model name or a broken model.
    """
    out_dir = Path(out_dir)
    _open(out_dir, request)
    load_pipeline(request.model, device)  # fail on a bad model before writing anything
    backgrounds = _Backgrounds(request)  # ... and on a bad --from
    (out_dir / STATE_DIR / "rows").mkdir(parents=True, exist_ok=True)
    atomic_write_text(out_dir / STATE_DIR / "settings.json", json.dumps(_settings(request), indent=1))
    for folder in ("imagesTr", "labelsTr"):
        for stale in (out_dir / folder).glob(".*.nii.gz"):
            stale.unlink()
    for _ in _cases(out_dir, request, backgrounds, device, progress):
        pass
    rows = [json.loads((out_dir / STATE_DIR / "rows" / f"{_case_id(i)}.json").read_text()) for i in range(request.count)]
    manifest = pd.DataFrame(rows)
    atomic_write_text(out_dir / "manifest.csv", manifest.to_csv(index=False))
    write_dataset_json(out_dir, request.count, description=f"lsdm-aug synthesize, {request.count} cases")
    for case_id in manifest.case_id:
        image_path, label_path = case_paths(out_dir, case_id)
        if not image_path.is_file() or not label_path.is_file():
            raise RuntimeError(f"case {case_id} has a manifest row but no image or label")
    return manifest
