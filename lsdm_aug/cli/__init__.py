"""The ``lsdm-aug`` command line: one Typer group per file, joined here.

Heavy imports (torch, pylidc) happen inside the commands, so ``lsdm-aug --help`` is instant.
"""

from __future__ import annotations

import typer

from lsdm_aug.cli import bank, benchmark, nnunet, prepare, train
from lsdm_aug.cli.preview import preview
from lsdm_aug.cli.synthesize import synthesize

app = typer.Typer(name="lsdm-aug", help="Lung-nodule data for segmentation and detection training, with LSDM.",
                  no_args_is_help=True, rich_markup_mode="rich", pretty_exceptions_enable=False)
app.add_typer(prepare.app, name="prepare")
app.add_typer(train.app, name="train")
app.add_typer(nnunet.app, name="nnunet")
app.add_typer(bank.app, name="bank")
app.add_typer(benchmark.app, name="benchmark")
app.command("preview")(preview)
app.command("synthesize")(synthesize)


def main() -> None:
    """Console-script entry point."""
    app()
