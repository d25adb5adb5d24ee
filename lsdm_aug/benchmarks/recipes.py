"""Loading the benchmarks' YAML recipes: a shipped name or a path, unknown keys named, lists made tuples.

Example:
    >>> from lsdm_aug.benchmarks.detection import DetectionRecipe
    >>> load_benchmark_recipe(DetectionRecipe, "bench-detection-phantom", "detection").seeds
    (0, 1, 2, 3, 4)
"""

from __future__ import annotations

from pathlib import Path
from typing import TypeVar

import yaml

__all__ = ["load_benchmark_recipe", "RECIPES_DIR"]

RECIPES_DIR = Path(__file__).resolve().parents[1] / "recipes"
R = TypeVar("R")


def load_benchmark_recipe(cls: type[R], name_or_path: str | Path, kind: str,
                          tuple_keys: tuple[str, ...] = ("seeds",)) -> R:
    """``cls`` (a recipe dataclass with ``validate()``) from ``bench-<kind>*.yaml`` by name or from a YAML path."""
    path = Path(name_or_path)
    if not path.suffix:
        path = RECIPES_DIR / f"{name_or_path}.yaml"
    if not path.is_file():
        shipped = sorted(p.stem for p in RECIPES_DIR.glob(f"bench-{kind}*.yaml"))
        raise FileNotFoundError(f"{kind} recipe {str(name_or_path)!r} not found; shipped: {shipped}")
    values = yaml.safe_load(path.read_text()) or {}
    known = set(cls.__dataclass_fields__)
    if set(values) - known:
        raise ValueError(f"{path.name}: unknown keys {sorted(set(values) - known)}; known: {sorted(known)}")
    for key in tuple_keys:
        if values.get(key) is not None:
            values[key] = tuple(values[key])
    return cls(**values).validate()
