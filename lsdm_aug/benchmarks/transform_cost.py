"""Cost per sample of the NoduleSynth modes, ``synthesize`` throughput and the share of pixels changed.

Part of ``lsdm-aug benchmark speed``. On nodule-free phantom slices (the model's
size), each in a MONAI ``DataLoader`` loop (``num_workers=0``, so the figure is the cost of the
transform itself on this machine's cores):

1. live: ``NoduleSynthd`` running the diffusion per sample (DDIM);
2. batch: ``NoduleSynthBatchd`` on collated batches (one diffusion run per batch);
3. bank: ``NoduleSynthd(bank=...)`` placing nodules of a bank built here (its build cost per nodule too);
4. ``synthesize`` cases per minute, with batch size 1 and the given batch size;
5. pixels changed per insertion: the footprint's share of the slice, per mode.

Example:
    >>> report = transform_cost("default", samples=24, steps=25, batch_size=8, bank_size=40,
    ...                         synth_count=24, seed=0)  # doctest: +SKIP
"""

from __future__ import annotations

import cProfile
import importlib.util
import json
import pstats
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from monai.data import DataLoader, Dataset, MetaTensor, list_data_collate

from lsdm_aug.data.phantom import ChestPhantom, PhantomConfig
from lsdm_aug.synthesis import SynthesisRequest, build_bank, synthesize
from lsdm_aug.transforms.monai import NoduleSynthBatchd, NoduleSynthd

def backgrounds(count: int, seed: int, size: int) -> list[dict]:
    phantom = ChestPhantom(PhantomConfig(size=size, nodule_free_fraction=1.0))
    items = []
    for index in range(count):
        ct = phantom.slice(index, seed=seed)
        affine = torch.diag(torch.tensor([ct.spacing_mm, ct.spacing_mm, 1.0, 1.0]))
        items.append({"image": MetaTensor(torch.from_numpy(ct.hu)[None].float(), affine=affine),
                      "label": MetaTensor(torch.zeros(1, size, size), affine=affine)})
    return items


def _share(changed_pixels: float, items: list[dict]) -> float:
    return changed_pixels / items[0]["image"].shape[-1] ** 2


def per_sample_loop(items: list[dict], transform) -> dict:
    """Seconds per sample of ``transform`` in a DataLoader loop, after one warm-up sample; changed shares."""
    transform(dict(items[0]))  # loads the model once
    loader = DataLoader(Dataset(items, transform), batch_size=1, num_workers=0)
    changed, skipped, started = [], 0, time.perf_counter()
    for batch in loader:
        records = [json.loads(r) for r in batch["image"].meta["nodule_synth"][-1]]
        skipped += sum(1 for r in records if r.get("skipped"))
        changed.extend(_share(r["changed_pixels"], items) for r in records if not r.get("skipped"))
    seconds = time.perf_counter() - started
    return {"samples": len(items), "seconds_per_sample": seconds / len(items), "changed_share": summary(changed),
            "skipped": skipped}


def batch_loop(items: list[dict], transform, batch_size: int) -> dict:
    transform(list_data_collate(items[:1]))
    changed, started = [], time.perf_counter()
    for start in range(0, len(items), batch_size):
        out = transform(list_data_collate(items[start:start + batch_size]))
        records = [json.loads(r) for r in out["image_nodule_synth"] if r]
        changed.extend(_share(r["changed_pixels"], items) for r in records if not r.get("skipped"))
    seconds = time.perf_counter() - started
    return {"samples": len(items), "batch_size": batch_size, "seconds_per_sample": seconds / len(items),
            "changed_share": summary(changed)}


def summary(values: list[float]) -> dict:
    values = np.asarray(values, float)
    return {"mean": float(values.mean()), "median": float(np.median(values)), "max": float(values.max()),
            "n": int(len(values))}


def synthesize_rate(model: str, count: int, batch_size: int, steps: int, size: int, work: Path,
                    ray_address: str | None = None) -> dict:
    """``synthesize`` cases per minute in one process, or spread over Ray (``ray_address``, e.g. "local": one task
    per CPU core)."""
    out = work / f"synth-b{batch_size}{'-ray' if ray_address else ''}"
    started = time.perf_counter()
    manifest = synthesize(out, SynthesisRequest(count=count, size=size, steps=steps, model=model), batch_size=batch_size,
                          ray_address=ray_address)
    seconds = time.perf_counter() - started
    return {"count": count, "batch_size": batch_size, "ray": ray_address, "cases_per_minute": 60 * count / seconds,
            "changed_share": summary(list(manifest.changed_pixels / size ** 2))}


SYNTHESIS_STAGES = {"phantom drawing": ("data/phantom.py", "slice"),
                    "semantic map (K-means lung)": ("data/semantic.py", "semantic_map_from_hu"),
                    "diffusion (encode, sample, decode)": ("lsdm_aug/pipeline.py", "_edit_batch"),
                    "writing (NIfTI, manifest)": ("data/nnunet_format.py", "write_case")}


