"""Cost per sample of the NoduleSynth modes, ``synthesize`` throughput and the share of pixels changed.

Run:  python benchmarks/transform_cost.py --model default --out reports/transform_cost
Writes transform_cost.md and transform_cost.json into --out.

On nodule-free 128 px phantom slices (the default model's size), each in a MONAI ``DataLoader`` loop
(``num_workers=0``, so the figure is the cost of the transform itself, on this machine's cores):

1. live: ``NoduleSynthd`` running the diffusion per sample (DDIM, --steps);
2. batch: ``NoduleSynthBatchd`` on collated batches of --batch-size (one diffusion run per batch);
3. bank: ``NoduleSynthd(bank=...)`` placing nodules of a bank built here (its build cost per nodule too);
4. ``lsdm-aug synthesize`` cases per minute, with batch size 1 and --batch-size;
5. pixels changed per insertion: the footprint's share of the slice, per mode.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from monai.data import DataLoader, Dataset, MetaTensor, list_data_collate

from lsdm_aug.bank import build_bank
from lsdm_aug.data.phantom import ChestPhantom, PhantomConfig
from lsdm_aug.synthesis import SynthesisRequest, synthesize
from lsdm_aug.transforms.monai import NoduleSynthBatchd, NoduleSynthd, synthesis_records

SIZE = 128


def backgrounds(count: int, seed: int) -> list[dict]:
    phantom = ChestPhantom(PhantomConfig(size=SIZE, nodule_free_fraction=1.0))
    items = []
    for index in range(count):
        ct = phantom.slice(index, seed=seed)
        affine = torch.diag(torch.tensor([ct.spacing_mm, ct.spacing_mm, 1.0, 1.0]))
        items.append({"image": MetaTensor(torch.from_numpy(ct.hu)[None].float(), affine=affine),
                      "label": MetaTensor(torch.zeros(1, SIZE, SIZE), affine=affine)})
    return items


def per_sample_loop(items: list[dict], transform) -> dict:
    """Seconds per sample of ``transform`` in a DataLoader loop, after one warm-up sample; changed shares."""
    transform(dict(items[0]))  # loads the model once
    loader = DataLoader(Dataset(items, transform), batch_size=1, num_workers=0)
    changed, started = [], time.perf_counter()
    for batch in loader:
        changed.extend(json.loads(r)["changed_pixels"] / SIZE ** 2 for r in batch["image"].meta["nodule_synth"][-1])
    seconds = time.perf_counter() - started
    return {"samples": len(items), "seconds_per_sample": seconds / len(items), "changed_share": summary(changed)}


def batch_loop(items: list[dict], transform, batch_size: int) -> dict:
    transform(list_data_collate(items[:1]))
    changed, started = [], time.perf_counter()
    for start in range(0, len(items), batch_size):
        out = transform(list_data_collate(items[start:start + batch_size]))
        changed.extend(json.loads(r)["changed_pixels"] / SIZE ** 2 for r in out["image_nodule_synth"] if r)
    seconds = time.perf_counter() - started
    return {"samples": len(items), "batch_size": batch_size, "seconds_per_sample": seconds / len(items),
            "changed_share": summary(changed)}


def summary(values: list[float]) -> dict:
    values = np.asarray(values, float)
    return {"mean": float(values.mean()), "median": float(np.median(values)), "max": float(values.max()),
            "n": int(len(values))}


def synthesize_rate(model: str, count: int, batch_size: int, steps: int, work: Path) -> dict:
    out = work / f"synth-b{batch_size}"
    started = time.perf_counter()
    manifest = synthesize(out, SynthesisRequest(count=count, size=SIZE, steps=steps, model=model), batch_size=batch_size)
    seconds = time.perf_counter() - started
    return {"count": count, "batch_size": batch_size, "cases_per_minute": 60 * count / seconds,
            "changed_share": summary(list(manifest.changed_pixels / SIZE ** 2))}


def run(args: argparse.Namespace) -> dict:
    torch.manual_seed(0)
    items = backgrounds(args.samples, seed=args.seed)
    common = {"malignancy": "balanced", "steps": args.steps, "model": args.model}
    report = {"machine": {"cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                          "processor": platform.processor() or platform.machine(), "torch": torch.__version__,
                          "cuda": torch.cuda.is_available()},
              "settings": vars(args) | {"out": str(args.out), "size": SIZE}}
    report["live"] = per_sample_loop(items, NoduleSynthd(keys="image", label_key="label", **common).set_random_state(0))
    report["batch"] = batch_loop(items, NoduleSynthBatchd(keys="image", label_key="label", **common).set_random_state(0),
                                 args.batch_size)
    with tempfile.TemporaryDirectory() as folder:
        work = Path(folder)
        started = time.perf_counter()
        build_bank(work / "bank", SynthesisRequest(count=args.bank_size, size=SIZE, steps=args.steps, model=args.model),
                   batch_size=args.batch_size)
        report["bank_build"] = {"nodules": args.bank_size, "batch_size": args.batch_size,
                                "seconds_per_nodule": (time.perf_counter() - started) / args.bank_size}
        report["bank"] = per_sample_loop(items, NoduleSynthd(keys="image", label_key="label", malignancy="balanced",
                                                             bank=str(work / "bank")).set_random_state(0))
        report["synthesize"] = [synthesize_rate(args.model, args.synth_count, b, args.steps, work)
                                for b in sorted({1, args.batch_size})]
        shutil.rmtree(work, ignore_errors=True)
    return report


def markdown(report: dict, command: str) -> str:
    s = report["settings"]
    lines = ["# NoduleSynth cost per sample", "", f"Command: `{command}`", "",
             f"Machine: {report['machine']['cpus']} CPUs, torch {report['machine']['torch']} with "
             f"{report['machine']['torch_threads']} threads, CUDA {report['machine']['cuda']}. "
             f"{s['size']} px phantom slices, model `{s['model']}`, DDIM {s['steps']} steps, "
             f"DataLoader with num_workers=0.", "",
             "| mode | samples | s / sample | samples / s | pixels changed (mean / max share of the slice) |",
             "| --- | --- | --- | --- | --- |"]
    for name, label in (("live", "live (diffusion per sample)"),
                        ("batch", f"batch (NoduleSynthBatchd, {s['batch_size']} per run)"),
                        ("bank", "bank (Poisson placement)")):
        r = report[name]
        lines.append(f"| {label} | {r['samples']} | {r['seconds_per_sample']:.3f} | {1 / r['seconds_per_sample']:.1f} | "
                     f"{100 * r['changed_share']['mean']:.2f} % / {100 * r['changed_share']['max']:.2f} % |")
    lines += ["", f"Bank build: {report['bank_build']['seconds_per_nodule']:.3f} s per nodule "
              f"({report['bank_build']['nodules']} nodules, batch {report['bank_build']['batch_size']}).", "",
              "| `synthesize` batch size | cases | cases / minute | pixels changed (mean share) |", "| --- | --- | --- | --- |"]
    for r in report["synthesize"]:
        lines.append(f"| {r['batch_size']} | {r['count']} | {r['cases_per_minute']:.1f} | "
                     f"{100 * r['changed_share']['mean']:.2f} % |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="default")
    parser.add_argument("--out", type=Path, default=Path("reports/transform_cost"))
    parser.add_argument("--samples", type=int, default=24)
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--bank-size", type=int, default=40)
    parser.add_argument("--synth-count", type=int, default=24)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    report = run(args)
    args.out.mkdir(parents=True, exist_ok=True)
    command = "python benchmarks/transform_cost.py " + " ".join(
        f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items())
    (args.out / "transform_cost.json").write_text(json.dumps(report, indent=1))
    (args.out / "transform_cost.md").write_text(markdown(report, command))
    print(markdown(report, command))


if __name__ == "__main__":
    main()
