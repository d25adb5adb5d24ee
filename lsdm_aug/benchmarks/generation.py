"""``lsdm-aug benchmark generation``: the thesis's Tables 5.1 / 5.2 on held-out phantom slices, measured.

Models, all given the same held-out semantic maps (test split, slices with a nodule):

* ``spade-gan``: the SPADE GAN baseline (:mod:`lsdm_aug.training.spade_gan`);
* ``ldm``: latent diffusion with the map only concatenated (``diffusion.spade: false``), same autoencoder;
* ``lsdm``: the latent semantic diffusion model, unguided;
* ``lsdm+all``: guided by all four classifiers towards the real nodule's rounded ratings;
* ``lsdm+malignancy`` / ``+lobulation`` / ``+spiculation`` / ``+texture``: one classifier each.

Baselines named in the recipe but missing are trained first (resumable) with the recipe's model recipe.

Metrics, mean ± std over seeds: FID of whole slices with the in-project slice features
(:mod:`lsdm_aug.metrics.features`; a local weight file when given), SSIM and MS-SSIM (MONAI) and
perceptual distance against the real slice of the same map, and FID of nodule crops (``image_size / 8``
px: 64 px at 512) with the independent malignancy evaluator's features. Control: the independent
evaluators' AUC for each feature, low (1) vs high (5) requested on the same maps, and the malignancy
AUC over the guidance-scale curve. A PNG grid shows malignancy 1..5 x guidance scale.

Example:
    >>> report = run_generation(load_generation_recipe("bench-generation"), "work/generation",
    ...                         "reports/generation")  # doctest: +SKIP
"""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.metrics import MultiScaleSSIMMetric, SSIMMetric

from lsdm_aug.benchmarks.recipes import load_benchmark_recipe
from lsdm_aug.config import FEATURES, load_recipe, rating_level
from lsdm_aug.data.prepared import PreparedDataset, atomic_write_text
from lsdm_aug.metrics.auc import labelled_auc
from lsdm_aug.metrics.evaluator import NoduleEvaluator, nodule_crops
from lsdm_aug.metrics.features import SliceFeatures, frechet_distance, train_slice_features
from lsdm_aug.models.perceptual import PerceptualDistance
from lsdm_aug.pipeline import LSDMPipeline

__all__ = ["GenerationRecipe", "load_generation_recipe", "run_generation"]

