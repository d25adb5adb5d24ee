"""``lsdm-aug prepare``: write a prepared dataset from the phantom or from LIDC-IDRI DICOM."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from lsdm_aug.cli.errors import fail, user_errors

app = typer.Typer(help="Write a prepared dataset (slices, semantic maps, nodule masks, features.csv, splits.json).",
                  no_args_is_help=True)

SIZES = (64, 128, 256, 512)


def _split_fractions(val_fraction: float, test_fraction: float) -> dict[str, float]:
    for name, value in (("--val-fraction", val_fraction), ("--test-fraction", test_fraction)):
        if not 0 <= value < 1:
            fail(f"{name} must be in [0, 1), got {value}")
    if val_fraction + test_fraction >= 1:
        fail(f"--val-fraction + --test-fraction must be < 1, got {val_fraction + test_fraction}")
    return {"train": 1 - val_fraction - test_fraction, "validation": val_fraction, "test": test_fraction}


def _check_out(out: Path) -> None:
    if out.exists() and not out.is_dir():
        fail(f"--out {str(out)!r} is a file, not a folder")


@app.command("phantom")
def phantom(
    out: Annotated[Path, typer.Option(help="Output folder; rerunning the same command continues where it stopped.")],
    count: Annotated[int, typer.Option(help="Number of slices to write (> 0).")] = 1000,
    size: Annotated[int, typer.Option(help=f"Slice size in pixels, one of {', '.join(map(str, SIZES))}.")] = 128,
    seed: Annotated[int, typer.Option(help="Master seed: same seed, same dataset.")] = 0,
    nodule_free_fraction: Annotated[float, typer.Option(help="Share of slices without a nodule, in [0, 1].")] = 0.3,
    slices_per_patient: Annotated[int, typer.Option(help="Slices per phantom patient (splits are patient-wise).")] = 8,
    max_nodules: Annotated[int, typer.Option(help="A slice with nodules gets 1..this many.")] = 1,
    balance: Annotated[str, typer.Option(
        help="Comma-separated ratings whose levels are drawn equally often, e.g. 'malignancy'; "
             "empty follows the LIDC database.")] = "",
    val_fraction: Annotated[float, typer.Option(help="Share of patients in the validation split.")] = 0.1,
    test_fraction: Annotated[float, typer.Option(help="Share of patients in the test split.")] = 0.1,
    workers: Annotated[int, typer.Option(help="Processes drawing slices (the dataset is the same for any number).")] = 1,
) -> None:
    """Draw LIDC-style chest-CT phantom slices with real LIDC nodules and write them as a prepared dataset."""
    if count <= 0:
        fail(f"--count must be > 0, got {count}")
    if size not in SIZES:
        fail(f"--size must be one of {', '.join(map(str, SIZES))}, got {size}")
    if workers < 1:
        fail(f"--workers must be >= 1, got {workers}")
    _check_out(out)
    fractions = _split_fractions(val_fraction, test_fraction)
    from lsdm_aug.data.phantom import PhantomConfig, prepare_phantom

    with user_errors():
        config = PhantomConfig(size=size, slices_per_patient=slices_per_patient,
                               nodule_free_fraction=nodule_free_fraction, max_nodules_per_slice=max_nodules,
                               balance=tuple(b.strip() for b in balance.split(",") if b.strip()) or None)
        dataset = prepare_phantom(out, count, config, seed, fractions, progress=True, workers=workers)
    typer.echo(f"wrote {len(dataset)} slices with {len(dataset.features)} nodules to {out}")


@app.command("lidc")
def lidc(
    dicom_root: Annotated[Path, typer.Option(help="Folder with one sub-folder per LIDC patient (LIDC-IDRI-0001/...).")],
    out: Annotated[Path, typer.Option(help="Output folder; rerunning the same command continues where it stopped.")],
    max_slice_thickness: Annotated[float, typer.Option(help="Skip scans with thicker slices (mm).")] = 2.5,
    slice_fraction: Annotated[float, typer.Option(help="Share of each scan's slices kept, in (0, 1].")] = 0.2,
    size: Annotated[int, typer.Option(help="Resize slices to this many pixels (0 keeps the native 512).")] = 0,
    seed: Annotated[int, typer.Option(help="Seed of the patient-wise split.")] = 0,
    patients: Annotated[str, typer.Option(help="Comma-separated patient ids to restrict to (default: all found).")] = "",
    val_fraction: Annotated[float, typer.Option(help="Share of patients in the validation split.")] = 0.1,
    test_fraction: Annotated[float, typer.Option(help="Share of patients in the test split.")] = 0.1,
) -> None:
    """Prepare real LIDC-IDRI slices with pylidc: thin scans, 20 % of slices, HU [-1024, 800] -> [-1, 1], semantic maps."""
    if not dicom_root.is_dir():
        fail(f"--dicom-root {str(dicom_root)!r} is not an existing folder")
    if size < 0:
        fail(f"--size must be >= 0 pixels (0 keeps 512), got {size}")
    _check_out(out)
    fractions = _split_fractions(val_fraction, test_fraction)
    from lsdm_aug.data.lidc_prepare import prepare_lidc

    with user_errors():
        dataset = prepare_lidc(dicom_root, out, max_slice_thickness, slice_fraction, size or None, seed, fractions,
                               [p.strip() for p in patients.split(",") if p.strip()] or None, progress=True)
    typer.echo(f"wrote {len(dataset)} slices with {len(dataset.features)} nodules to {out}")
