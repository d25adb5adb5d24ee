"""``lsdm-aug nnunet``: nnU-Net v2 helpers (trainer path, training with the NoduleSynth trainer)."""

from __future__ import annotations

from typing import Annotated

import typer

from lsdm_aug.cli.errors import user_errors

app = typer.Typer(help="nnU-Net v2 with on-the-fly nodule synthesis.", no_args_is_help=True)


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
