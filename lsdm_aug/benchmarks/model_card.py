"""``lsdm-aug benchmark model-card``: MODEL_CARD.md of a model folder, from its configs and its quality report.

Every figure comes from the JSON configs written by training (steps, wall time, validation) or from the
report of ``lsdm-aug benchmark model-quality``; the card names the commands behind them.

Example:
    >>> text = model_card("lsdm_aug/models/shipped/phantom-512", "lsdm-aug prepare phantom ...", [])  # doctest: +SKIP
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from lsdm_aug.config import FEATURES

__all__ = ["model_card", "write_model_card"]


def _read(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text()) if path.is_file() else {}


def _minutes(history: list[dict]) -> float:
    """Wall minutes over a history whose seconds restart at 0 when training resumes."""
    ends = [h for h, following in zip(history, history[1:] + [None]) if following is None or following["seconds"] < h["seconds"]]
    return sum(h["seconds"] for h in ends) / 60


def _classifier_summary(feature: str, v: dict) -> str:
    if feature == "malignancy" and "malignancy_clear_balanced_accuracy_t0" in v:
        return ("balanced accuracy, clear nodules (<= 2 vs >= 4), t = 0 / 200 / 500: "
                + " / ".join(f"{v[f'malignancy_clear_balanced_accuracy_t{t}']:.2f}" for t in (0, 200, 500)))
    if f"{feature}_balanced_mae_t0" in v:
        return ("level-balanced MAE, t = 0 / 200 / 500 (a constant 3 scores 1.2): "
                + " / ".join(f"{v[f'{feature}_balanced_mae_t{t}']:.2f}" for t in (0, 200, 500)))
    return ""


def _calibration_summary(calibration: dict | None) -> str:
    """The guidance targets a calibrated regression steers to: its mean prediction per level at t = 0."""
    if not calibration:
        return ""
    targets = ", ".join(f"{level:g}: {mean:.2f}" for level, mean in zip(calibration["levels"], calibration["means"][0]))
    return f"; guidance targets (its mean on real nodules per level, t = 0): {targets}"


def model_card(model_dir: str | Path, data_command: str, train_commands: list[str],
               quality: dict[str, Any] | None = None, notes: list[str] | None = None) -> str:
    """The card's Markdown text."""
    from lsdm_aug.benchmarks.edge_profile import edge_profile_markdown
    from lsdm_aug.benchmarks.model_quality import control_markdown, gates

    folder = Path(model_dir)
    autoencoder, unet = _read(folder / "autoencoder.json"), _read(folder / "unet.json")
    classifiers = {f: _read(folder / f"classifier_{f}.json") for f in FEATURES}
    size_mb = sum(p.stat().st_size for p in folder.glob("*.safetensors")) / 1e6
    spacing = unet.get("spacing_mm") or autoencoder.get("spacing_mm") or {}
    lines = [f"# Model card: lsdm-aug `{folder.name}`", "",
             "LSDM (latent semantic diffusion model, Zu 2023) trained on the embedded LIDC-style chest phantom, whose "
             "nodules are real LIDC consensus outlines with their real ratings. It has never seen a real CT image: use "
             "it to try the tooling, then train on real data with the same commands.", "",
             "## Data and resolution", "", f"    {data_command}", "",
             f"Trained at pixel spacings {spacing.get('min', 'n/a')}..{spacing.get('max', 'n/a')} mm (median "
             f"{spacing.get('median', 'n/a')} mm, 5th-95th percentile {spacing.get('p05', 'n/a')}..{spacing.get('p95', 'n/a')}); "
             f"serves images at {unet.get('serves_spacing_mm', 'n/a')} mm: the edit path resamples every edit window to "
             f"the median spacing and back, and refuses any other spacing.", "",
             "## Training (2 CPU cores)", "", *[f"    {c}" for c in train_commands], "",
             "| component | steps | wall time | validation |", "| --- | --- | --- | --- |"]
    if autoencoder:
        v = autoencoder["validation"]
        start = autoencoder.get("training", {}).get("init_from")
        lines.append(f"| autoencoder (f=4, 3 latent channels{', from ' + start if start else ''}) | {autoencoder['steps']} | "
                     f"{_minutes(autoencoder['history']):.0f} min | whole-slice SSIM {v['ssim']:.3f}, PSNR "
                     f"{v['psnr_db']:.2f} dB (1 px blur: {v['blur_ssim']:.3f}) |")
    if unet:
        crop = unet.get("crop_px")
        conditioned = unet["diffusion"].get("feature_conditioning")
        features = ", ".join(unet["diffusion"].get("conditioned_features") or FEATURES)
        start = unet.get("training", {}).get("init_from")
        lines.append(f"| SPADE U-Net{f' + feature vector (CFG: {features})' if conditioned else ''}, "
                     f"{f'{crop} px crops' if crop else 'whole slices'}, EMA {unet['ema_decay']}"
                     f"{', from ' + Path(start).name if start else ''} | {unet['steps']} | "
                     f"{_minutes(unet['history']):.0f} min | noise MSE {unet['validation']['validation_mse']:.4f} |")
    for feature, config in classifiers.items():
        if config:
            lines.append(f"| classifier: {feature} | {config['steps']} | {config['validation']['seconds'] / 60:.0f} min "
                         f"(all four) | {_classifier_summary(feature, config['validation'])}"
                         f"{_calibration_summary(config.get('calibration'))} |")
    lines += ["", f"Weights: {size_mb:.1f} MB of safetensors, each with its JSON config.", ""]
    if quality:
        s = quality["settings"]
        lines += ["## Gates on held-out slices", "",
                  f"From `lsdm-aug benchmark model-quality --data {s['data']} --count {s['count']} --steps {s['steps']} "
                  f"--seed {s['seed']}` (report: `{s['out']}/model_quality.md`).", "",
                  "| gate | measured | met |", "| --- | --- | --- |"]
        lines += [f"| {name} | {figure} | {'n/a' if ok is None else 'yes' if ok else 'no'} |"
                  for name, figure, ok in gates(quality)]
        lines += ["", *control_markdown(quality, "##"), ""]
        edge = edge_profile_markdown(quality.get("edge_profile") or {}, "##")
        if edge:
            lines += [*edge, ""]
    else:
        lines += ["## Gates on held-out slices", "", "Not measured yet: run `lsdm-aug benchmark model-quality` and "
                  "rewrite this card with `lsdm-aug benchmark model-card --quality ...`.", ""]
    if unet.get("crop_px"):
        lines += ["## Whole slices from a crop-trained U-Net", "",
                  f"The U-Net learned {unet['crop_px']} px windows. Being convolutional with attention only at its lowest "
                  "level, it also denoises whole slices, but its attention then spans the whole slice instead of one "
                  "window and it has never seen a field of view that wide: whole generated slices show the right "
                  "tissues per label, with less global coherence (body outline, symmetry) than local edits, which run "
                  f"on {_edit_window_words(unet)}. Local insertion is the intended use.", ""]
    lines += ["## Limits", "", *(notes or []),
              "- Phantom anatomy only: real-CT texture, artefacts and pathology beyond nodules are absent.", ""]
    return "\n".join(lines)


def write_model_card(model_dir: str | Path, data_command: str, train_commands: list[str],
                     quality_path: str | Path | None = None, notes: list[str] | None = None) -> str:
    """Write ``MODEL_CARD.md`` into ``model_dir`` (with the quality report's ``guidance_grid.png`` beside it, which
    the card shows) and return it."""
    quality = _read(Path(quality_path)) if quality_path else None
    text = model_card(model_dir, data_command, train_commands, quality, notes)
    if quality_path and (Path(quality_path).parent / "guidance_grid.png").is_file():
        shutil.copyfile(Path(quality_path).parent / "guidance_grid.png", Path(model_dir) / "guidance_grid.png")
    (Path(model_dir) / "MODEL_CARD.md").write_text(text)
    return text


def _edit_window_words(unet: dict) -> str:
    """What window a local edit runs on, from the U-Net's config (its ``edit_window_px``, else its training crop)."""
    window = unet.get("edit_window_px")
    if not window or window == unet["crop_px"]:
        return "exactly the window size it trained on"
    return (f"windows of {window} px or more (edit_window_px in unet.json; a larger nodule gets a larger window), "
            f"{window / unet['crop_px']:.2g} of the side it trained on")
