"""Quality of a trained LSDM model on held-out phantom slices: the figures of the model card.

Run:  python benchmarks/model_quality.py --model lsdm_aug/models/default --data prepared/phantom-128 \
          --out reports/model_quality
Writes model_quality.md and model_quality.json into --out.

1. autoencoder: SSIM / PSNR of reconstructions of held-out slices, next to a 1 px Gaussian blur;
2. generated slices respect their maps: mean HU in label-4 lung; solid nodules (texture >= 4) against the
   lung around them; mean nodule HU per texture level against what the phantom renders;
3. control, judged by an independent evaluator trained on clean phantom crops (never used for guidance):
   a. shape + guidance: nodules inserted with masks of real nodules of the requested level, requested
      malignant (4-5) vs benign (1-2): AUC;
   b. guidance alone: the same masks inserted once requested benign and once malignant, for each guidance
      scale: AUC, and the nodule-crop Fréchet distance to real nodules (relative to s = 0);
4. speed: seconds per generated slice (DDIM) with and without guidance, and per local insertion.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from monai.metrics import FIDMetric, compute_roc_auc
from scipy import ndimage

from lsdm_aug.data.lidc import NoduleMaskBank, load_nodule_table
from lsdm_aug.data.phantom import free_site
from lsdm_aug.data.prepared import PreparedDataset, unit_to_hu
from lsdm_aug.metrics.evaluator import NoduleEvaluator, nodule_crops
from lsdm_aug.pipeline import LSDMPipeline
from lsdm_aug.training.autoencoder import reconstruction_metrics


LARGE_NODULE_PX = 8  # at 128 px (2.8 mm pixels) the f=4 autoencoder keeps the contrast of nodules this large


def autoencoder_quality(pipe: LSDMPipeline, test: PreparedDataset, limit: int) -> dict:
    images = torch.from_numpy(np.stack([test[i]["image"] for i in range(min(limit, len(test)))])).unsqueeze(1)
    return reconstruction_metrics(pipe.autoencoder, images.to(pipe.device)) | {"slices": len(images)}


def map_respect(pipe: LSDMPipeline, test: PreparedDataset, count: int, steps: int, seed: int) -> dict:
    """Unguided generation from held-out maps; HU statistics by label, per nodule texture level."""
    cases = [test[c] for c in test.features.case_id.unique()[:count]]
    generated = pipe.generate(np.stack([c["semantic_map"] for c in cases]), steps=steps, guidance_scale=0, seed=seed)
    lung_hu, solid_gap, real_gap, solid_area, by_texture = [], [], [], [], {}
    for case, image in zip(cases, generated):
        hu, real_hu = unit_to_hu(image), unit_to_hu(case["image"])
        lung = case["semantic_map"] == 4
        lung_hu.append(float(hu[lung].mean()))
        for k, nodule in enumerate(case["nodules"], start=1):
            mask = case["nodule_mask"] == k
            if not mask.any():
                continue
            ring = ndimage.binary_dilation(mask, iterations=3) & ~mask & lung
            level = int(np.floor(nodule["texture"] + 0.5))
            entry = by_texture.setdefault(level, {"generated": [], "phantom": []})
            entry["generated"].append(float(hu[mask].mean()))
            entry["phantom"].append(float(real_hu[mask].mean()))
            if nodule["texture"] >= 4 and ring.any():
                solid_gap.append(float(hu[mask].mean() - hu[ring].mean()))
                real_gap.append(float(real_hu[mask].mean() - real_hu[ring].mean()))
                solid_area.append(int(mask.sum()))
    large = [g for g, a in zip(solid_gap, solid_area) if a >= LARGE_NODULE_PX]
    return {"slices": len(cases), "lung_mean_hu": float(np.mean(lung_hu)),
            "solid_nodule_minus_lung_hu": float(np.mean(solid_gap)) if solid_gap else None,
            "solid_nodules": len(solid_gap),
            "real_solid_nodule_minus_lung_hu": float(np.mean(real_gap)) if real_gap else None,
            f"solid_nodule_minus_lung_hu_area_ge_{LARGE_NODULE_PX}px": float(np.mean(large)) if large else None,
            f"solid_nodules_area_ge_{LARGE_NODULE_PX}px": len(large),
            "texture_mean_hu": {str(k): {"generated": float(np.mean(v["generated"])), "phantom": float(np.mean(v["phantom"])),
                                         "nodules": len(v["generated"])} for k, v in sorted(by_texture.items())}}


def _outlines(pipe: LSDMPipeline, spacing: float, levels: tuple[int, ...], count: int, rng) -> list[np.ndarray]:
    table = load_nodule_table()
    table = table[(table.consensus_voxels > 0) & np.isin(np.floor(table.malignancy + 0.5), levels)]
    bank = NoduleMaskBank.default()
    ids = table.nodule_id.to_numpy()[rng.choice(len(table), count, replace=False)]
    return [bank.centre_slice(i, spacing) for i in ids]


def _insert_all(pipe, backgrounds, outlines, malignancy, scale, steps, seed, rng_seed) -> tuple[np.ndarray, float]:
    """Insert each outline into a background slice's lung; return the nodule crops and seconds per insertion."""
    rng = np.random.default_rng(rng_seed)
    crops, started = [], time.perf_counter()
    for i, outline in enumerate(outlines):
        case = backgrounds[i % len(backgrounds)]
        site = free_site(case["semantic_map"] == 4, outline, case["spacing_mm"], rng)
        if site is None:
            site = free_site(case["semantic_map"] > 0, outline, case["spacing_mm"], rng)
        centre = (site[0] + outline.shape[0] / 2, site[1] + outline.shape[1] / 2)
        result = pipe.insert(case["image"], case["semantic_map"], outline, centre, {"malignancy": malignancy},
                             steps=steps, guidance_scale=scale, seed=seed + i)
        rows, cols = np.nonzero(result.nodule_mask)
        crops.append(nodule_crops(result.image[None], [(rows.mean(), cols.mean())], backgrounds[0]["crop_px"])[0])
    return np.stack(crops), (time.perf_counter() - started) / len(outlines)


