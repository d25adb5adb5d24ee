"""``lsdm-aug nnunet``: nnU-Net v2 helpers (planning with a CT window that keeps the lung, trainer path, training
with the NoduleSynth trainer)."""

from __future__ import annotations

from typing import Annotated

import typer

from lsdm_aug.cli.errors import user_errors

app = typer.Typer(help="nnU-Net v2 with on-the-fly nodule synthesis.", no_args_is_help=True)


@app.command("plan")
def plan(
    dataset: Annotated[int, typer.Argument(help="Dataset id in nnUNet_raw.")],
    configurations: Annotated[list[str], typer.Option("-c", help="nnU-Net configurations to preprocess.")] = ["2d"],
    ct_low: Annotated[float, typer.Option(help="Lower CT clip in HU (nnU-Net's: the nodules' 0.5 percentile).")] = -1024.0,
    ct_high: Annotated[float, typer.Option(help="Upper CT clip in HU.")] = 800.0,
    num_processes: Annotated[int, typer.Option("--np", help="Preprocessing processes per configuration.")] = 1,
) -> None:
    """nnUNetv2_plan_and_preprocess with the CT window set to [ct-low, ct-high] HU before preprocessing.

    nnU-Net clips CT to the 0.5 / 99.5 percentiles of the labelled voxels; for nodules that flattens the lung,
    which the network then never sees and in which nnUNetTrainerNoduleSynth cannot place nodules."""
    from lsdm_aug.nnunet.plans import plan_and_preprocess

    with user_errors():
        plans_file = plan_and_preprocess(dataset, tuple(configurations), (ct_low, ct_high), num_processes)
    typer.echo(f"planned and preprocessed with CT clipped to [{ct_low:g}, {ct_high:g}] HU: {plans_file}")


@app.command("trainer-path")
def trainer_path() -> None:
    """Print the folder to put in nnUNet_extTrainer (for nnUNetv2_train -tr nnUNetTrainerNoduleSynth)."""
    from lsdm_aug.nnunet import TRAINER_PATH

    typer.echo(TRAINER_PATH)


@app.command("train")
def train(
    dataset: Annotated[str, typer.Argument(help="Dataset id or name (DatasetXXX_Name), preprocessed by nnU-Net.")],
    configuration: Annotated[str, typer.Argument(help="nnU-Net configuration, e.g. 2d.")],
    fold: Annotated[str, typer.Argument(help="Fold 0..4 or 'all'.")],
    trainer: Annotated[str, typer.Option("--tr", help="nnUNetTrainerNoduleSynth or nnUNetTrainer.")] = "nnUNetTrainerNoduleSynth",
    device: Annotated[str, typer.Option(help="cpu, cuda or mps.")] = "cpu",
    continue_training: Annotated[bool, typer.Option("--c", help="Continue from the latest checkpoint.")] = False,
) -> None:
    """Train like nnUNetv2_train (one process); NoduleSynth settings come from LSDM_AUG_NNUNET (JSON)."""
    from lsdm_aug.nnunet.training import train as run

    with user_errors():
        folder = run(dataset, configuration, fold, trainer, device=device, continue_training=continue_training)
    typer.echo(f"trained {trainer} into {folder}")
