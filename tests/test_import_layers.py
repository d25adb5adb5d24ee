"""Imports run one way: each sub-package of lsdm_aug imports only the packages listed before it in LAYERS."""

from __future__ import annotations

import ast
from pathlib import Path

import lsdm_aug

PACKAGE = Path(lsdm_aug.__file__).parent
LAYERS = ("config", "progress", "lifetime", "data", "models", "sampling", "training", "editing", "pipeline", "metrics", "bank",
          "transforms", "synthesis", "nnunet", "benchmarks", "cli")


def _imported_packages(path: Path) -> set[str]:
    """The lsdm_aug sub-packages (first dotted name after ``lsdm_aug.``) that the module at ``path`` imports."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
        elif isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
    return {name.split(".")[1] for name in names if name.startswith("lsdm_aug.")}


def test_every_sub_package_is_in_a_layer():
    found = {p.stem if p.is_file() else p.name for p in PACKAGE.iterdir()
             if (p.suffix == ".py" and p.stem != "__init__") or (p / "__init__.py").is_file()}
    assert found == set(LAYERS)


def test_imports_run_one_way():
    upward = []
    for path in PACKAGE.rglob("*.py"):
        own = path.relative_to(PACKAGE).with_suffix("").parts[0]
        for target in _imported_packages(path) - {own}:
            if LAYERS.index(target) > LAYERS.index(own):
                upward.append(f"{path.relative_to(PACKAGE)} imports lsdm_aug.{target}")
    assert not upward, upward


def test_reading_a_bank_does_not_need_synthesis():
    """The circle this test was written for: bank/store.py used to import synthesis to build a bank."""
    assert not any({"synthesis", "transforms", "pipeline"} & _imported_packages(p)
                   for p in (PACKAGE / "bank").rglob("*.py"))