def _auc(malignant_scores: np.ndarray, benign_scores: np.ndarray) -> float:
    scores = np.concatenate([malignant_scores, benign_scores])
    labels = np.concatenate([np.ones(len(malignant_scores)), np.zeros(len(benign_scores))])
    return float(compute_roc_auc(torch.from_numpy(scores), torch.from_numpy(labels)))


def _frechet(evaluator: NoduleEvaluator, crops: np.ndarray, real: np.ndarray) -> float:
    return float(FIDMetric()(evaluator.features(crops).double(), evaluator.features(real).double()))


def control(pipe, evaluator, test: PreparedDataset, count: int, scales: list[float], steps: int, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    backgrounds = [test[c] for c in test.cases[test.cases.n_nodules == 0].case_id[:count]]
    for case in backgrounds:
        case["crop_px"] = evaluator.crop_px
    spacing = float(np.median([c["spacing_mm"] for c in backgrounds]))
    real = test.features
    real_images = np.stack([test[c]["image"] for c in real.case_id])
    real_crops = nodule_crops(real_images, list(zip(real.centre_row, real.centre_col)), evaluator.crop_px)
    malignant_masks = _outlines(pipe, spacing, (4, 5), count, rng)
    benign_masks = _outlines(pipe, spacing, (1, 2), count, rng)
    malignant, seconds = _insert_all(pipe, backgrounds, malignant_masks, 5, 1.0, steps, seed, 1)
    benign, _ = _insert_all(pipe, backgrounds, benign_masks, 1, 1.0, steps, seed + 10_000, 2)
    shape_and_guidance = _auc(evaluator.malignant_probability(malignant), evaluator.malignant_probability(benign))
    masks = _outlines(pipe, spacing, (1, 2, 3, 4, 5), count, rng)
    curve = []
    for scale in scales:
        as_malignant, _ = _insert_all(pipe, backgrounds, masks, 5, scale, steps, seed, 3)
        as_benign, _ = _insert_all(pipe, backgrounds, masks, 1, scale, steps, seed, 3)
        both = np.concatenate([as_malignant, as_benign])
        curve.append({"scale": scale, "auc": _auc(evaluator.malignant_probability(as_malignant),
                                                  evaluator.malignant_probability(as_benign)),
                      "mean_p_malignant_requested_malignant": float(evaluator.malignant_probability(as_malignant).mean()),
                      "mean_p_malignant_requested_benign": float(evaluator.malignant_probability(as_benign).mean()),
                      "nodule_frechet": _frechet(evaluator, both, real_crops)})
    for point in curve:
        point["frechet_vs_s0"] = point["nodule_frechet"] / curve[0]["nodule_frechet"]
    return {"per_class": count, "shape_and_guidance_auc": shape_and_guidance, "guidance_curve": curve,
            "seconds_per_insertion": seconds, "real_nodule_crops": len(real_crops)}


def speed(pipe: LSDMPipeline, test: PreparedDataset, steps: int) -> dict:
    semantic_map = test[test.features.case_id.iloc[0]]["semantic_map"]
    timings = {}
    for name, scale in (("unguided", 0.0), ("guided_all_classifiers", 1.0)):
        pipe.generate(semantic_map, {"malignancy": 5, "texture": 5, "spiculation": 5, "lobulation": 5}, steps=2,
                      guidance_scale=scale)
        started = time.perf_counter()
        pipe.generate(semantic_map, {"malignancy": 5, "texture": 5, "spiculation": 5, "lobulation": 5}, steps=steps,
                      guidance_scale=scale, seed=1)
        timings[f"seconds_per_slice_ddim{steps}_{name}"] = time.perf_counter() - started
    return timings


def markdown(report: dict, command: str) -> str:
    ae, maps, ctrl = report["autoencoder"], report["map_respect"], report["control"]
    lines = ["# Model quality", "", f"Made by `{command}`.", "", "## Autoencoder (held-out slices)", "",
             f"- SSIM {ae['ssim']:.3f}, PSNR {ae['psnr_db']:.2f} dB on {ae['slices']} test slices "
             f"(1 px Gaussian blur: SSIM {ae['blur_ssim']:.3f}, PSNR {ae['blur_psnr_db']:.2f} dB)", "",
             "## Generated slices respect the map (unguided, DDIM)", "",
             f"- mean HU in label-4 lung: {maps['lung_mean_hu']:.0f} (target < -500)",
             f"- solid nodules (texture >= 4) minus surrounding lung: {maps['solid_nodule_minus_lung_hu']} HU "
             f"over {maps['solid_nodules']} nodules (target >= 300; the real slices: "
             f"{maps['real_solid_nodule_minus_lung_hu']:.0f} HU)",
             f"- the same for solid nodules of >= {LARGE_NODULE_PX} px, which the f=4 autoencoder can represent: "
             f"{maps[f'solid_nodule_minus_lung_hu_area_ge_{LARGE_NODULE_PX}px']} HU over "
             f"{maps[f'solid_nodules_area_ge_{LARGE_NODULE_PX}px']} nodules", "",
             "| texture | nodules | generated mean HU | phantom mean HU | difference |", "| --- | --- | --- | --- | --- |"]
    for level, v in maps["texture_mean_hu"].items():
        lines.append(f"| {level} | {v['nodules']} | {v['generated']:.0f} | {v['phantom']:.0f} | {v['generated'] - v['phantom']:+.0f} |")
    lines += ["", "## Control (independent evaluator, AUC malignant vs benign requests)", "",
              f"- evaluator: validation AUC {report['evaluator']['validation_auc']:.3f} on real phantom nodules",
              f"- shape + guidance (s = 1, masks of the requested level): AUC {ctrl['shape_and_guidance_auc']:.3f} "
              f"({ctrl['per_class']} per class)", "", "Guidance alone (same masks, requested benign vs malignant):", "",
              "| s | AUC | mean P(malignant), asked malignant | asked benign | nodule Fréchet | vs s = 0 |",
              "| --- | --- | --- | --- | --- | --- |"]
    for p in ctrl["guidance_curve"]:
        lines.append(f"| {p['scale']:g} | {p['auc']:.3f} | {p['mean_p_malignant_requested_malignant']:.3f} | "
                     f"{p['mean_p_malignant_requested_benign']:.3f} | {p['nodule_frechet']:.2f} | {p['frechet_vs_s0']:.2f} |")
    lines += ["", "## Speed (2 CPU cores)", ""] + [f"- {k}: {v:.2f} s" for k, v in report["speed"].items()]
    lines.append(f"- seconds per local insertion (DDIM, guided): {ctrl['seconds_per_insertion']:.2f} s")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="default")
    parser.add_argument("--data", type=Path, required=True, help="prepared phantom dataset (test split is used)")
    parser.add_argument("--out", type=Path, default=Path("reports/model_quality"))
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--count", type=int, default=24, help="slices / nodules per measurement")
    parser.add_argument("--scales", default="0,0.5,1,2,4")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    command = "python benchmarks/model_quality.py " + " ".join(
        f"--{k} {v}" for k, v in vars(args).items() if v is not None)
    torch.manual_seed(args.seed)
    pipe = LSDMPipeline.from_pretrained(args.model)
    test = PreparedDataset(args.data, split="test")
    evaluator, evaluator_report = NoduleEvaluator.train(args.data, crop_px=pipe.recipe.image_size // 4, seed=args.seed)
    report = {"command": command, "model": pipe.model_id, "evaluator": evaluator_report,
              "autoencoder": autoencoder_quality(pipe, test, 200),
              "map_respect": map_respect(pipe, test, args.count, args.steps, args.seed),
              "control": control(pipe, evaluator, test, args.count, [float(s) for s in args.scales.split(",")],
                                 args.steps, args.seed),
              "speed": speed(pipe, test, args.steps)}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "model_quality.json").write_text(json.dumps(report, indent=1))
    (args.out / "model_quality.md").write_text(markdown(report, command))
    print(markdown(report, command))


if __name__ == "__main__":
    main()
