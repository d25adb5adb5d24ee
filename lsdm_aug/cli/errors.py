"""User errors end in a one-line message and exit code 2, never a traceback."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import typer

__all__ = ["user_errors", "fail"]

#: Exceptions raised by the library's argument checks: their message names the value and what is allowed.
USER_ERRORS: tuple[type[BaseException], ...] = (ValueError, FileNotFoundError, NotADirectoryError, KeyError,
                                               ConnectionError)


def fail(message: str) -> None:
    """Print ``Error: message`` to stderr and exit with code 2."""
    typer.echo(f"Error: {message}", err=True)
    raise typer.Exit(code=2)


@contextlib.contextmanager
def user_errors() -> Iterator[None]:
    """Turn the library's input errors into :func:`fail`."""
    try:
        yield
    except USER_ERRORS as error:
        message = error.args[0] if isinstance(error, KeyError) and error.args else str(error)
        fail(str(message))
