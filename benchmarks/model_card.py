"""Write MODEL_CARD.md for a trained model folder from its configs and the model-quality report.

Run:  python benchmarks/model_card.py --model lsdm_aug/models/default --data-command "lsdm-aug prepare phantom ..." \
          --quality reports/model_quality/model_quality.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from lsdm_aug.config import FEATURES


def _read(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


def card(model: Path, data_command: str, quality: dict, train_commands: list[str]) -> str:
    autoencoder, unet = _read(model / "autoencoder.json"), _read(model / "unet.json")
    classifiers = {f: _read(model / f"classifier_{f}.json") for f in FEATURES}
    size_mb = sum(p.stat().st_size for p in model.glob("*.safetensors")) / 1e6
    lines = [f"# Model card: lsdm-aug `{model.name}`", "",
             "LSDM (latent semantic diffusion model, Zu 2023) trained on the embedded LIDC-style chest phantom: "
             "procedural 128 px chest CT slices whose nodules are real LIDC consensus outlines with their real ratings. "
             "It has never seen a real CT image; use it to try the tooling, then train on real data.", "",
             "## Data", "", f"`{data_command}` (train / validation / test split patient-wise, 80/10/10 %).", "",
             "## Training (2 CPU cores)", "", *[f"    {c}" for c in train_commands], "",
             "| component | recipe | steps | wall time | validation |", "| --- | --- | --- | --- | --- |"]
    if autoencoder:
        v = autoencoder["validation"]
        lines.append(f"| autoencoder (f=4, 3 latent channels) | {autoencoder['recipe']} | {autoencoder['steps']} | "
                     f"{sum(h['seconds'] for h in _segments(autoencoder['history'])) / 60:.0f} min | "
                     f"SSIM {v['ssim']:.3f}, PSNR {v['psnr_db']:.2f} dB (blur: {v['blur_ssim']:.3f}) |")
    if unet:
        lines.append(f"| SPADE U-Net (EMA {unet['ema_decay']}) | {unet['recipe']} | {unet['steps']} | "
                     f"{sum(h['seconds'] for h in _segments(unet['history'])) / 60:.0f} min | "
                     f"noise MSE {unet['validation']['validation_mse']:.4f} |")
    for feature, config in classifiers.items():
        if config:
            lines.append(f"| classifier: {feature} (EMA {config['ema_decay']}) | {config['recipe']} | {config['steps']} | "
                         f"{config['validation']['seconds'] / 60:.0f} min (all four) | "
                         f"{_classifier_summary(feature, config['validation'])} |")
    lines += ["", f"Weights: {size_mb:.1f} MB of safetensors, each with its JSON config.", ""]
    if quality:
        lines += ["## Quality on held-out phantom slices", "", f"From `{quality.get('command', 'benchmarks/model_quality.py')}`; "
                  "full report in `reports/model_quality/model_quality.md`.", ""]
        ae, maps, ctrl = quality["autoencoder"], quality["map_respect"], quality["control"]
        lines += [f"- reconstruction: SSIM {ae['ssim']:.3f}, PSNR {ae['psnr_db']:.2f} dB on {ae['slices']} test slices "
                  f"(1 px blur: SSIM {ae['blur_ssim']:.3f})",
                  f"- mean HU in label-4 lung of generated slices: {maps['lung_mean_hu']:.0f}",
                  f"- solid nodules minus surrounding lung: {maps['solid_nodule_minus_lung_hu']:.0f} HU "
                  f"(real slices: {maps.get('real_solid_nodule_minus_lung_hu') or float('nan'):.0f} HU; solid nodules of "
                  f">= 8 px: {maps.get('solid_nodule_minus_lung_hu_area_ge_8px') or float('nan'):.0f} HU over "
                  f"{maps.get('solid_nodules_area_ge_8px', 0)} nodules)",
                  f"- control AUC (independent evaluator), shape + guidance: {ctrl['shape_and_guidance_auc']:.3f}",
                  "- guidance alone, AUC by scale: " + ", ".join(f"s={p['scale']:g}: {p['auc']:.3f}" for p in ctrl["guidance_curve"]),
                  *[f"- {k}: {v:.2f} s" for k, v in quality["speed"].items()],
                  f"- local insertion: {ctrl['seconds_per_insertion']:.2f} s", ""]
    if quality:
        ae, maps, ctrl = quality["autoencoder"], quality["map_respect"], quality["control"]
        curve = [p["auc"] for p in ctrl["guidance_curve"]]
        checks = [("reconstruction SSIM >= 0.90", ae["ssim"] >= 0.90),
                  ("mean HU in generated lung < -500", maps["lung_mean_hu"] < -500),
                  ("solid nodules >= 300 HU above the lung", (maps["solid_nodule_minus_lung_hu"] or 0) >= 300),
                  ("texture-level nodule HU within 150 of the phantom",
                   all(abs(v["generated"] - v["phantom"]) <= 150 for v in maps["texture_mean_hu"].values())),
                  ("control AUC (shape + guidance) >= 0.8", ctrl["shape_and_guidance_auc"] >= 0.8),
                  ("AUC rises with the guidance scale", curve[-1] > curve[0] + 0.05)]
        lines += ["## Targets", "", "| target | met |", "| --- | --- |"]
        lines += [f"| {name} | {'yes' if ok else 'no'} |" for name, ok in checks]
        if not all(ok for _, ok in checks):
            lines += ["", "Not all targets are met. The nodule targets fail mostly on nodules of a few pixels, which "
                      "the f=4 autoencoder cannot represent at 128 px (see Limits: nodules of >= 8 px do reach the "
                      "contrast); the control AUC is also limited by the classifiers' signal at this size. More "
                      "training resumes with the same commands; larger slices lift the limit."]
        lines.append("")
    lines += ["## Limits", "", "- Phantom anatomy only; real-CT texture, artefacts and pathology beyond nodules are absent.",
              "- 128 px slices (about 2.8 mm pixels): half the nodules cover 4 px or less. The f=4 autoencoder keeps "
              "the contrast of nodules of 8 px and more but blurs the smallest (a solid nodule of 1-4 px loses about "
              "three quarters of its contrast in reconstruction), so their texture, lobulation and spiculation are "
              "barely present in `Decoder(z)`: the regression classifiers stay near a constant prediction and "
              "guidance can steer little beyond malignancy. Larger slices (the lidc-512 recipe) remove this limit.",
              "- The malignancy classifier is trained on clear cases (<= 2 vs >= 4): indeterminate nodules (rating 3, "
              "about half of LIDC's) can hardly be told from benign ones in the image.", ""]
    return "\n".join(lines)


def _classifier_summary(feature: str, v: dict) -> str:
    """The figures that say whether a classifier learned: balanced ones (a constant predictor: 0.5 / 1.2)."""
    if feature == "malignancy" and "malignancy_clear_balanced_accuracy_t0" in v:
        return ("balanced accuracy on clear nodules (<= 2 vs >= 4) at t = 0 / 200 / 500: "
                + " / ".join(f"{v[f'malignancy_clear_balanced_accuracy_t{t}']:.2f}" for t in (0, 200, 500)))
    if f"{feature}_balanced_mae_t0" in v:
        return ("level-balanced MAE at t = 0 / 200 / 500 (a constant 3 scores 1.2): "
                + " / ".join(f"{v[f'{feature}_balanced_mae_t{t}']:.2f}" for t in (0, 200, 500)))
    return ", ".join(f"{k} {x:.3f}" for k, x in v.items() if feature in k)


def _segments(history: list[dict]) -> list[dict]:
    """The last record of each run segment (seconds restart at 0 when training resumes)."""
    ends = [h for h, nxt in zip(history, history[1:] + [None]) if nxt is None or nxt["seconds"] < h["seconds"]]
    return ends


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", type=Path, default=Path("lsdm_aug/models/default"))
    parser.add_argument("--data-command", default="lsdm-aug prepare phantom --out prepared/phantom-128 --count 4000 --size 128 --seed 0")
    parser.add_argument("--quality", type=Path, default=Path("reports/model_quality/model_quality.json"))
    args = parser.parse_args()
    commands = [f"lsdm-aug train {stage} --recipe phantom-128 --data prepared/phantom-128 --out models/phantom-128"
                for stage in ("autoencoder", "classifiers", "diffusion")]
    text = card(args.model, args.data_command, _read(args.quality), commands)
    (args.model / "MODEL_CARD.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
