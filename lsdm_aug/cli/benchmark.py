"""``lsdm-aug benchmark``: measured figures into a report folder (Markdown + JSON)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from lsdm_aug.cli.errors import fail, user_errors
from lsdm_aug.cli.options import ModelName

app = typer.Typer(help="Benchmarks that write reports/.", no_args_is_help=True)


@app.command("speed")
def speed(
    model: ModelName = "default",
    out: Annotated[Path, typer.Option(help="Report folder.")] = Path("reports/speed"),
    repeats: Annotated[int, typer.Option(help="Samples per timing (after a warm-up).")] = 4,
    steps: Annotated[str, typer.Option(help="DDIM step counts to compare, comma-separated.")] = "10,25,50",
    transform_samples: Annotated[int, typer.Option(help="Slices per transform-mode timing.")] = 24,
    batch_size: Annotated[int, typer.Option(help="Batch size of the batch mode and synthesize.")] = 8,
    bank_size: Annotated[int, typer.Option(help="Nodules in the bank built for the bank mode.")] = 40,
    synth_count: Annotated[int, typer.Option(help="Cases synthesized per synthesize timing.")] = 24,
) -> None:
    """Generation vs insertion, DDIM steps, guidance, latent vs pixel space, transform modes, FLOP/s."""
    try:
        step_counts = tuple(int(s) for s in steps.split(","))
    except ValueError:
        fail(f"--steps must be comma-separated integers, got {steps!r}")
    from lsdm_aug.benchmarks.speed import SpeedSettings, run_speed, speed_markdown

    with user_errors():
        report = run_speed(SpeedSettings(model=model, out=str(out), repeats=repeats, steps=step_counts,
                                         transform_samples=transform_samples, batch_size=batch_size,
                                         bank_size=bank_size, synth_count=synth_count))
    typer.echo(speed_markdown(report))


@app.command("detection")
def detection(
    recipe: Annotated[str, typer.Option(help="bench-detection-phantom, bench-detection-lidc-512 or a YAML path.")]
    = "bench-detection-phantom",
    work: Annotated[Path, typer.Option(help="Working folder (datasets, nnU-Net folders, predictions); rerun to "
                                            "continue arm by arm.")] = Path("work/detection"),
    out: Annotated[Path, typer.Option(help="Report folder.")] = Path("reports/detection"),
) -> None:
    """nnU-Net 2D detection with real data only, plus synthetic cases, on-the-fly synthesis or copy-paste."""
    from lsdm_aug.benchmarks.detection import detection_markdown, load_detection_recipe, run_detection

    with user_errors():
        report = run_detection(load_detection_recipe(recipe), work, out)
    typer.echo(detection_markdown(report))


@app.command("detection-compare")
def detection_compare(
    work: Annotated[Path, typer.Option(help="Work folder of the variant (its arm's runs finished).")],
    against: Annotated[Path, typer.Option(help="Work folder it is compared with (same test set).")],
    arm: Annotated[str, typer.Option(help="The arm run in both, e.g. real+on-the-fly.")] = "real+synthetic",
    recipe: Annotated[str, typer.Option(help="Recipe whose scoring settings (threshold, candidates, bootstrap) "
                                             "are used.")] = "bench-detection-phantom",
) -> None:
    """Paired CPM difference of one arm between two detection work folders (a recipe setting on and off)."""
    from lsdm_aug.benchmarks.detection import compare_work_folders, load_detection_recipe

    with user_errors():
        result = compare_work_folders(work, against, arm, load_detection_recipe(recipe))
    verdict = "resolved" if result["resolved"] else "not resolved"
    typer.echo(f"{arm}: {work} - {against}: CPM {result['mean']:+.3f} [{result['low']:+.3f}, {result['high']:+.3f}] "
               f"({verdict}; seeds {result['seeds']}, per seed "
               f"{', '.join(f'{d:+.3f}' for d in result['seed_differences'])})")


@app.command("generation")
def generation(
    recipe: Annotated[str, typer.Option(help="bench-generation or a YAML path.")] = "bench-generation",
    work: Annotated[Path, typer.Option(help="Working folder (feature network; rerun to reuse).")] =
    Path("work/generation"),
    out: Annotated[Path, typer.Option(help="Report folder.")] = Path("reports/generation"),
) -> None:
    """SPADE GAN, LDM, LSDM and guided LSDM on the same held-out maps: FID, SSIM, MS-SSIM, perceptual, control."""
    from lsdm_aug.benchmarks.generation import generation_markdown, load_generation_recipe, run_generation

    with user_errors():
        report = run_generation(load_generation_recipe(recipe), work, out)
    typer.echo(generation_markdown(report))


@app.command("model-quality")
def model_quality(
    data: Annotated[Path, typer.Option(help="Prepared phantom dataset (test split measured, train split trains the "
                                            "evaluators).")],
    model: Annotated[str, typer.Option(help="'default', a shipped model or a model folder.")] = "default",
    out: Annotated[Path, typer.Option(help="Report folder.")] = Path("reports/model_quality"),
    count: Annotated[int, typer.Option(help="Insertions per requested level and guidance setting (>= 2; at 48 a "
                                            "control AUC's 95 % interval spans about +-0.11).")] = 48,
    steps: Annotated[int, typer.Option(help="DDIM steps.")] = 20,
    seed: Annotated[int, typer.Option(help="Seed of backgrounds, sites and diffusion.")] = 0,
    evaluator_steps: Annotated[int, typer.Option(help="Training steps of each independent evaluator.")] = 600,
    workers: Annotated[int, typer.Option(help="Processes: 2 runs a second one, one torch thread each, taking the "
                                              "guidance settings from the end (same figures).")] = 1,
    max_redraws: Annotated[int, typer.Option(help="Redraws of a saturated nodule told 'not calcified' (the "
                                                  "pipeline's default; 0: first draws only).")] = 2,
) -> None:
    """A model's gates: reconstruction, map respect, control per guidance setting (s, w), other spacings, speed."""
    if not (data / "dataset.json").is_file():
        fail(f"--data {str(data)!r} is not a prepared dataset (no dataset.json)")
    if workers not in (1, 2):
        fail(f"--workers must be 1 or 2, got {workers}")
    from lsdm_aug.benchmarks.model_quality import QualitySettings, quality_markdown, run_model_quality

    with user_errors():
        settings = QualitySettings(data=str(data), model=model, out=str(out), count=count, steps=steps, seed=seed,
                                   evaluator_steps=evaluator_steps, max_redraws=max_redraws)
        report = run_model_quality(settings, workers=workers)
    typer.echo(quality_markdown(report))


