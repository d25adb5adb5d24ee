"""User errors end in a one-line message and exit code 2; anything else shows its traceback.

An input error is one of :data:`USER_ERRORS` raised by the library's own argument checks, i.e. by a
``raise`` in lsdm-aug's code: its message names the value and what is allowed. The same exception types
raised inside a dependency (NumPy, PyTorch, pandas, ...) are faults, not bad input, and keep their
traceback, so a real bug never looks like a typo.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from types import TracebackType

import typer

__all__ = ["user_errors", "fail"]

#: Exceptions raised by the library's argument checks: their message names the value and what is allowed.
USER_ERRORS: tuple[type[BaseException], ...] = (ValueError, FileNotFoundError, NotADirectoryError, KeyError,
                                               ConnectionError)


def fail(message: str) -> None:
    """Print ``Error: message`` to stderr and exit with code 2."""
    typer.echo(f"Error: {message}", err=True)
    raise typer.Exit(code=2)


PACKAGE_DIR = Path(__file__).resolve().parents[1]


def raised_by_lsdm_aug(traceback: TracebackType | None) -> bool:
    """Whether the innermost frame of ``traceback`` is lsdm-aug's own code (not a dependency's)."""
    last = None
    while traceback is not None:
        last, traceback = traceback, traceback.tb_next
    return last is not None and Path(last.tb_frame.f_code.co_filename).resolve().is_relative_to(PACKAGE_DIR)


@contextlib.contextmanager
def user_errors() -> Iterator[None]:
    """Turn the library's input errors into :func:`fail`; re-raise every other exception."""
    try:
        yield
    except USER_ERRORS as error:
        if not raised_by_lsdm_aug(error.__traceback__):
            raise
        message = error.args[0] if isinstance(error, KeyError) and error.args else str(error)
        fail(str(message))
