"""``lsdm-aug synthesize``: a balanced synthetic nodule dataset that nnU-Net v2 reads as it is.

Each case is a background slice (a new phantom slice, or a slice of an existing prepared or
nnU-Net dataset) with nodules inserted by the LSDM pipeline at requested feature values. Case
``i`` depends only on the request and ``i``: its features (balanced over the requested levels),
its background and its seed, so the same request gives the same dataset, and an interrupted run
continues where it stopped. A case counts as written once its manifest row is; the image and label
are written (atomically) before it.

Layout: ``imagesTr/``, ``labelsTr/``, ``dataset.json`` (nnU-Net), ``manifest.csv`` (one row per case:
features asked, what the U-Net was told besides them (``texture_told``, ``calcification_told``: the outline's
real nodule's, :class:`~lsdm_aug.transforms.core.NoduleSynthesizer`'s ``appearance_from_outline``), the source
LIDC nodule and its ratings, centre, size, seed, background, model; the first nodule's when a case has more;
``redraws`` and ``saturated``: the pipeline's redraws of a saturated nodule told "not calcified" over the case's
nodules, and whether one was left saturated) and
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

from lsdm_aug.config import CONDITIONING_FEATURES, RATING_LEVELS
from lsdm_aug.data.lidc import RATING_NAMES
from lsdm_aug.data.nnunet_format import case_paths, read_case, write_case, write_dataset_json
from lsdm_aug.data.phantom import SUPPORTED_SIZES, ChestPhantom, PhantomConfig
from lsdm_aug.data.prepared import DatasetMismatchError, PreparedDataset, atomic_write_text, unit_to_hu
from lsdm_aug.progress import make_progress
from lsdm_aug.transforms.core import (APPEARANCE_FEATURES, NoduleSynthesizer, load_pipeline, parse_feature,
                                     usable_nodule)

__all__ = ["SynthesisRequest", "synthesize", "synthesize_group", "case_features", "parse_level_option", "CaseResult"]

STATE_DIR = ".lsdm-aug"


def parse_level_option(name: str, text: str | None) -> int | tuple[int, int] | None:
    """A CLI feature option: "4", "3-5" or "3..5" (None when omitted); levels 1..5, calcification 1..6."""
    if text is None or text == "":
        return None
    top = RATING_LEVELS.get(name, 5)
    parts = text.replace("..", "-").split("-")
    try:
        values = [int(p) for p in parts]
    except ValueError:
        raise ValueError(f"--{name} must be a level 1..{top} or a range like 3-5, got {text!r}") from None
    value: Any = values[0] if len(values) == 1 else tuple(values)
    try:
        return parse_feature(name, value)
    except ValueError:
        raise ValueError(f"--{name} must be a level 1..{top} or a range like 3-5 within 1..{top}, "
                         f"got {text!r}") from None


@dataclass(frozen=True)
class SynthesisRequest:
    """What to synthesize.

    Args:
        count: number of cases, > 0.
        features: feature -> a level 1..5 (calcification 1..6), a (low, high) range (spread evenly), or absent.
        balance: features whose levels (1..5 or 1..6, or their range) get equal counts; with no feature
            given at all, malignancy is balanced over 1..5.
        size: phantom slice size (64, 128, 256, 512).
        seed: master seed.
        guidance_scale, steps: diffusion settings.
        cfg_scale: classifier-free guidance scale (None: the model's default).
        nodules_per_slice: nodules inserted per case.
        model: "default" or a model folder.
        source: None for new phantom slices, else a prepared or nnU-Net dataset folder.
        appearance_from_outline: tell the U-Net the texture and calcification of each outline's real nodule
            when they are not requested (see :class:`~lsdm_aug.transforms.core.NoduleSynthesizer`); default True.
            A dataset or bank recorded before this setting existed was made with it off, and resumes only so.
    """

    count: int
    features: dict[str, Any] = field(default_factory=dict)
    balance: tuple[str, ...] = ()
    size: int = 512
    seed: int = 0
    guidance_scale: float = 1.0
    steps: int = 25
    cfg_scale: float | None = None
    nodules_per_slice: int = 1
    model: str = "default"
    source: str | None = None
    appearance_from_outline: bool = True

    def __post_init__(self) -> None:
        if not isinstance(self.appearance_from_outline, bool):
            raise ValueError(f"appearance_from_outline must be True or False, got {self.appearance_from_outline!r}")
        if self.count <= 0:
            raise ValueError(f"count must be > 0, got {self.count!r}")
        if self.size not in SUPPORTED_SIZES:
            raise ValueError(f"size must be one of {SUPPORTED_SIZES}, got {self.size!r}")
        if self.cfg_scale is not None and self.cfg_scale < 0:
            raise ValueError(f"cfg scale must be >= 0, got {self.cfg_scale!r}")
        if self.nodules_per_slice < 1:
            raise ValueError(f"nodules per slice must be >= 1, got {self.nodules_per_slice!r}")
        for name in [*self.features, *self.balance]:
            if name not in CONDITIONING_FEATURES:
                raise ValueError(f"feature must be one of {CONDITIONING_FEATURES}, got {name!r}")
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
            low, high = value if isinstance(value, tuple) else (1, RATING_LEVELS[name])
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


Background = tuple[np.ndarray, np.ndarray, tuple[float, float], str, "np.ndarray | None"]


class _Backgrounds:
    """Background slice ``i`` (HU, existing label, spacing, description, lung fields) from the phantom or a
    dataset. The phantom and prepared datasets know their lung fields, so the transforms need no K-means for
    them (an nnU-Net dataset gives None: K-means finds them)."""

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

    def __call__(self, index: int) -> Background:
        if self.prepared is not None:
            case = self.prepared[index % len(self.prepared)]
            label = (case["nodule_mask"] > 0).astype(np.uint8)
            return unit_to_hu(case["image"]), label, (case["spacing_mm"],) * 2, case["case_id"], case["lung_mask"]
        if self.nnunet_cases is not None:
            case_id = self.nnunet_cases[index % len(self.nnunet_cases)]
            image, label, spacing = read_case(self.request.source, case_id)
            return image.astype(np.float32), (label > 0).astype(np.uint8), spacing[:2], case_id, None
        ct = self.phantom.slice(index, seed=self.request.seed)
        return (ct.hu, np.zeros(ct.hu.shape, np.uint8), (ct.spacing_mm, ct.spacing_mm), f"phantom:{index}",
                ct.lung_mask)


def _case_id(index: int) -> str:
    return f"lsdm_{index:06d}"


def _settings(request: SynthesisRequest) -> dict[str, Any]:
    return json.loads(json.dumps({"format": "lsdm-aug-synthetic", "version": 1, **asdict(request)}))


# request settings added after folders were first written: what a record without them was made with
_EARLIER_REQUEST_DEFAULTS = {"appearance_from_outline": False}


def recorded_request(record: dict[str, Any]) -> dict[str, Any]:
    """A request as a dataset's or bank's record holds it, with the settings added since it was written filled in
    as they were then (so an older folder resumes under the settings that made it)."""
    return {**_EARLIER_REQUEST_DEFAULTS, **record}


def differing_keys(recorded: dict[str, Any], new: dict[str, Any], prefix: str = "") -> list[str]:
    """The keys (each with ``prefix``) whose values differ between a folder's record and a new request's, sorted.

    Example:
        >>> differing_keys({"count": 5, "seed": 0}, {"count": 6, "seed": 0, "steps": 2}, "request.")
        ['request.count', 'request.steps']
    """
    missing = object()  # a key one side lacks differs even from None
    return sorted(f"{prefix}{k}" for k in set(recorded) | set(new) if recorded.get(k, missing) != new.get(k, missing))


def _open(out_dir: Path, request: SynthesisRequest) -> None:
    """Refuse a folder holding something else; remember the request; drop temporary files of a killed run."""
    if out_dir.exists() and not out_dir.is_dir():
        raise NotADirectoryError(f"--out {str(out_dir)!r} is a file, not a folder")
    settings_path = out_dir / STATE_DIR / "settings.json"
    if settings_path.is_file():
        differs = differing_keys(recorded_request(json.loads(settings_path.read_text())), _settings(request))
        if differs:
            raise DatasetMismatchError(f"--out {str(out_dir)!r} holds a different synthetic dataset (differs in "
                                       f"{', '.join(differs)}); choose another folder or delete this one")
    elif out_dir.exists() and any(out_dir.iterdir()):
        raise DatasetMismatchError(f"--out {str(out_dir)!r} is a non-empty folder that is not an lsdm-aug synthetic dataset")


def _pending(out_dir: Path, request: SynthesisRequest) -> list[int]:
    rows = out_dir / STATE_DIR / "rows"
    return [i for i in range(request.count) if not (rows / f"{_case_id(i)}.json").is_file()]


@dataclass
class _CaseState:
    """One case being synthesized: its background attempt, the image so far and the nodules placed."""

    index: int
    features: dict[str, float]
    synthesizer: NoduleSynthesizer
    attempt: int = -1
    image: np.ndarray | None = None
    label: np.ndarray | None = None
    spacing: tuple[float, float] = (1.0, 1.0)
    background: str = ""
    lung: np.ndarray | None = None
    placed: list[dict] = field(default_factory=list)

    def next_background(self, request: SynthesisRequest, backgrounds: _Backgrounds) -> None:
        """Move to the next candidate background (deterministic: case index + attempt * count)."""
        self.attempt += 1
        if self.attempt >= MAX_BACKGROUND_ATTEMPTS:
            raise RuntimeError(f"case {self.index}: no background with room for {request.nodules_per_slice} "
                               "nodule(s) in the lung")
        self.image, self.label, self.spacing, self.background, self.lung = backgrounds(
            self.index + self.attempt * request.count)
        self.placed = []


MAX_BACKGROUND_ATTEMPTS = 8


def _new_case(request: SynthesisRequest, index: int, device: str | None) -> _CaseState:
    features = case_features(request, index)
    spec = {name: int(features[name]) if name in features else None for name in CONDITIONING_FEATURES}
    synthesizer = NoduleSynthesizer(mode="insert", **spec, guidance_scale=request.guidance_scale, steps=request.steps,
                                    label_value=1, device=device, model=request.model, cfg_scale=request.cfg_scale,
                                    appearance_from_outline=request.appearance_from_outline)
    return _CaseState(index, features, synthesizer)


CaseResult = tuple[np.ndarray, np.ndarray, tuple[float, float], dict]


def synthesize_group(request: SynthesisRequest, indices: list[int], device: str | None) -> list[CaseResult]:
    """Cases ``indices`` of ``request`` (what a Ray task runs): image, label, spacing and manifest row each."""
    return _synthesize_cases(request, _Backgrounds(request), indices, device)


def _synthesize_cases(request: SynthesisRequest, backgrounds: _Backgrounds, indices: list[int],
                      device: str | None) -> list[CaseResult]:
    """Cases ``indices``: each background with the requested nodules inserted, and its manifest row.

    The cases' insertions run as one diffusion batch per nodule; each case gets exactly what it gets alone.
    """
    cases = [_new_case(request, index, device) for index in indices]
    for case in cases:
        case.next_background(request, backgrounds)
    while True:
        pending = [c for c in cases if len(c.placed) < request.nodules_per_slice]
        if not pending:
            break
        drawn = []
        for case in pending:
            n = len(case.placed)
            seed = np.random.SeedSequence([request.seed, case.index, case.attempt, n]).generate_state(1)[0]
            params = case.synthesizer.draw(case.image, case.label, np.random.RandomState(seed), case.spacing,
                                           lung_mask=case.lung)
            if params.skipped:  # no room in this background's lung: start again on the next candidate
                case.next_background(request, backgrounds)
            else:
                drawn.append((case, params))
        if not drawn:
            continue
        applied = drawn[0][0].synthesizer.apply_batch([c.image for c, _ in drawn], [c.label for c, _ in drawn],
                                                      [p for _, p in drawn], [c.spacing for c, _ in drawn],
                                                      [c.lung for c, _ in drawn])
        for (case, _), (image, label, info) in zip(drawn, applied):
            case.image, case.label = image, label
            case.placed.append(info)
    model_id = load_pipeline(request.model, device).model_id
    return [(c.image, c.label, c.spacing, {**_row(request, c.index, c.features, c.placed, c.background),
                                           "model": model_id}) for c in cases]


def _row(request: SynthesisRequest, index: int, features: dict, placed: list[dict], background: str) -> dict:
    first = placed[0]
    source = usable_nodule(first["nodule_id"])
    row = {"case_id": _case_id(index), **{f"{name}_asked": features.get(name) for name in CONDITIONING_FEATURES},
           "source_nodule_id": first["nodule_id"],
           **{f"{name}_told": first.get("told", {}).get(name) for name in APPEARANCE_FEATURES},
           **{f"source_{name}": float(source[name]) for name in RATING_NAMES},
           "source_diameter_mm": float(source.diameter_mm), "centre_row": first["centre"][0],
           "centre_col": first["centre"][1], "changed_pixels": sum(p["changed_pixels"] for p in placed),
           "nodules": len(placed), "seed": first["seed"], "background": background,
           "guidance_scale": request.guidance_scale, "cfg_scale": request.cfg_scale,
           "outline_distance": first.get("outline_distance", 0.0), "steps": request.steps,
           "redraws": sum(p.get("redraws", 0) for p in placed),
           "saturated": any(p.get("saturated", False) for p in placed)}
    return row


def _cases(out_dir: Path, request: SynthesisRequest, backgrounds: _Backgrounds, device: str | None,
           batch_size: int, ray_address: str | None, progress: bool) -> Iterator[str]:
    rows = out_dir / STATE_DIR / "rows"
    pending = _pending(out_dir, request)
    groups = [pending[i:i + batch_size] for i in range(0, len(pending), batch_size)]
    if ray_address is None:
        results = (_synthesize_cases(request, backgrounds, group, device) for group in groups)
    else:
        from lsdm_aug.synthesis.distributed import ray_case_groups

        results = ray_case_groups(request, groups, device, ray_address)
    with make_progress() as bar:
        task = bar.add_task("synthesizing cases", total=request.count, completed=request.count - len(pending),
                            rate="", visible=progress)
        for group_results in results:
            for image, label, spacing, row in group_results:
                row["area_px"] = int(label.sum())
                write_case(out_dir, row["case_id"], image, label, spacing)
                atomic_write_text(rows / f"{row['case_id']}.json", json.dumps(row, default=float))
                speed = bar.tasks[0].speed
                bar.update(task, advance=1, rate=f"{60 * speed:.1f} cases/min" if speed else "")
                yield row["case_id"]


def synthesize(out_dir: str | Path, request: SynthesisRequest, device: str | None = None,
               progress: bool = False, batch_size: int = 1, ray_address: str | None = None,
               preview: str | Path | None = None) -> pd.DataFrame:
    """Write (or finish) the synthetic dataset of ``request`` in ``out_dir``; returns the manifest.

    ``batch_size`` cases run through the diffusion together; ``ray_address`` ("local", "auto" or a cluster
    address) spreads groups of cases over Ray; neither changes the output. ``preview`` names a PNG grid of
    samples across the requested levels to draw at the end.

    Raises:
        ValueError: bad request values (the message names them).
        DatasetMismatchError: ``out_dir`` holds something else, or ``source`` is not a dataset.
        CheckpointError: unknown model name or a broken model.
        ConnectionError: ``ray_address`` unreachable, or Ray not installed.
    """
    if batch_size < 1:
        raise ValueError(f"batch size must be >= 1, got {batch_size!r}")
    out_dir = Path(out_dir)
    _open(out_dir, request)
    load_pipeline(request.model, device)  # fail on a bad model before writing anything
    backgrounds = _Backgrounds(request)  # ... and on a bad --from
    started_ray = False
    if ray_address is not None:  # ... and on an unreachable cluster
        from lsdm_aug.synthesis.distributed import init_ray

        started_ray = init_ray(ray_address)
    try:
        return _write_dataset(out_dir, request, backgrounds, device, batch_size, ray_address, progress, preview)
    finally:
        if started_ray:
            import ray

            ray.shutdown()


def _write_dataset(out_dir: Path, request: SynthesisRequest, backgrounds: _Backgrounds, device: str | None,
                   batch_size: int, ray_address: str | None, progress: bool, preview: str | Path | None
                   ) -> pd.DataFrame:
    (out_dir / STATE_DIR / "rows").mkdir(parents=True, exist_ok=True)
    atomic_write_text(out_dir / STATE_DIR / "settings.json", json.dumps(_settings(request), indent=1))
    for folder in ("imagesTr", "labelsTr"):
        for stale in (out_dir / folder).glob(".*.nii.gz"):
            stale.unlink()
    for _ in _cases(out_dir, request, backgrounds, device, batch_size, ray_address, progress):
        pass
    rows = [json.loads((out_dir / STATE_DIR / "rows" / f"{_case_id(i)}.json").read_text()) for i in range(request.count)]
    manifest = pd.DataFrame(rows)
    atomic_write_text(out_dir / "manifest.csv", manifest.to_csv(index=False))
    write_dataset_json(out_dir, request.count, description=f"lsdm-aug synthesize, {request.count} cases")
    for case_id in manifest.case_id:
        image_path, label_path = case_paths(out_dir, case_id)
        if not image_path.is_file() or not label_path.is_file():
            raise RuntimeError(f"case {case_id} has a manifest row but no image or label")
    if preview is not None:
        from lsdm_aug.synthesis.preview import draw_preview

        draw_preview(out_dir, manifest, preview, request.balanced_levels())
    return manifest