def synthesize_profile(model: str, count: int, batch_size: int, steps: int, size: int, work: Path) -> dict:
    """Where ``synthesize``'s time goes in one process: the cumulative seconds per case of each stage of
    ``SYNTHESIS_STAGES`` under cProfile (which slows Python-heavy stages more than the diffusion), and the rest."""
    profiler = cProfile.Profile()
    started = time.perf_counter()
    profiler.enable()
    synthesize(work / "synth-profile", SynthesisRequest(count=count, size=size, steps=steps, model=model),
               batch_size=batch_size)
    profiler.disable()
    total = time.perf_counter() - started
    stats = pstats.Stats(profiler).stats  # (file, line, function) -> (calls, primitive calls, own, cumulative, callers)
    stages = {stage: sum(entry[3] for (file, _, function), entry in stats.items()
                         if file.endswith(suffix) and function == name) / count
              for stage, (suffix, name) in SYNTHESIS_STAGES.items()}
    return {"count": count, "batch_size": batch_size, "seconds_per_case": total / count, "stages": stages,
            "other": total / count - sum(stages.values())}


def transform_cost(model: str, samples: int, steps: int, batch_size: int, bank_size: int, synth_count: int,
                   seed: int, size: int = 128) -> dict:
    """The figures above, as a dict (see :func:`transform_cost_markdown`), on ``size`` px slices."""
    torch.manual_seed(seed)
    items = backgrounds(samples, seed=seed, size=size)
    common = {"malignancy": "balanced", "steps": steps, "model": model}
    report = {"settings": {"model": model, "samples": samples, "steps": steps, "batch_size": batch_size,
                           "bank_size": bank_size, "synth_count": synth_count, "seed": seed, "size": size}}
    report["live"] = per_sample_loop(items, NoduleSynthd(keys="image", label_key="label", **common).set_random_state(0))
    report["batch"] = batch_loop(items, NoduleSynthBatchd(keys="image", label_key="label", **common).set_random_state(0),
                                 batch_size)
    with tempfile.TemporaryDirectory() as folder:
        work = Path(folder)
        started = time.perf_counter()
        build_bank(work / "bank", SynthesisRequest(count=bank_size, size=size, steps=steps, model=model),
                   batch_size=batch_size)
        report["bank_build"] = {"nodules": bank_size, "batch_size": batch_size,
                                "seconds_per_nodule": (time.perf_counter() - started) / bank_size}
        report["bank"] = per_sample_loop(items, NoduleSynthd(keys="image", label_key="label", malignancy="balanced",
                                                             bank=str(work / "bank")).set_random_state(0))
        report["synthesize"] = [synthesize_rate(model, synth_count, b, steps, size, work)
                                for b in sorted({1, batch_size})]
        if importlib.util.find_spec("ray") is not None:  # one Ray task per core on this machine
            report["synthesize"].append(synthesize_rate(model, synth_count, batch_size, steps, size, work, "local"))
        report["synthesize_profile"] = synthesize_profile(model, max(synth_count // 2, 4), batch_size, steps, size,
                                                          work)
        shutil.rmtree(work, ignore_errors=True)
    return report


def transform_cost_markdown(report: dict) -> list[str]:
    """Markdown lines of a :func:`transform_cost` report."""
    s = report["settings"]
    lines = [f"{s['size']} px phantom slices, model `{s['model']}`, DDIM {s['steps']} steps, MONAI DataLoader "
             "with num_workers=0.", "",
             "| mode | samples | s / sample | samples / s | pixels changed (mean / max share of the slice) |",
             "| --- | --- | --- | --- | --- |"]
    for name, label in (("live", "live (diffusion per sample)"),
                        ("batch", f"batch (NoduleSynthBatchd, {s['batch_size']} per run)"),
                        ("bank", "bank (Poisson placement)")):
        r = report[name]
        skipped = f" ({r['skipped']} left unchanged: no room in the lung)" if r.get("skipped") else ""
        lines.append(f"| {label} | {r['samples']}{skipped} | {r['seconds_per_sample']:.3f} | "
                     f"{1 / r['seconds_per_sample']:.1f} | {100 * r['changed_share']['mean']:.2f} % / "
                     f"{100 * r['changed_share']['max']:.2f} % |")
    lines += ["", f"Bank build: {report['bank_build']['seconds_per_nodule']:.3f} s per nodule "
              f"({report['bank_build']['nodules']} nodules, batch {report['bank_build']['batch_size']}).", "",
              "| `synthesize` batch size | cases | cases / minute | pixels changed (mean share) |",
              "| --- | --- | --- | --- |"]
    for r in report["synthesize"]:
        how = f"{r['batch_size']}, Ray local (one task per core)" if r.get("ray") else f"{r['batch_size']}"
        lines.append(f"| {how} | {r['count']} | {r['cases_per_minute']:.1f} | "
                     f"{100 * r['changed_share']['mean']:.2f} % |")
    profile = report.get("synthesize_profile")
    if profile:
        lines += ["", f"Where `synthesize`'s time goes (one process, batch {profile['batch_size']}, {profile['count']} "
                      f"cases under cProfile: {profile['seconds_per_case']:.2f} s per case):", "",
                  "| stage | s / case | share |", "| --- | --- | --- |"]
        for stage, seconds in [*profile["stages"].items(), ("other", profile["other"])]:
            lines.append(f"| {stage} | {seconds:.3f} | {seconds / profile['seconds_per_case']:.0%} |")
    return lines