@dataclass
class GenerationRecipe:
    """Settings of the generation benchmark (see the module docstring).

    Example:
        >>> GenerationRecipe(data="prepared/phantom-128", seeds=(0,), scales=(0.0, 1.0)).validate().count
        48
    """

    name: str = "bench-generation"
    data: str = "prepared/phantom-128"
    lsdm: str = "default"
    model_recipe: str = "phantom-128"
    ldm: str | None = "work/generation/ldm"
    ldm_steps: int | None = None
    spade_gan: str | None = "work/generation/spade-gan"
    spade_gan_steps: int | None = None
    feature_extractor: str | None = None
    feature_extractor_depth: int | None = None
    feature_steps: int = 1500
    perceptual_weights: str | None = None
    perceptual_depth: int = 50
    count: int = 48
    seeds: tuple[int, ...] = (0, 1, 2)
    steps: int = 25
    guidance_scale: float = 1.0
    scales: tuple[float, ...] = (0.0, 0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 32.0)
    control_count: int = 24
    evaluator_steps: int = 600

    def validate(self) -> GenerationRecipe:
        if self.count < 2 or self.control_count < 2 or not self.seeds:
            raise ValueError(f"count and control_count must be >= 2 and seeds non-empty, got {self.count}, "
                             f"{self.control_count}, {list(self.seeds)}")
        for name in ("ldm_steps", "spade_gan_steps"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1 or null (the model recipe's), got {getattr(self, name)}")
        if self.feature_extractor_depth is not None and self.feature_extractor is None:
            raise ValueError(f"feature_extractor_depth {self.feature_extractor_depth} needs a feature_extractor "
                             "weight file")
        if min(self.scales, default=0) < 0:
            raise ValueError(f"guidance scales must be >= 0, got {list(self.scales)}")
        return self


def load_generation_recipe(name_or_path: str | Path) -> GenerationRecipe:
    """A shipped recipe by name (``bench-generation``) or a YAML path."""
    return load_benchmark_recipe(GenerationRecipe, name_or_path, "generation", ("seeds", "scales"))


# ---- models ---------------------------------------------------------------------------------------------------

def _ensure_ldm(recipe: GenerationRecipe, pipe: LSDMPipeline) -> Path:
    """The LDM baseline's folder: the LSDM autoencoder and a plain U-Net trained like the LSDM one."""
    from lsdm_aug.training.autoencoder import AUTOENCODER_FILE
    from lsdm_aug.training.diffusion import UNET_FILE, train_diffusion

    folder = Path(recipe.ldm)
    model_recipe = load_recipe(recipe.model_recipe)
    model_recipe.diffusion.spade = False  # the LDM baseline sees neither the map's SPADE nor the features
    model_recipe.diffusion.feature_conditioning = False
    model_recipe.name = f"{model_recipe.name}-ldm"
    model_recipe.train_diffusion.steps = recipe.ldm_steps or model_recipe.train_diffusion.steps
    if not (folder / UNET_FILE).is_file() or _steps_in(folder / "unet.json") < model_recipe.train_diffusion.steps:
        source = Path(pipe_folder(recipe.lsdm))
        folder.mkdir(parents=True, exist_ok=True)
        for name in (AUTOENCODER_FILE, AUTOENCODER_FILE.replace(".safetensors", ".json")):
            if not (folder / name).is_file():
                shutil.copy2(source / name, folder / name)
        train_diffusion(model_recipe, recipe.data, folder, progress=True)
    return folder


def pipe_folder(name_or_path: str) -> Path:
    from lsdm_aug.models.checkpoint import resolve_model_dir

    return resolve_model_dir(name_or_path)


def _ensure_spade_gan(recipe: GenerationRecipe) -> Path:
    from lsdm_aug.training.spade_gan import SPADE_GAN_FILE, train_spade_gan

    folder, model_recipe = Path(recipe.spade_gan), load_recipe(recipe.model_recipe)
    model_recipe.train_spade_gan.steps = recipe.spade_gan_steps or model_recipe.train_spade_gan.steps
    if not (folder / SPADE_GAN_FILE).is_file() or \
            _steps_in(folder / "spade_gan.json") < model_recipe.train_spade_gan.steps:
        train_spade_gan(model_recipe, recipe.data, folder, progress=True)
    return folder


# ---- held-out maps and generation ------------------------------------------------------------------------------

@dataclass
class HeldOut:
    """Held-out slices: images, maps, each slice's first nodule centre and rounded ratings (see :func:`held_out`).

    Example:
        >>> data = held_out("prepared/phantom-128", count=8)  # doctest: +SKIP
    """

    images: np.ndarray  # (N, H, W) in [-1, 1]
    maps: np.ndarray  # (N, H, W)
    centres: list[tuple[float, float]]
    ratings: list[dict[str, float]]
    spacings: list[float]  # pixel spacing of each slice, mm


def held_out(data: str, count: int) -> HeldOut:
    """The first ``count`` test slices with a nodule, with their first nodule's centre and rounded ratings."""
    test = PreparedDataset(data, split="test")
    rows = test.features.drop_duplicates("case_id").head(count)
    if len(rows) < 2:
        raise ValueError(f"{data!r}: the test split needs >= 2 slices with nodules, has {len(rows)}")
    cases = [test[c] for c in rows.case_id]
    ratings = [{f: float(rating_level(getattr(r, f))) for f in FEATURES} for r in rows.itertuples()]
    return HeldOut(np.stack([c["image"] for c in cases]), np.stack([c["semantic_map"] for c in cases]),
                   list(zip(rows.centre_row, rows.centre_col)), ratings, [float(c["spacing_mm"]) for c in cases])


def _generate_lsdm(pipe: LSDMPipeline, data: HeldOut, guided: tuple[str, ...], scale: float, steps: int,
                   seed: int, requested: list[dict[str, float]] | None = None, batch_size: int = 16) -> np.ndarray:
    requested = requested or data.ratings
    return pipe.generate(data.maps, [{f: r[f] for f in guided} for r in requested], steps=steps,
                         guidance_scale=scale if guided else 0.0, seed=seed, batch_size=batch_size,
                         spacing_mm=data.spacings, cfg_scale=0.0)


def _models(recipe: GenerationRecipe, pipe: LSDMPipeline) -> dict[str, Any]:
    """Model name -> function(seed) -> generated slices (N, H, W)."""
    models: dict[str, Any] = {}
    if recipe.spade_gan is not None:
        from lsdm_aug.training.spade_gan import load_spade_gan

        generate = load_spade_gan(_ensure_spade_gan(recipe))
        models["spade-gan"] = lambda data, seed: generate(torch.from_numpy(data.maps)[:, None])[:, 0].numpy()
    if recipe.ldm is not None:
        ldm = LSDMPipeline.from_pretrained(_ensure_ldm(recipe, pipe), device="cpu")
        models["ldm"] = lambda data, seed: _generate_lsdm(ldm, data, (), 0.0, recipe.steps, seed)
    variants = {"lsdm": (), "lsdm+all": tuple(f for f in FEATURES if f in pipe.classifiers)}
    variants |= {f"lsdm+{f}": (f,) for f in FEATURES if f in pipe.classifiers}
    for name, guided in variants.items():
        models[name] = (lambda g: lambda data, seed: _generate_lsdm(pipe, data, g, recipe.guidance_scale, recipe.steps,
                                                                     seed))(guided)
    return models


# ---- metrics ------------------------------------------------------------------------------------------------

def _feature_extractor(recipe: GenerationRecipe, work: Path) -> SliceFeatures | PerceptualDistance:
    """FID features: a local ResNet weight file (``feature_extractor_depth`` 18 / 34 / 50, e.g. RadImageNet), an
    in-project slice network file, or by default one trained here into the work folder."""
    if recipe.feature_extractor is not None and recipe.feature_extractor_depth is not None:
        return PerceptualDistance(recipe.feature_extractor, recipe.feature_extractor_depth)
    path = Path(recipe.feature_extractor or work / "slice_features.safetensors")
    if recipe.feature_extractor is None and not path.is_file():
        train_slice_features(recipe.data, path, steps=recipe.feature_steps, progress=True)
    return SliceFeatures.from_file(path)


def _perceptual(recipe: GenerationRecipe, extractor: SliceFeatures | PerceptualDistance):
    if recipe.perceptual_weights is None:
        return extractor.distance
    return PerceptualDistance(recipe.perceptual_weights, recipe.perceptual_depth)


MS_SSIM_WEIGHTS = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)  # Wang et al. 2003, MONAI's default


def _ms_ssim(size: int, kernel: int = 7) -> MultiScaleSSIMMetric:
    """MS-SSIM with as many of the standard five scales as the slice size allows (renormalised weights)."""
    scales = 1
    while scales < len(MS_SSIM_WEIGHTS) and (kernel - 1) * 2 ** scales + 1 <= size:
        scales += 1
    weights = np.asarray(MS_SSIM_WEIGHTS[:scales]) / sum(MS_SSIM_WEIGHTS[:scales])
    return MultiScaleSSIMMetric(spatial_dims=2, data_range=2.0, kernel_size=kernel, weights=tuple(weights.tolist()))


def quality(real: HeldOut, generated: np.ndarray, extractor: SliceFeatures, perceptual, crop_evaluator) -> dict:
    """FID, SSIM, MS-SSIM, perceptual distance and nodule-crop FID of one set of generated slices."""
    x = torch.from_numpy(real.images).float()[:, None]
    y = torch.from_numpy(generated).float()[:, None].clamp(-1, 1)
    crop = crop_evaluator.crop_px
    real_crops = nodule_crops(real.images, real.centres, crop)
    fake_crops = nodule_crops(generated, real.centres, crop)
    return {"fid": frechet_distance(extractor.embed(x), extractor.embed(y)),
            "ssim": float(SSIMMetric(spatial_dims=2, data_range=2.0)(y, x).mean()),
            "ms_ssim": float(_ms_ssim(x.shape[-1])(y, x).mean()),
            "perceptual": float(perceptual(y, x).mean()),
            "crop_fid": frechet_distance(crop_evaluator.features(real_crops), crop_evaluator.features(fake_crops))}


def control(pipe: LSDMPipeline, data: HeldOut, evaluators: dict[str, NoduleEvaluator], recipe: GenerationRecipe,
            seed: int) -> dict:
    """Evaluator AUC, low (1) vs high (5) requested on the same maps: per feature at the recipe's scale, and for
    malignancy over the scale curve."""
    def auc(feature: str, scale: float) -> float:
        high = _generate_lsdm(pipe, data, (feature,), scale, recipe.steps, seed, [{feature: 5.0}] * len(data.maps))
        low = _generate_lsdm(pipe, data, (feature,), scale, recipe.steps, seed, [{feature: 1.0}] * len(data.maps))
        evaluator = evaluators[feature]
        scores = np.concatenate([evaluator.high_probability(nodule_crops(images, data.centres, evaluator.crop_px))
                                 for images in (high, low)])
        labels = np.concatenate([np.ones(len(high)), np.zeros(len(low))])
        return labelled_auc(labels, scores)

    result = {"per_feature": {f: auc(f, recipe.guidance_scale) for f in evaluators if f in pipe.classifiers}}
    if "malignancy" in pipe.classifiers:
        result["malignancy_curve"] = {str(s): auc("malignancy", s) for s in recipe.scales}
    return result


def draw_grid(pipe: LSDMPipeline, data: HeldOut, recipe: GenerationRecipe, out: Path) -> Path:
    """Malignancy 1..5 (rows) x guidance scale (columns) close-ups of one held-out map."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scales = [s for s in recipe.scales if s in (0.0, 1.0, 4.0, 16.0)] or list(recipe.scales)[:4]
    first = HeldOut(data.images[:1], data.maps[:1], data.centres[:1], data.ratings[:1], data.spacings[:1])
    crop = max(16, pipe.recipe.image_size // 4)
    figure, axes = plt.subplots(5, len(scales), figsize=(1.8 * len(scales), 9), squeeze=False)
    for row, level in enumerate(range(1, 6)):
        for col, scale in enumerate(scales):
            image = _generate_lsdm(pipe, first, ("malignancy",), scale, recipe.steps, 0, [{"malignancy": float(level)}])
            axes[row, col].imshow(nodule_crops(image, first.centres, crop)[0], cmap="gray", vmin=-1, vmax=1)
            axes[row, col].set_title(f"m{level} s={scale:g}", fontsize=8)
            axes[row, col].axis("off")
    figure.tight_layout()
    figure.savefig(out, dpi=90)
    plt.close(figure)
    return out


def _spread(values: list[float]) -> dict[str, float]:
    return {"mean": float(np.mean(values)), "std": float(np.std(values))}


def run_generation(recipe: GenerationRecipe, work_dir: str | Path, out_dir: str | Path) -> dict[str, Any]:
    """Train what is missing, generate, measure, and write ``generation.md`` / ``.json`` / ``grid.png``."""
    recipe.validate()
    work, out = Path(work_dir), Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    pipe = LSDMPipeline.from_pretrained(recipe.lsdm, device="cpu")
    extractor = _feature_extractor(recipe, work)
    crop_px = max(16, pipe.recipe.image_size // 8)  # 64 px at 512, as the thesis; the evaluator needs >= 16
    evaluators, evaluator_reports = {}, {}
    for feature in FEATURES:
        try:
            evaluators[feature], evaluator_reports[feature] = NoduleEvaluator.train(
                recipe.data, crop_px=crop_px, steps=recipe.evaluator_steps, feature=feature)
        except ValueError as error:  # too few low or high nodules of this feature to judge it
            evaluator_reports[feature] = {"feature": feature, "skipped": str(error)}
    if "malignancy" not in evaluators:
        raise ValueError(f"{recipe.data!r}: {evaluator_reports['malignancy']['skipped']}")
    data = held_out(recipe.data, recipe.count)
    control_data = held_out(recipe.data, recipe.control_count)
    perceptual = _perceptual(recipe, extractor)
    report: dict[str, Any] = {"recipe": asdict(recipe), "model": pipe.model_id, "crop_px": crop_px,
                              "evaluators": evaluator_reports, "models": {}, "control": []}
    models = _models(recipe, pipe)
    report["training_steps"] = _training_steps(recipe, pipe)
    settings = asdict(recipe)
    quality_print = _fingerprint(settings, _QUALITY_KEYS, pipe.model_id, report["training_steps"])
    control_print = _fingerprint(settings, _CONTROL_KEYS, pipe.model_id, report["training_steps"])
    for name, generate in models.items():
        runs = [_cached(work / "results" / f"{name}-seed{seed}.json", quality_print,
                        lambda: quality(data, generate(data, seed), extractor, perceptual, evaluators["malignancy"]))
                for seed in recipe.seeds]
        report["models"][name] = {k: _spread([r[k] for r in runs]) for k in runs[0]}
    report["control"] = [_cached(work / "results" / f"control-seed{seed}.json", control_print,
                                 lambda: control(pipe, control_data, evaluators, recipe, seed))
                         for seed in recipe.seeds]
    draw_grid(pipe, control_data, recipe, out / "grid.png")
    atomic_write_text(out / "generation.json", json.dumps(report, indent=1))
    atomic_write_text(out / "generation.md", generation_markdown(report))
    return report


_COMMON_KEYS = ("data", "lsdm", "model_recipe", "steps", "guidance_scale", "evaluator_steps")
_QUALITY_KEYS = _COMMON_KEYS + ("count", "ldm", "ldm_steps", "spade_gan", "spade_gan_steps", "feature_extractor",
                                "feature_extractor_depth", "feature_steps", "perceptual_weights", "perceptual_depth")
_CONTROL_KEYS = _COMMON_KEYS + ("control_count", "scales")


def _fingerprint(settings: dict, keys: tuple[str, ...], model_id: str, training_steps: dict) -> dict:
    """What a cached result depends on, in its JSON form."""
    return json.loads(json.dumps({"recipe": {k: settings[k] for k in keys}, "model": model_id,
                                  "training_steps": training_steps}))


def _cached(path: Path, fingerprint: dict, compute) -> dict:
    """``compute()``, written atomically to ``path`` with the settings that made it; a rerun with the same
    ``fingerprint`` (recipe, model, baselines' training steps) reads it back, any other setting recomputes it."""
    if path.is_file():
        stored = json.loads(path.read_text())
        if stored.get("fingerprint") == fingerprint:
            return stored["result"]
    path.parent.mkdir(parents=True, exist_ok=True)
    result = compute()
    atomic_write_text(path, json.dumps({"fingerprint": fingerprint, "result": result}, indent=1))
    return result


def _training_steps(recipe: GenerationRecipe, pipe: LSDMPipeline) -> dict[str, int]:
    """Training steps of each compared network, read from the weight files' JSON."""
    steps = {"lsdm": _steps_in(pipe_folder(recipe.lsdm) / "unet.json")}
    if recipe.ldm is not None:
        steps["ldm"] = _steps_in(Path(recipe.ldm) / "unet.json")
    if recipe.spade_gan is not None:
        steps["spade-gan"] = _steps_in(Path(recipe.spade_gan) / "spade_gan.json")
    return steps


def _steps_in(settings_file: Path) -> int:
    """The training steps recorded in a weight file's JSON settings."""
    return int(json.loads(settings_file.read_text())["steps"])


def _extractor_words(r: dict[str, Any]) -> str:
    if r["feature_extractor"] is None:
        return "in-project slice features (trained on the data's training split)"
    if r.get("feature_extractor_depth"):
        return f"ResNet{r['feature_extractor_depth']} pooled features from `{r['feature_extractor']}`"
    return f"in-project slice features from `{r['feature_extractor']}`"


def generation_markdown(report: dict[str, Any]) -> str:
    r = report["recipe"]
    lines = ["# Generation quality and control", "",
             f"Command: `lsdm-aug benchmark generation --recipe {r['name']}`", "",
             f"{r['count']} held-out test slices with a nodule from `{r['data']}`; LSDM `{report['model']}`, DDIM "
             f"{r['steps']} steps, guidance scale {r['guidance_scale']} towards the real nodule's rounded ratings; "
             f"seeds {list(r['seeds'])}, mean ± std. FID: {_extractor_words(r)}; perceptual: "
             f"{'the same network' if r['perceptual_weights'] is None else 'ResNet' + str(r['perceptual_depth']) + ' from `' + r['perceptual_weights'] + '`'}"
             "'s channel-normalised stage features; crop FID: "
             f"{report['crop_px']} px nodule crops, malignancy-evaluator features. Training steps: "
             + ", ".join(f"{k} {v}" for k, v in report.get("training_steps", {}).items()) + ".", "",
             "| model | FID | SSIM | MS-SSIM | perceptual | crop FID |", "| --- | --- | --- | --- | --- | --- |"]
    for name, m in report["models"].items():
        lines.append(f"| {name} | " + " | ".join(f"{m[k]['mean']:.3f} ± {m[k]['std']:.3f}"
                                              for k in ("fid", "ssim", "ms_ssim", "perceptual", "crop_fid")) + " |")
    control = report["control"]
    lines += ["", "Control (independent evaluators, low 1 vs high 5 requested on the same maps):", "",
              "| feature | evaluator validation AUC (clean crops) | AUC of generated nodules |", "| --- | --- | --- |"]
    for feature in control[0]["per_feature"]:
        values = [c["per_feature"][feature] for c in control]
        lines.append(f"| {feature} | {report['evaluators'][feature]['validation_auc']:.3f} | "
                     f"{np.mean(values):.3f} ± {np.std(values):.3f} |")
    for feature, evaluator in report["evaluators"].items():
        if "skipped" in evaluator:
            lines.append(f"| {feature} | not judged: {evaluator['skipped']} | - |")
    if "malignancy_curve" in control[0]:
        lines += ["", "Malignancy AUC by guidance scale:", "", "| s | AUC |", "| --- | --- |"]
        for scale in control[0]["malignancy_curve"]:
            values = [c["malignancy_curve"][scale] for c in control]
            lines.append(f"| {scale} | {np.mean(values):.3f} ± {np.std(values):.3f} |")
    lines += ["", "![malignancy x guidance scale](grid.png)"]
    return "\n".join(lines) + "\n"
