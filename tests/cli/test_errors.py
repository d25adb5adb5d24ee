"""Only lsdm-aug's own input errors become a one-line exit 2; a dependency's error keeps its traceback."""

from __future__ import annotations

import numpy as np
import pytest
import typer

from lsdm_aug.cli.errors import user_errors
from lsdm_aug.config import load_recipe


def test_an_input_error_of_the_library_exits_2_with_its_message(capsys):
    with pytest.raises(typer.Exit) as exit_info, user_errors():
        load_recipe("no-such-recipe")
    assert exit_info.value.exit_code == 2
    assert "recipe 'no-such-recipe' not found" in capsys.readouterr().err


def test_a_dependency_value_error_is_not_dressed_as_bad_input():
    with pytest.raises(ValueError, match="need at least one array"), user_errors():
        np.stack([])  # a fault inside NumPy, e.g. from a bug in the project