@app.command("model-card")
def model_card(
    model: Annotated[Path, typer.Option(help="Model folder to write MODEL_CARD.md into.")],
    data_command: Annotated[str, typer.Option(help="The command that prepared the training data.")],
    train_command: Annotated[list[str], typer.Option(help="A training command (repeat the option per stage).")],
    quality: Annotated[Path | None, typer.Option(help="model_quality.json of lsdm-aug benchmark model-quality.")]
    = None,
    note: Annotated[list[str] | None, typer.Option(help="A limit to state in the card (repeat per limit).")] = None,
) -> None:
    """Write a model folder's card from its training configs and its quality report."""
    if not (model / "unet.json").is_file():
        fail(f"--model {str(model)!r} is not a model folder (no unet.json)")
    if quality is not None and not quality.is_file():
        fail(f"--quality {str(quality)!r} does not exist")
    from lsdm_aug.benchmarks.model_card import write_model_card

    typer.echo(write_model_card(model, data_command, train_command, quality, [f"- {n}" for n in note or []]))


@app.command("data-layer")
def data_layer(
    out: Annotated[Path, typer.Option(help="Report folder.")] = Path("reports/data_layer"),
    seed: Annotated[int, typer.Option(help="Seed of the phantom slices drawn.")] = 0,
) -> None:
    """Phantom vs LIDC rating distributions, lung Dice of the semantic map, phantom speed, vessel close-ups."""
    from lsdm_aug.benchmarks.data_layer import markdown, run_data_layer

    typer.echo(markdown(run_data_layer(out, seed)))
